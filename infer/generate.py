"""Generation from text: load a model (a trained or converted checkpoint, a GGUF file, a Hugging Face
directory, or the packaged SmolLM2), encode prompts, decode, cut at stop strings, stream, chat.

    config, graphdef, params = load_checkpoint("runs/demo/train")
    decoder = Decoder(config, graphdef, params)
    tokenizer = run_tokenizer("runs/demo/train")
    [result] = generate(decoder, ["def fib(n):"], tokenizer, SamplingParams(max_new_tokens=40, temperature=0.7))
    for piece in stream_text(decoder, "def fib(n):", tokenizer, SamplingParams(max_new_tokens=40)):
        print(piece, end="", flush=True)

`draft=` (a Decoder of a smaller model with the same tokenizer) turns on speculative sampling.
`load_model(gguf=...)` / `load_model(model="smollm2-135m")` gives a released model with its own tokenizer
and chat template.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from flax import nnx
from jax.sharding import Mesh

from infer.decode import Decoder, Generation, _per_prompt
from infer.sampling import InferenceError, SamplingParams
from model.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    layout_metadata,
    read_layout,
    reader,
    restore_params,
    restore_target,
    save_params,
)
from model.config import ModelConfig
from model.placement import abstract_model

DEFAULT_SAMPLING = SamplingParams()


def checkpoint_config(path: str, step: int | None = None) -> ModelConfig:
    """The ModelConfig stored in a checkpoint's layout metadata (newest step unless `step`)."""
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint directory at {path!r}; give a run directory or its checkpoints/")
    with reader(directory) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"no checkpoint in {directory}")
        layout = read_layout(manager, step if step is not None else steps[-1])
    fields = dict(layout["model_config"])
    return ModelConfig(**fields)


def load_checkpoint(path: str, mesh: Mesh | None = None, step: int | None = None,
                    **changes: Any) -> tuple[ModelConfig, Any, dict]:
    """(config, graphdef, params) from a training or converted checkpoint, parameters placed shard by
    shard on `mesh` (default: a one-device mesh). `changes`: ModelConfig fields that only change how
    the parameters are used (e.g. compute_dtype)."""
    import jax

    from model.sharding import make_mesh

    config = checkpoint_config(path, step).replace(**changes)
    mesh = mesh if mesh is not None else make_mesh({"data": 1}, devices=jax.devices()[:1])
    target, layout = restore_target(config, mesh)
    params = restore_params(checkpoint_dir(path), target, step=step, layout=layout)
    graphdef = nnx.split(abstract_model(config))[0]
    return config, graphdef, params


def run_tokenizer(path: str):
    """The tokenizer of a training run: the one its data store was written with (config.yaml's data.store)."""
    from data.pipeline import store_tokenizer
    from data.tokenizer import load_tokenizer

    run = _run_config(path)
    if run.get("tokenizer"):  # a converted model: its own tokenizer file
        return load_tokenizer(run["tokenizer"])
    store = (run.get("data") or {}).get("store")
    if not store:
        raise InferenceError(f"{path}/config.yaml names no data.store; pass --tokenizer NAME_OR_FILE")
    return store_tokenizer(store)


def _run_config(path: str) -> dict:
    config_file = os.path.join(path, "config.yaml")
    if not os.path.exists(config_file):
        raise InferenceError(f"no config.yaml in {path!r}: pass the run directory, or --tokenizer NAME_OR_FILE")
    with open(config_file) as f:
        return yaml.safe_load(f) or {}


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    graphdef: Any
    params: Any
    tokenizer: Any  # a data.tokenizer.Tokenizer, or None when the source has none
    chat_template: str | None
    source: str


def load_model(checkpoint: str | None = None, gguf: str | None = None, hf: str | None = None,
               model: str | None = None, tokenizer: str | None = None, mesh: Mesh | None = None,
               preset: str | None = None) -> LoadedModel:
    """One of: a training or converted checkpoint, a GGUF file, a Hugging Face directory, a packaged
    model by name ("smollm2-135m"), or a preset with random weights (load tests and benchmarks; its
    vocabulary is the tokenizer's). `tokenizer` overrides the source's own (required for a Hugging Face
    directory, whose tokenizer.json meshlm does not read, and for a preset)."""
    from data.tokenizer import load_tokenizer

    given = [name for name, value in (("checkpoint", checkpoint), ("gguf", gguf), ("hf", hf), ("model", model),
                                      ("preset", preset)) if value]
    if len(given) != 1:
        raise InferenceError(f"give exactly one of --checkpoint, --gguf, --hf, --model, --preset "
                             f"(got {given or 'none'})")
    if preset:
        from model import get_preset, init_model

        if not tokenizer:
            raise InferenceError("--preset (random weights) needs --tokenizer: its vocabulary sets the model's")
        tok = load_tokenizer(tokenizer)
        config = get_preset(preset).replace(vocab_size=tok.vocab_size)
        graphdef, params = nnx.split(init_model(config, seed=0))
        return LoadedModel(config, graphdef, nnx.to_pure_dict(params), tok, None, f"preset {preset} (random weights)")
    template = None
    if model:
        from model.gguf import packaged_model_path

        gguf = packaged_model_path(model)
    if gguf:
        from model.gguf import chat_template, load_gguf

        config, params = load_gguf(gguf)
        own, template, source = gguf, chat_template(gguf), gguf
    elif hf:
        from model.hf import load_hf

        config, params = load_hf(hf)
        own, source = None, hf
    else:
        config, graphdef, params = load_checkpoint(checkpoint, mesh=mesh)
        run = _run_config(checkpoint) if os.path.exists(os.path.join(checkpoint, "config.yaml")) else {}
        template = run.get("chat_template")
        tok = load_tokenizer(tokenizer) if tokenizer else (run_tokenizer(checkpoint) if run else None)
        return LoadedModel(config, graphdef, params, tok, template, checkpoint)
    graphdef = nnx.split(abstract_model(config))[0]
    tok = load_tokenizer(tokenizer or own) if (tokenizer or own) else None
    return LoadedModel(config, graphdef, params, tok, template, source)


