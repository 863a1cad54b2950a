"""Parameters on disk: Orbax checkpoints that restore onto any mesh, and the layout metadata stored with them.

A checkpoint directory holds one folder per step; each step is an Orbax composite of items:

    <directory>/<step>/
        params/      the parameters: an Orbax PyTree (OCDBT + zarr); every process writes its own shards
        layout/      JSON: format, version, layer stacking, each parameter's shape, dtype and logical axes, the
                     ModelConfig, the tokenizer and chat template (`layout_metadata`)
        checksums/   JSON: a fingerprint of every array, checked after a restore (Orbax does not notice flipped
                     bytes inside a compressed chunk)
        opt_state/ train_meta/ loader/ config/   added by train/checkpoint.py
        commit_success.txt, _CHECKPOINT_METADATA written by Orbax

Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>`, puts `commit_success.txt` into it and renames it to
`<step>`; unrenamed folders are never listed as steps. A step folder without `commit_success.txt` (a partial copy,
a half-written step on a file system without atomic renames) is treated as half-written here.

Restoring reads the layout first and compares it with the model's (`check_layout`), so a checkpoint of another
model fails with a message naming the differences before Orbax touches an array. Arrays come back with the
shardings of the target (`jax.ShapeDtypeStruct(..., sharding=...)` leaves): each device reads only its shard.
The newest step that does not read back whole is passed over, with a warning, for the one before it.

    target, layout = restore_target(get_preset("tiny"), make_mesh({"tensor": 8}))
    params = restore_params("runs/train/tiny/checkpoints", target, layout=layout)
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from model.config import EXECUTION_FIELDS, ModelConfig
from model.errors import ModelError
from model.placement import param_layout
from model.sharding import DEFAULT_RULES, Rules

FORMAT = "meshlm"
FORMAT_VERSION = 1
LAYER_AXIS = "layers"  # stacked layers: one array per parameter kind, layers on this leading logical axis
PARAMS, LAYOUT, CHECKSUMS = "params", "layout", "checksums"  # Orbax item names; train/ adds its own
QUANTIZATION = "quantization"  # the layout's key for quantised weights' static fields (model/quant.py)
COMMIT_MARKER = ocp.path.atomicity.COMMIT_SUCCESS_FILE  # "commit_success.txt"
SHOWN_PATHS = 10  # missing / extra parameter paths listed in an error before "and N more"

T = TypeVar("T")


class CheckpointError(ModelError):
    """A checkpoint that does not fit the model restoring it, or none that can be read."""


class CheckpointWarning(UserWarning):
    """A checkpoint step was passed over because it is half-written or does not read back whole."""


class UnreadableStep(RuntimeError):
    """A step that is half-written or whose contents do not read back as they were written."""


# ----------------------------------------------------------------------------- layout metadata


def _flatten(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """{"layers/attn/wq": leaf, ...} for a nested tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def layout_metadata(config: ModelConfig, abstract_params: dict, logical_axes: dict, tokenizer: str | None = None,
                    chat_template: str | None = None, quantization: dict[str, dict] | None = None) -> dict:
    """JSON-able description of how `config`'s parameters are laid out: what a checkpoint must match.

    abstract_params: nested dict of arrays or ShapeDtypeStructs; logical_axes: the same nesting with a tuple
    of logical axis names per parameter (what `nnx.to_pure_dict` gives for both). tokenizer (a description
    data.tokenizer.load_tokenizer reads) and chat_template (Jinja text) say how the model's text is written;
    they are recorded, never compared (model.load.checkpoint_metadata reads them). quantization: {path: static
    fields} of quantised weights (model.quant.as_arrays), whose arrays `abstract_params` holds as dicts; recorded
    only when there are any, and compared.
    """
    shapes = _flatten(abstract_params)
    axes = _flatten(logical_axes, is_leaf=lambda x: isinstance(x, tuple))
    if set(shapes) != set(axes):
        raise ValueError(f"parameters and logical axes name different paths: {sorted(set(shapes) ^ set(axes))}")
    params = {path: {"shape": list(leaf.shape), "dtype": jnp.dtype(leaf.dtype).name, "logical_axes": list(axes[path])}
              for path, leaf in shapes.items()}
    stacked = any(names[:1] == (LAYER_AXIS,) for names in axes.values())
    layout = {"format": FORMAT, "version": FORMAT_VERSION, "stacking": "stacked" if stacked else "unstacked",
              "layer_axis": LAYER_AXIS, "params": params, "model_config": dataclasses.asdict(config),
              "tokenizer": tokenizer, "chat_template": chat_template}
    if quantization:
        layout[QUANTIZATION] = quantization
    return json.loads(json.dumps(layout))  # tuples -> lists: compares equal to what a checkpoint reads back


def _show(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)


def _listed(paths: list[str]) -> str:
    more = len(paths) - SHOWN_PATHS
    return ", ".join(paths[:SHOWN_PATHS]) + (f" and {more} more" if more > 0 else "")


def _config_differences(saved: dict, expected: dict) -> list[str]:
    """Every ModelConfig field that differs. The execution fields that checkpoints written before the split
    stored beside the architecture (EXECUTION_FIELDS) are not part of what a model is, and are passed over."""
    old = set(EXECUTION_FIELDS) - set(expected)
    names = [*expected, *(name for name in saved if name not in expected and name not in old)]
    return [f"{name}: checkpoint {saved.get(name)!r}, model {expected.get(name)!r}" for name in names
            if saved.get(name) != expected.get(name)]


def _param_differences(saved: dict, expected: dict) -> list[str]:
    """Paths missing or extra, then each parameter whose shape (or dtype, logical axes) differs."""
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    lines = [f"missing from the checkpoint: {_listed(missing)}"] if missing else []
    lines += [f"in the checkpoint but not in the model: {_listed(extra)}"] if extra else []
    for path in sorted(set(saved) & set(expected)):
        for field in ("shape", "dtype", "logical_axes"):
            ours, theirs = expected[path].get(field), saved[path].get(field)
            if ours is not None and theirs != ours:
                label = path if field == "shape" else f"{path} {field.replace('_', ' ')}"
                lines.append(f"{label}: checkpoint {_show(theirs)}, model {_show(ours)}")
    return lines


def layout_differences(saved: dict, expected: dict) -> list[str]:
    """What differs between a checkpoint's layout and the expected one, one line each (empty: they fit).

    Only what `expected` states is compared: a layout without "model_config", or parameters without
    "dtype" / "logical_axes", leaves those out (see `restore_params`).
    """
    lines = [f"{key}: checkpoint {saved.get(key)!r}, model {expected[key]!r}"
             for key in ("format", "version", "stacking", "layer_axis")
             if key in expected and saved.get(key) != expected[key]]
    if "model_config" in expected:
        lines += _config_differences(saved.get("model_config") or {}, expected["model_config"])
    lines += _quantization_differences(saved.get(QUANTIZATION) or {}, expected.get(QUANTIZATION) or {})
    return lines + _param_differences(saved.get("params") or {}, expected.get("params") or {})


def _quantization_differences(saved: dict, expected: dict) -> list[str]:
    return [f"{path} quantisation: checkpoint {describe_quantized(saved.get(path))}, model "
            f"{describe_quantized(expected.get(path))}"
            for path in sorted(set(saved) | set(expected)) if saved.get(path) != expected.get(path)]


def describe_quantized(fields: Any) -> str:
    """'int4 (group 32) of [30, 576, 9, 64]' for a quantised weight's record in a layout; 'float' for none."""
    if not fields:
        return "float"
    if not isinstance(fields, dict):
        return repr(fields)
    return f"{fields.get('format')} (group {fields.get('group')}) of {fields.get('shape')}"


def describe_model(layout: dict) -> str:
    """'ModelConfig(vocab_size=256, d_model=64, n_layers=2, ...)': the shape-defining fields of a layout."""
    config = layout.get("model_config") or {}
    names = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "tie_embeddings",
             "param_dtype")
    return "ModelConfig(" + ", ".join(f"{name}={config.get(name)!r}" for name in names if name in config) + ")"


def check_layout(saved: dict, expected: dict, where: str) -> None:
    """Raise a CheckpointError naming every difference if the checkpoint at `where` holds another model. A
    quantised checkpoint restored as float parameters (training from it, or an old reader) is one line."""
    quantized = saved.get(QUANTIZATION) or {}
    if quantized and not expected.get(QUANTIZATION) and isinstance(quantized, dict):
        path = sorted(quantized)[0]
        more = f" and {len(quantized) - 1} more" if len(quantized) > 1 else ""
        raise CheckpointError(
            f"checkpoint {where} holds quantised weights ({path}: {describe_quantized(quantized[path])}{more}) "
            "where float parameters are expected: load it for inference as it is (meshlm generate/chat/serve "
            "--checkpoint, model.load.load_model), or convert the float source again without --quantize to train "
            "from it")
    lines = layout_differences(saved, expected)
    if lines:
        raise CheckpointError(
            f"checkpoint {where} holds a different model: it holds {describe_model(saved)}. Differences:\n  "
            + "\n  ".join(lines)
            + "\nRestore it with the model it holds, or start this run in a fresh directory."
        )


# ----------------------------------------------------------------------------- checksums


def _fingerprint(x: jax.Array) -> jax.Array:
    """A uint32 hash of an array's bits that does not depend on its sharding: sum of bits * (2 * index + 1)."""
    width = jnp.dtype(x.dtype).itemsize
    if width not in (1, 2, 4):
        raise ValueError(f"checksums cover 8, 16 and 32-bit arrays, not {x.dtype}")
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * width}")).astype(jnp.uint32)
    index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))


def checksums(tree: Any) -> dict[str, int]:
    """{path: uint32 fingerprint} of every array of `tree`; equal on any mesh for equal values."""
    return {path: int(value) for path, value in _flatten(jax.device_get(_fingerprints(tree))).items()}


def verify_checksums(tree: Any, saved: dict[str, int], item: str, paths: list[str] | None = None) -> None:
    """Raise UnreadableStep naming the arrays whose restored bits differ from what was saved (all of them, or
    those in `paths`)."""
    restored = checksums(tree)
    paths = sorted(set(restored) | set(saved)) if paths is None else paths
    bad = [path for path in paths if restored.get(path) != saved.get(path)]
    if bad:
        raise UnreadableStep(f"{item}: {_listed(bad)} read back different from what was written (checksum)")


# ----------------------------------------------------------------------------- reading steps


def absolute(directory: epath.PathLike) -> epath.Path:
    """Orbax wants absolute paths: a local relative path is taken from the working directory."""
    path = os.fspath(directory)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def checkpoint_dir(path: str) -> str:
    """A run directory (holding checkpoints/) or a checkpoints directory -> the checkpoints directory."""
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) else path


def step_path(directory: epath.PathLike, step: int) -> epath.Path:
    return absolute(directory) / str(step)


def is_committed(directory: epath.PathLike, step: int) -> bool:
    """Whether Orbax finished the step: its folder holds the commit marker."""
    return (step_path(directory, step) / COMMIT_MARKER).exists()


def read_layout(manager: ocp.CheckpointManager, step: int) -> dict:
    """A step's layout metadata (no arrays are read)."""
    return manager.restore(step, args=ocp.args.Composite(**{LAYOUT: ocp.args.JsonRestore()}))[LAYOUT]


def _short(error: BaseException) -> str:
    """First line of an error, cut short: TensorStore errors carry a whole spec."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:200]}"


def restore_newest(manager: ocp.CheckpointManager, restore_step: Callable[[int], T]) -> tuple[int, T, list[int]] | None:
    """(step, restore_step(step), steps passed over) for the newest step that restores; None if there are no steps.

    A step without the commit marker, or whose restore raises anything but a CheckpointError, is passed over
    with a CheckpointWarning naming it and the step used instead. A CheckpointError (another model) is raised
    at once: an older step would not fit either.
    """
    failures: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            if not is_committed(manager.directory, step):
                raise UnreadableStep(f"no {COMMIT_MARKER}: half-written")
            value = restore_step(step)
        except CheckpointError:
            raise
        except Exception as error:  # any failure to read a step means: try the one before
            failures.append((step, _short(error)))
            continue
        if failures:
            bad = "; ".join(f"step {s}: {why}" for s, why in failures)
            warnings.warn(f"checkpoint {manager.directory}: passed over unreadable {bad}. Restored step {step} "
                          "instead", CheckpointWarning, stacklevel=3)
        return step, value, [s for s, _ in failures]
    if failures:
        bad = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise CheckpointError(f"no checkpoint step in {manager.directory} can be read: {bad}")
    return None


def reader(directory: epath.PathLike) -> ocp.CheckpointManager:
    """A CheckpointManager that only reads (safe beside a run that is writing)."""
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    return ocp.CheckpointManager(absolute(directory), options=options)


# ----------------------------------------------------------------------------- parameters


def restore_target(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                   quantization: dict[str, dict] | None = None) -> tuple[dict, dict]:
    """(abstract parameters carrying their shardings on `mesh`, the layout they expect): for `restore_params`.
    quantization: the quantised weights a checkpoint's layout records (its arrays are restored as dicts;
    model.quant.from_arrays makes them QuantizedWeights)."""
    layout = param_layout(config, mesh, rules, quantization=quantization)  # checks divisibility
    return layout.target, layout_metadata(config, layout.abstract, layout.logical_axes, quantization=quantization)


def save_params(directory: epath.PathLike, step: int, params: dict, layout: dict) -> None:
    """Write a parameters-only checkpoint step (e.g. imported weights); returns when it is on disk."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(absolute(directory), options=options) as manager:
        manager.save(step, force=True, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(params),
            LAYOUT: ocp.args.JsonSave(layout),
            CHECKSUMS: ocp.args.JsonSave({PARAMS: checksums(params)}),
        }))


def _shapes_layout(abstract_params: dict) -> dict:
    return {"params": {path: {"shape": list(leaf.shape)} for path, leaf in _flatten(abstract_params).items()}}


def restore_params(directory: epath.PathLike, abstract_params: dict, step: int | None = None,
                   layout: dict | None = None) -> dict:
    """Only the parameters of a checkpoint (from `save_params` or train/checkpoint.py), placed shard by shard
    onto the shardings of `abstract_params` (ShapeDtypeStructs with `sharding=`; dtypes may differ: values
    are cast).

    step: None restores the newest readable step. layout: the model's (`restore_target`), compared in full;
    without it only parameter paths and shapes are checked.
    """
    expected = layout if layout is not None else _shapes_layout(abstract_params)
    dtypes = {path: jnp.dtype(leaf.dtype).name for path, leaf in _flatten(abstract_params).items()}

    def read(manager: ocp.CheckpointManager, at: int) -> dict:
        saved = read_layout(manager, at)
        check_layout(saved, expected, str(step_path(directory, at)))
        restored = manager.restore(at, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(abstract_params), CHECKSUMS: ocp.args.JsonRestore()}))
        uncast = [path for path, dtype in dtypes.items() if saved["params"][path]["dtype"] == dtype]
        verify_checksums(restored[PARAMS], restored[CHECKSUMS][PARAMS], PARAMS, uncast)  # cast values differ
        return restored[PARAMS]

    with reader(directory) as manager:
        if step is not None:
            if step not in manager.all_steps():
                raise CheckpointError(f"no step {step} in {directory}; it has steps {sorted(manager.all_steps())}")
            return read(manager, step)
        found = restore_newest(manager, lambda at: read(manager, at))
    if found is None:
        raise CheckpointError(f"no checkpoint in {directory}")
    return found[1]

