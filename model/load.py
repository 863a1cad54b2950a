"""Weights from any source, through one loader: a meshlm checkpoint (trained or converted), a GGUF file, a Hugging
Face directory, a packaged model by name, or a preset with random weights.

    loaded = load_model(model="smollm2-135m")        # or checkpoint=..., gguf=..., hf=..., preset=...
    loaded.config, loaded.graphdef, loaded.params    # what a Decoder, an Engine or a forward pass takes
    loaded.tokenizer, loaded.chat_template           # how its text is written: a description and Jinja text

model/ knows no tokenizers (it imports nothing from data/): `tokenizer` is the *description* of one, what
`data.tokenizer.load_tokenizer` reads (a tiktoken name, a .tiktoken file, a GGUF file, a token store).

A checkpoint records its tokenizer and chat template in its layout metadata (`model.checkpoint.layout_metadata`),
in every step; `checkpoint_metadata` reads them, and, for checkpoints written before they were recorded there,
the run directory's config.yaml (`legacy_metadata`). `convert_to_checkpoint` writes imported weights as such a
checkpoint, and `load_params` puts any source's parameters onto a training run's mesh (`train.init_from`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from model.checkpoint import (
    QUANTIZATION,
    CheckpointError,
    check_layout,
    checkpoint_dir,
    layout_metadata,
    read_layout,
    reader,
    restore_params,
    restore_target,
    save_params,
)
from model.config import Execution, ModelConfig
from model.hf import WeightsError
from model.placement import abstract_model, param_layout, put_params
from model.quant import QuantError, as_arrays, from_arrays
from model.sharding import default_mesh, make_mesh

SOURCES = ("checkpoint", "gguf", "hf", "model", "preset")  # the keyword arguments of load_model
TOKENIZER, CHAT_TEMPLATE = "tokenizer", "chat_template"  # their keys in a checkpoint's layout metadata


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    graphdef: Any
    params: Any  # nested dict: numpy arrays (imported, random) or jax arrays on the mesh (a checkpoint)
    tokenizer: str | None  # what data.tokenizer.load_tokenizer reads; None when the source names none
    chat_template: str | None  # Jinja text, None when the source has none
    source: str


# ----------------------------------------------------------------------------- checkpoint metadata


def _single_device_mesh() -> Mesh:
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


def checkpoint_layout(path: str, step: int | None = None) -> dict:
    """The layout metadata of a checkpoint's step (newest unless `step`); `path`: a run directory or its
    checkpoints/."""
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory at {path!r}; give a run directory or its checkpoints/")
    with reader(directory) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"no checkpoint in {directory}")
        if step is not None and step not in steps:
            raise CheckpointError(f"no step {step} in {directory}; it has steps {steps}")
        return read_layout(manager, step if step is not None else steps[-1])


def checkpoint_config(path: str, step: int | None = None) -> ModelConfig:
    """The ModelConfig stored in a checkpoint's layout metadata (newest step unless `step`)."""
    return ModelConfig.from_dict(checkpoint_layout(path, step)["model_config"])


def checkpoint_metadata(path: str, layout: dict) -> tuple[str | None, str | None]:
    """(tokenizer description, chat template) of the checkpoint at `path` whose layout is `layout`: what the
    layout records, or for checkpoints written before it recorded them, the run's config.yaml."""
    if TOKENIZER in layout:
        return layout[TOKENIZER], layout.get(CHAT_TEMPLATE)
    return legacy_metadata(path)


def legacy_metadata(path: str) -> tuple[str | None, str | None]:
    """(tokenizer description, chat template) from the config.yaml beside an old checkpoint ((None, None) when
    there is none). Two shapes were written: a converted model's {converted_from, model, tokenizer,
    chat_template}, and a training run's whole TrainConfig, whose data.store names the tokenizer."""
    import yaml

    directory = os.path.normpath(checkpoint_dir(path))
    run_dir = os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory
    config_file = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_file):
        return None, None
    with open(config_file) as f:
        run = yaml.safe_load(f) or {}
    if not isinstance(run, dict):
        raise CheckpointError(f"{config_file} is not a mapping: cannot tell the checkpoint's tokenizer; "
                              "pass the tokenizer explicitly")
    store = (run.get("data") or {}).get("store") if isinstance(run.get("data"), dict) else None
    return run.get(TOKENIZER) or store or None, run.get(CHAT_TEMPLATE)