def convert_to_checkpoint(loaded: LoadedModel, out: str) -> str:
    """Save imported weights as a meshlm checkpoint (step 0) that `meshlm generate --checkpoint` loads and
    `train.init_from` fine-tunes from; config.yaml records the model, its tokenizer and chat template."""
    import jax

    from model.placement import param_layout
    from model.sharding import make_mesh

    directory = os.path.join(os.path.abspath(out), "checkpoints")
    if os.path.exists(directory) and os.listdir(directory):
        raise InferenceError(f"{directory} already holds a checkpoint: choose another --out (nothing was changed)")
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    layout = param_layout(loaded.config, mesh)
    params = jax.device_put(loaded.params, layout.shardings)
    save_params(directory, 0, params, layout_metadata(loaded.config, layout.abstract, layout.logical_axes))
    run = {"converted_from": os.path.abspath(loaded.source), "model": dataclasses.asdict(loaded.config)}
    if loaded.tokenizer is not None:
        run["tokenizer"] = loaded.tokenizer.source
    if loaded.chat_template:
        run["chat_template"] = loaded.chat_template
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(run, f, sort_keys=False)
    return directory


def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A chat template (Jinja, as in Hugging Face tokenizer configs and GGUF metadata) rendered."""
    import jinja2
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise InferenceError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise InferenceError(f"chat template: {e}") from e


def _encode(prompts: Sequence[str | Sequence[int]], tokenizer) -> list[list[int]]:
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise InferenceError(f"prompt {i} is text but no tokenizer was given")
            encoded.append(tokenizer.encode(prompt))
        else:
            encoded.append([int(t) for t in prompt])
    return encoded


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the first stop string (and whether one was found)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(decoder: Decoder, prompts: Sequence[str | Sequence[int]], tokenizer=None,
             params: SamplingParams | Sequence[SamplingParams] = DEFAULT_SAMPLING, draft: Decoder | None = None,
             draft_tokens: int = 4, truncate: bool = False, stats: list | None = None) -> list[Generation]:
    """Continue each prompt (text or token ids); text results when a tokenizer is given, cut before the
    first stop string. With `draft`, speculative sampling proposes `draft_tokens` tokens per round
    (`stats`, when a list, receives its SpeculativeStats)."""
    ids = _encode(prompts, tokenizer)
    params = _per_prompt(params, len(ids))
    if draft is not None:
        from infer.speculative import speculative_generate

        results = speculative_generate(decoder, draft, ids, params, k=draft_tokens, truncate=truncate, stats=stats)
    else:
        results = decoder.generate_ids(ids, params, truncate=truncate)
    if tokenizer is not None:
        for result, p in zip(results, params, strict=True):
            result.text, stopped = _cut_at_stop(tokenizer.decode(result.token_ids), p.stop)
            if stopped:
                result.finish_reason = "stop"
                keep = _tokens_for_text(result.token_ids, result.text, tokenizer)
                result.token_ids, result.logprobs = result.token_ids[:keep], result.logprobs[:keep]
                result.top_logprobs = result.top_logprobs[:keep]
    return results


def _tokens_for_text(ids: list[int], text: str, tokenizer) -> int:
    """The most leading tokens whose text is a prefix of `text` (the text before a stop string)."""
    keep = 0
    for n in range(1, len(ids) + 1):
        if not text.startswith(tokenizer.decode(ids[:n])):
            break
        keep = n
    return keep


class TextStream:
    """Incremental detokenisation of one continuation: `add` token ids as they come and get back the text
    that is safe to show. Text that could be the start of a stop string, and a partly decoded character,
    are held back until known not to be; at a stop string the text ends (the stop string is not shown)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, ids: Sequence[int]) -> str:
        """The new text the tokens `ids` make showable ("" when none; nothing after a stop string)."""
        if self.stopped:
            return ""
        self.ids += ids
        text, self.stopped = _cut_at_stop(self.tokenizer.decode(self.ids), self.stop)
        limit = len(text) if self.stopped else min(len(text) - self._hold, len(text.rstrip("\ufffd")))
        return self._hand_out(text, limit)

    def finish(self) -> str:
        """What is left once no more tokens come."""
        if self.stopped:
            return ""
        text, _ = _cut_at_stop(self.tokenizer.decode(self.ids), self.stop)
        return self._hand_out(text, len(text))

    def _hand_out(self, text: str, limit: int) -> str:
        if limit <= self.sent:
            return ""
        piece, self.sent = text[self.sent:limit], limit
        return piece


def stream_text(decoder: Decoder, prompt: str | Sequence[int], tokenizer, params: SamplingParams = DEFAULT_SAMPLING,
                chunk: int = 4, truncate: bool = False) -> Iterator[str]:
    """Yield the continuation's text as it is generated, `chunk` tokens per decode call (see TextStream for
    what is held back); generation stops at a stop string, which is not yielded."""
    text = TextStream(tokenizer, params.stop)
    for [new] in decoder.stream_ids(_encode([prompt], tokenizer), [params], chunk=chunk, truncate=truncate):
        piece = text.add(new)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece
