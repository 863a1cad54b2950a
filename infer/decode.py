"""The decode loop: prompts are prefilled into a KV cache, then tokens are generated on the device.

`Decoder` holds a model's parameters (on one device or laid out on a mesh by the rules table) and
compiles three functions per shape bucket (batch, prompt length, cache length): prefill, which
writes whole prompts (in chunks) into the cache and returns each row's next-token logits; and
decode, a `lax.while_loop` that samples, records and feeds one token per row per iteration until
every row is done or `steps` iterations have run. Non-streaming generation is one decode call;
streaming calls it `chunk` steps at a time and hands out what each call produced. Rows carry their
own prompt length, position, sampling options, stop ids and token budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from infer.sampling import InferenceError, RowSampling, SamplingParams, processed_logprobs, row_keys, sample
from model.cache import KVCache, cache_bytes, cache_sharding, init_cache
from model.config import ModelConfig
from model.sharding import DEFAULT_RULES, Rules, activation_sharding, check_divisible, named_sharding

PROMPT_BUCKET = 64  # prompts are padded to a multiple of this many tokens
MAX_STOP_IDS = 8  # stop token ids per row (padded with -1)


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    return 1 << max(0, math.ceil(math.log2(max(n, minimum))))


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries, per row of the batch."""

    cache: KVCache
    logits: jax.Array  # [batch, vocab] float32: the next token's logits
    lengths: jax.Array  # [batch] int32: tokens in the cache = the slot (and position) of the next token
    generated: jax.Array  # [batch] int32: tokens generated so far
    done: jax.Array  # [batch] bool
    max_new: jax.Array  # [batch] int32: each row's token budget
    stop_ids: jax.Array  # [batch, MAX_STOP_IDS] int32, -1 padded
    tokens: jax.Array  # [batch, out_length] int32: generated tokens
    logprobs: jax.Array  # [batch, out_length] float32: their log-probabilities under the model
    top_ids: jax.Array  # [batch, out_length, n_top] int32: the most likely alternatives
    top_logprobs: jax.Array  # [batch, out_length, n_top] float32
    step: jax.Array  # [] int32: iterations run


@dataclasses.dataclass
class Generation:
    """One request's result."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]  # per token, (id, log-prob) of the top alternatives
    finish_reason: str  # "stop" (a stop id or string) or "length"
    text: str | None = None


class OnMesh:
    """What a Decoder and an Engine share: a model config laid out on an optional mesh by a rules table."""

    config: ModelConfig
    mesh: Mesh | None
    rules: Rules

    @property
    def batch_shards(self) -> int:
        """Devices the batch is split over (data x fsdp); 1 without a mesh."""
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape)

    def _context(self):
        return activation_sharding(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _put(self, x: np.ndarray | jax.Array, axes: tuple[str, ...]):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, named_sharding(self.mesh, axes, self.rules))

    def _new_cache(self, batch: int, length: int) -> KVCache:
        if self.mesh is None:
            return init_cache(self.config, batch, length)
        return jax.jit(lambda: init_cache(self.config, batch, length),
                       out_shardings=cache_sharding(self.config, self.mesh, self.rules))()


class Decoder(OnMesh):
    """Prefill + on-device decode for one model, on one device or a mesh.

    graphdef, params: `nnx.split(model)`'s graph and a parameter dict (e.g. from `restore_params`).
    mesh: lay parameters, cache and batch out on it by `rules` (parameters are moved if they are not
    there already). cache_length: slots per row (default: bucketed per call, at most max_seq_len).
    """

    def __init__(self, config: ModelConfig, graphdef: Any, params: Any, mesh: Mesh | None = None,
                 rules: Rules = DEFAULT_RULES, prefill_chunk: int = 512):
        self.config, self.graphdef, self.mesh, self.rules = config, graphdef, mesh, rules
        self.prefill_chunk = prefill_chunk
        self.params = place_params(config, params, mesh, rules)
        self.traces = {"prefill": 0, "decode": 0}  # how often each function was traced (compiled)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("chunk",), donate_argnames=("cache",))
        self._decode = jax.jit(self._decode_fn, static_argnames=("n_top",), donate_argnames=("state",))

    # ------------------------------------------------------------------ compiled pieces

    def _prefill_fn(self, params, tokens, lengths, cache, chunk):
        """tokens [batch, prompt_bucket] (right-padded), lengths [batch] -> (next-token logits, cache)."""
        self.traces["prefill"] += 1
        with self._context():
            model = nnx.merge(self.graphdef, params)
            return prefill_logits(model, tokens, jnp.zeros_like(lengths), lengths, cache, chunk)

    def _decode_fn(self, params, state: DecodeState, rows: RowSampling, steps, n_top):
        """Run up to `steps` iterations: sample from the logits, record, feed the token back."""
        self.traces["decode"] += 1
        with self._context():
            model = nnx.merge(self.graphdef, params)
            out_length = state.tokens.shape[1]
            end = state.step + steps
            head = model.head()  # once per call, not per step
            layers = model.layer_params()  # likewise: each layer's weights as their own arrays

            def cond(s: DecodeState):
                return (s.step < end) & ~jnp.all(s.done)

            def body(s: DecodeState) -> DecodeState:
                raw = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
                token = sample(processed_logprobs(s.logits, rows), row_keys(rows, s.generated))
                active = ~s.done
                slot = jnp.where(active, s.generated, out_length)  # out of range: dropped
                rows_index = jnp.arange(token.shape[0])
                chosen = jnp.take_along_axis(raw, token[:, None], axis=-1)[:, 0]
                s = s.replace(tokens=s.tokens.at[rows_index, slot].set(token, mode="drop"),
                              logprobs=s.logprobs.at[rows_index, slot].set(chosen, mode="drop"))
                if n_top:
                    top_lp, top_id = jax.lax.top_k(raw, n_top)
                    s = s.replace(top_ids=s.top_ids.at[rows_index, slot].set(top_id.astype(jnp.int32), mode="drop"),
                                  top_logprobs=s.top_logprobs.at[rows_index, slot].set(top_lp, mode="drop"))
                generated = s.generated + active
                stopped = jnp.any(token[:, None] == s.stop_ids, axis=-1)
                done = s.done | (active & (stopped | (generated >= s.max_new)))
                hidden, cache = model.with_cache(token[:, None], s.lengths[:, None], s.cache, layer_params=layers)
                return s.replace(cache=cache, logits=model.logits(hidden, head)[:, 0], lengths=s.lengths + active,
                                 generated=generated, done=done, step=s.step + 1)

            return jax.lax.while_loop(cond, body, state)

    # ------------------------------------------------------------------ host side

    def _batch_bucket(self, n: int) -> int:
        shards = self.batch_shards
        size = max(bucket(n), shards)
        return -(-size // shards) * shards

    def check(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], truncate: bool = False,
              extra: int = 0) -> list[list[int]]:
        """Validate prompts against the context (max_seq_len); with `truncate`, keep each prompt's last
        tokens that fit. `extra`: slots needed past the last generated token (speculative drafts)."""
        if len(prompts) == 0:
            raise InferenceError("prompts: give at least one prompt")
        if len(params) != len(prompts):
            raise InferenceError(f"sampling: {len(params)} SamplingParams for {len(prompts)} prompts")
        context = self.config.max_seq_len
        checked = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            if len(p.stop_token_ids) > MAX_STOP_IDS:
                raise InferenceError(f"stop_token_ids: at most {MAX_STOP_IDS}, got {len(p.stop_token_ids)}")
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise InferenceError(f"prompt {i} is empty; give at least one token")
            bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InferenceError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                                     f"(0..{self.config.vocab_size - 1})")
            room = context - p.max_new_tokens - extra
            if room < 1:
                raise InferenceError(f"max_new_tokens ({p.max_new_tokens}) leaves no room for a prompt in the "
                                     f"model's context of {context} tokens")
            if len(prompt) > room:
                if not truncate:
                    raise InferenceError(
                        f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={p.max_new_tokens} the "
                        f"model's context of {context} tokens leaves room for {room}. Shorten the prompt, "
                        "lower max_new_tokens, or pass truncate=True (--truncate) to keep its last tokens")
                prompt = prompt[-room:]
            checked.append(prompt)
        return checked

    def start(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], out_length: int,
              extra: int = 0) -> tuple[DecodeState, RowSampling]:
        """Prefill `prompts` (already checked) into a fresh cache: the state the decode loop starts from."""
        n = len(prompts)
        batch = self._batch_bucket(n)
        longest = max(len(p) for p in prompts)
        prompt_bucket = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, self.config.max_seq_len)
        need = max(len(p) + q.max_new_tokens for p, q in zip(prompts, params, strict=True)) + extra
        cache_length = min(max(bucket(need, 128), prompt_bucket), self.config.max_seq_len + extra)
        tokens = np.zeros((batch, prompt_bucket), np.int32)
        lengths = np.ones((batch,), np.int32)
        for i, prompt in enumerate(prompts):
            tokens[i, :len(prompt)] = prompt
            lengths[i] = len(prompt)
        if self.mesh is not None:
            check_divisible("decode batch", (batch, prompt_bucket), ("batch", "length"), self.mesh, self.rules)
        cache = self._new_cache(batch, cache_length)
        chunk = min(self.prefill_chunk, prompt_bucket)
        logits, cache = self._prefill(self.params, self._put(tokens, ("batch", "length")),
                                      self._put(lengths, ("batch",)), cache, chunk=chunk)
        n_top = max(p.logprobs for p in params)
        stop_ids = np.full((batch, MAX_STOP_IDS), -1, np.int32)
        max_new = np.ones((batch,), np.int32)
        for i, p in enumerate(params):
            stop_ids[i, :len(p.stop_token_ids)] = p.stop_token_ids
            max_new[i] = p.max_new_tokens
        done = np.arange(batch) >= n  # padding rows are done from the start
        state = DecodeState(
            cache=cache, logits=logits, lengths=self._put(lengths, ("batch",)),
            generated=self._put(np.zeros(batch, np.int32), ("batch",)), done=self._put(done, ("batch",)),
            max_new=self._put(max_new, ("batch",)), stop_ids=self._put(stop_ids, ("batch", None)),
            tokens=self._put(np.zeros((batch, out_length), np.int32), ("batch", None)),
            logprobs=self._put(np.zeros((batch, out_length), np.float32), ("batch", None)),
            top_ids=self._put(np.zeros((batch, out_length, n_top), np.int32), ("batch", None, None)),
            top_logprobs=self._put(np.zeros((batch, out_length, n_top), np.float32), ("batch", None, None)),
            step=jnp.zeros((), jnp.int32),
        )
        rows = RowSampling.from_params(list(params), batch)
        if self.mesh is not None:
            rows = jax.device_put(rows, named_sharding(self.mesh, ("batch",), self.rules))
        return state, rows

    def decode(self, state: DecodeState, rows: RowSampling, steps: int) -> DecodeState:
        """Up to `steps` more decode iterations (fewer when every row is done)."""
        n_top = state.top_ids.shape[2]  # the alternatives `start` made room for
        return self._decode(self.params, state, rows, jnp.asarray(steps, jnp.int32), n_top=n_top)

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                     truncate: bool = False) -> list[Generation]:
        """Continue every prompt (token ids) on the device, in one batch; no stop strings (see generate.py)."""
        prompts, params, state, rows = self._begin(prompts, params, truncate)
        state = self.decode(state, rows, state.tokens.shape[1])
        return _collect(state, prompts, params)

    def _begin(self, prompts, params, truncate: bool) -> tuple[list[list[int]], list[SamplingParams], DecodeState,
                                                              RowSampling]:
        """Check the requests and prefill them: what generate_ids and stream_ids start from."""
        params = _per_prompt(params, len(prompts))
        prompts = self.check(prompts, params, truncate)
        state, rows = self.start(prompts, params, max(p.max_new_tokens for p in params))
        return prompts, params, state, rows

    def stream_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                   chunk: int = 8, truncate: bool = False) -> Iterator[list[list[int]]]:
        """Yield, every `chunk` decode steps, each row's new token ids (stop ids excluded), until all are done.
        The decode function is the same compiled one as `generate_ids` uses."""
        if chunk < 1:
            raise InferenceError(f"chunk must be a positive integer, got {chunk!r}")
        prompts, params, state, rows = self._begin(prompts, params, truncate)
        sent = [0] * len(prompts)
        while True:
            state = self.decode(state, rows, chunk)
            tokens, generated, done = jax.device_get((state.tokens, state.generated, state.done))
            new = []
            for i, p in enumerate(params):
                ids = [int(t) for t in tokens[i, sent[i]:generated[i]]]
                if done[i]:
                    ids, _ = finish(ids, p)
                sent[i] = int(generated[i])
                new.append(ids)
            yield new
            if bool(done[:len(prompts)].all()):
                return

    def cache_bytes(self, batch: int, length: int) -> int:
        return cache_bytes(self.config, batch, length)


def place_params(config: ModelConfig, params: Any, mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> Any:
    """A parameter dict on the device: laid out on `mesh` by the rules (shard by shard), or on the
    default device (host numpy weights are copied once, not at every call)."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if mesh is None:
        return jax.device_put(params)
    from model.placement import param_layout

    return jax.device_put(params, param_layout(config, mesh, rules).shardings)


def prefill_logits(model: Any, tokens: jax.Array, starts: jax.Array, lengths: jax.Array, cache: KVCache, chunk: int,
                   layer_params: list | None = None) -> tuple[jax.Array, KVCache]:
    """Write new tokens into a cache, `chunk` at a time; each row's last new token's logits.

    tokens [batch, new] (right-padded): row b's tokens go to slots starts[b] .. starts[b] + lengths[b] - 1
    (slots before starts[b] already hold that row's earlier tokens). -> (logits [batch, vocab], cache)."""
    batch, total = tokens.shape
    last = jnp.zeros((batch, model.config.d_model), model.config.compute_jnp_dtype)
    for start in range(0, total, chunk):  # chunked prefill: a static loop over chunks
        size = min(chunk, total - start)
        positions = starts[:, None] + start + jnp.arange(size, dtype=jnp.int32)[None, :]
        hidden, cache = model.with_cache(tokens[:, start:start + size], positions, cache, layer_params=layer_params)
        index = lengths - 1 - start
        here = (index >= 0) & (index < size)
        picked = jnp.take_along_axis(hidden, jnp.clip(index, 0, size - 1)[:, None, None], axis=1)[:, 0]
        last = jnp.where(here[:, None], picked, last)
    return model.logits(last[:, None])[:, 0], cache


def _per_prompt(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    return list(params)


def finish(ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
    """A finished row's tokens without its final stop id, and why it finished ("stop" or "length")."""
    if ids and ids[-1] in params.stop_token_ids:
        return ids[:-1], "stop"
    return ids, "length"


def _collect(state: DecodeState, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
    tokens, logprobs, top_ids, top_lps, generated = jax.device_get(
        (state.tokens, state.logprobs, state.top_ids, state.top_logprobs, state.generated))
    results = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        ids, reason = finish([int(t) for t in tokens[i, :int(generated[i])]], p)
        n = len(ids)
        results.append(Generation(
            prompt_ids=list(prompt), token_ids=ids, logprobs=[float(x) for x in logprobs[i, :n]],
            top_logprobs=[[(int(a), float(b)) for a, b in zip(top_ids[i, j, :p.logprobs], top_lps[i, j, :p.logprobs],
                                                             strict=True)] for j in range(n)],
            finish_reason=reason))
    return results