def load_checkpoint(path: str, mesh: Mesh | None = None, step: int | None = None,
                    execution: Execution | None = None) -> tuple[ModelConfig, Any, dict, dict]:
    """(config, graphdef, params, layout metadata) of a training or converted checkpoint, the parameters placed
    shard by shard on `mesh` (default: default_mesh()); the graph runs with `execution` (default Execution())."""
    saved = checkpoint_layout(path, step)
    config = ModelConfig.from_dict(saved["model_config"])
    quantization = saved.get(QUANTIZATION) or None  # quantised weights come back as QuantizedWeights
    if quantization is not None and not isinstance(quantization, dict):
        raise CheckpointError(f"checkpoint {path}: its layout's {QUANTIZATION!r} record is not a mapping of "
                              "parameter paths (a corrupt layout?)")
    try:
        target, layout = restore_target(config, mesh if mesh is not None else default_mesh(),
                                        quantization=quantization)
    except QuantError as e:
        raise CheckpointError(f"checkpoint {path}: {e} (a corrupt layout?)") from e
    params = from_arrays(restore_params(checkpoint_dir(path), target, step=step, layout=layout), quantization)
    return config, nnx.split(abstract_model(config, execution=execution))[0], params, saved


# ----------------------------------------------------------------------------- any source


def load_model(checkpoint: str | None = None, gguf: str | None = None, hf: str | None = None,
               model: str | None = None, preset: str | None = None, tokenizer: str | None = None,
               vocab_size: int | None = None, mesh: Mesh | None = None,
               execution: Execution | None = None, keep_quantized: bool = False) -> LoadedModel:
    """One of: a training or converted checkpoint (its parameters placed on `mesh`, default one device), a GGUF
    file, a Hugging Face directory, a packaged model by name ("smollm2-135m"), or a preset with random weights
    (load tests and benchmarks; `vocab_size`: its tokenizer's). `tokenizer` overrides the source's own
    description (needed for a Hugging Face directory, whose tokenizer.json meshlm does not read, and a preset).
    `execution`: how the returned graph runs (compute dtype; default Execution(), float32): a setting of the
    run, not of the weights.

    A quantised checkpoint (`meshlm convert --quantize`) loads quantised, as it was saved. keep_quantized: a
    GGUF's Q8_0 / Q4_0 / Q4_1 matmul weights stay in their blocks (model.gguf.load_gguf), with no float copy;
    for a checkpoint it changes nothing, and other sources have no quantisation to keep (a WeightsError)."""
    kind, _ = check_source(checkpoint=checkpoint, gguf=gguf, hf=hf, model=model, preset=preset)
    if keep_quantized and kind in ("hf", "preset"):
        raise WeightsError(f"keeping the weights' own quantisation (--quantize keep) needs a GGUF file or a "
                           f"checkpoint; --{kind} {hf or preset} holds float weights: quantise them with --quantize "
                           "int8|int4[:32|64|128]|q8_0|q4_0|q4_1")
    if preset:
        from model.config import get_preset
        from model.placement import init_model

        if vocab_size is None:
            raise WeightsError("a preset (random weights) needs the vocabulary size of its tokenizer: pass "
                               "--tokenizer")
        config = get_preset(preset).replace(vocab_size=vocab_size)
        graphdef, params = nnx.split(init_model(config, seed=0, execution=execution))
        return LoadedModel(config, graphdef, nnx.to_pure_dict(params), tokenizer, None,
                           f"preset {preset} (random weights)")
    if checkpoint:
        config, graphdef, params, layout = load_checkpoint(checkpoint, mesh=mesh, execution=execution)
        own, template = checkpoint_metadata(checkpoint, layout)
        return LoadedModel(config, graphdef, params, tokenizer or own, template, checkpoint)
    if model:
        from model.gguf import packaged_model_path

        gguf = packaged_model_path(model)
    if gguf:
        from model.gguf import chat_template, load_gguf

        config, params = load_gguf(gguf, keep_quantized=keep_quantized)
        own, template = os.path.abspath(gguf), chat_template(gguf)
    else:
        from model.hf import load_hf

        config, params = load_hf(hf)
        own, template = None, None
    graphdef = nnx.split(abstract_model(config, execution=execution))[0]
    return LoadedModel(config, graphdef, params, tokenizer or own, template, gguf or hf)


def check_source(**sources: str | None) -> tuple[str, str]:
    """(kind, value) of the one source given among SOURCES, checked as far as it can be without reading it: the
    file or directory exists, the packaged model is known and installed, the preset is known. A WeightsError
    (or ConfigError for a preset) says what is wrong."""
    given = [(kind, value) for kind, value in sources.items() if value]
    if len(given) != 1:
        raise WeightsError("give exactly one of --checkpoint, --gguf, --hf, --model, --preset"
                           + (f" (got {', '.join('--' + kind for kind, _ in given)})" if given else ""))
    [(kind, value)] = given
    if kind == "model":
        from model.gguf import packaged_model_path

        packaged_model_path(value)
    elif kind == "preset":
        from model.config import get_preset

        get_preset(value)
    elif not (os.path.isfile(value) if kind == "gguf" else os.path.isdir(value)):
        raise WeightsError(f"--{kind} {value}: no such {'GGUF file' if kind == 'gguf' else 'directory'}")
    return kind, value


def source_kind(source: str) -> dict[str, str]:
    """One string naming weights -> the load_model keyword for it: a .gguf file, a Hugging Face directory
    (config.json), a packaged model name, else a checkpoint (a run directory or its checkpoints/)."""
    if source.endswith(".gguf"):
        return {"gguf": source}
    if os.path.isfile(os.path.join(source, "config.json")):
        return {"hf": source}
    if not os.path.exists(source) and os.sep not in source and "://" not in source:
        return {"model": source}
    return {"checkpoint": source}


# ----------------------------------------------------------------------------- onto a run's mesh, and back to disk


def load_params(source: str, target: dict, layout: dict) -> dict:
    """The parameters of `source` (anything `source_kind` names) on the shardings of `target` (abstract
    parameters with `sharding=`, as restore_target gives), checked against the model's `layout` first: weights
    of another model are a CheckpointError naming the differences. Values are cast to the target's dtypes."""
    kind = source_kind(source)
    if "checkpoint" in kind:
        return restore_params(checkpoint_dir(source), target, layout=layout)
    loaded = load_model(**kind)
    # imported weights are float32 numpy, whatever dtype the run keeps: they are cast to it, not compared
    run_dtype = (layout.get("model_config") or {}).get("param_dtype")
    config = loaded.config.replace(param_dtype=run_dtype) if run_dtype else loaded.config
    imported = param_layout(config, _single_device_mesh())
    check_layout(layout_metadata(config, imported.abstract, imported.logical_axes), layout, source)

    cast = jax.tree.map(lambda value, leaf: np.asarray(value, leaf.dtype), loaded.params, target)
    return put_params(cast, target)


def convert_to_checkpoint(loaded: LoadedModel, out: str) -> str:
    """Save loaded weights as a meshlm checkpoint (step 0) in `<out>/checkpoints` that `load_model(checkpoint=)`
    loads and `train.init_from` fine-tunes from; its layout records the tokenizer and the chat template.
    Quantised weights (model/quant.py) are saved as they are, their arrays under the weight's path and their
    formats in the layout: such a checkpoint loads quantised, for inference (training needs float weights)."""
    directory = os.path.join(os.path.abspath(out), "checkpoints")
    if os.path.exists(directory) and os.listdir(directory):
        raise CheckpointError(f"{directory} already holds a checkpoint: choose another --out (nothing was changed)")
    mesh = _single_device_mesh()
    arrays, quantization = as_arrays(loaded.params)
    layout = param_layout(loaded.config, mesh, quantization=quantization)
    params = put_params(arrays, layout.shardings)
    save_params(directory, 0, params, layout_metadata(loaded.config, layout.abstract, layout.logical_axes,
                                                      tokenizer=loaded.tokenizer, chat_template=loaded.chat_template,
                                                      quantization=quantization))
    return directory
