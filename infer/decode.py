"""The decode loop: prompts are prefilled into a KV cache, then tokens are generated on the device.

`Decoder` holds a model's parameters (on one device or laid out on a mesh by the rules table) and
compiles two functions per shape bucket (batch, prompt length, cache length):
- start: writes whole prompts (in chunks) into a fresh cache and draws each row's first token;
- decode: a `lax.while_loop` of `decode_step` (feed each row's newest token, get the next logits) and
  `draw`, recording every token, until every row is done (`row_done`) or `steps` iterations have run.
Non-streaming generation is one decode call; streaming calls it `chunk` steps at a time and hands out what
each call produced. Rows carry their own prompt length, position, sampling options, stop ids and budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from infer.sampling import (
    MAX_LOGPROBS,
    MAX_STOP_IDS,
    Draw,
    InferenceError,
    RowSampling,
    SamplingParams,
    check_request,
    draw,
    finish_reason,
    row_done,
    row_keys,
)
from infer.step import OnMesh, StepWeights, bucket, decode_step, prefill
from model.cache import KVCache, cache_bytes
from model.config import ModelConfig
from model.sharding import DEFAULT_RULES, Rules, check_divisible

PROMPT_BUCKET = 64  # prompts are padded to a multiple of this many tokens


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries, per row of the batch."""

    cache: KVCache
    last: jax.Array  # [batch] int32: the newest token, drawn but not yet in the cache
    lengths: jax.Array  # [batch] int32: tokens in the cache = the slot (and position) of `last`
    generated: jax.Array  # [batch] int32: tokens drawn so far (`last` included)
    done: jax.Array  # [batch] bool
    max_new: jax.Array  # [batch] int32: each row's token budget
    stop_ids: jax.Array  # [batch, MAX_STOP_IDS] int32, -1 padded
    tokens: jax.Array  # [batch, out_length] int32: generated tokens
    logprobs: jax.Array  # [batch, out_length] float32: their log-probabilities under the model
    top_ids: jax.Array  # [batch, out_length, n_top] int32: the most likely alternatives
    top_logprobs: jax.Array  # [batch, out_length, n_top] float32
    step: jax.Array  # [] int32: iterations run

    def record(self, drawn: Draw) -> DecodeState:
        """Append each active row's drawn token (and its log-probabilities) and apply the row-done rule."""
        active = ~self.done
        slot = jnp.where(active, self.generated, self.tokens.shape[1])  # out of range: dropped
        rows = jnp.arange(self.tokens.shape[0])
        generated = self.generated + active
        return self.replace(
            last=jnp.where(active, drawn.tokens, self.last), generated=generated,
            done=self.done | (active & row_done(drawn.tokens, generated, self.stop_ids, self.max_new)),
            tokens=self.tokens.at[rows, slot].set(drawn.tokens, mode="drop"),
            logprobs=self.logprobs.at[rows, slot].set(drawn.logprobs, mode="drop"),
            top_ids=self.top_ids.at[rows, slot].set(drawn.top_ids, mode="drop"),
            top_logprobs=self.top_logprobs.at[rows, slot].set(drawn.top_logprobs, mode="drop"))


@dataclasses.dataclass
class Generation:
    """One request's result."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]  # per token, (id, log-prob) of the top alternatives
    finish_reason: str  # "stop" (a stop id or string) or "length"
    text: str | None = None


class Decoder(OnMesh):
    """Prefill + on-device decode for one model, on one device or a mesh.

    graphdef, params: `nnx.split(model)`'s graph and a parameter dict or nnx.State (e.g. from `load_model`).
    mesh: lay parameters, cache and batch out on it by `rules` (parameters are moved if they are not there
    already). prefill_chunk: prompt tokens run through the model at once. allowed: bool [vocab] of the token ids
    that may be drawn (e.g. `Tokenizer.valid_ids`: ids the tokenizer cannot decode are never drawn); None:
    all. The cache of each call is bucketed to what its rows need, at most max_seq_len (+ a draft's room).
    kv_cache: "auto" (the compute dtype) or "int8" (a scale per row, kv head and position; model/cache.py).
    """

    def __init__(self, config: ModelConfig, graphdef: Any, params: Any, mesh: Mesh | None = None,
                 rules: Rules = DEFAULT_RULES, prefill_chunk: int = 512, allowed: np.ndarray | None = None,
                 kv_cache: str = "auto"):
        super().__init__(config, graphdef, params, mesh, rules, allowed, kv_cache)
        self.prefill_chunk = prefill_chunk
        self.traces = {"prefill": 0, "decode": 0}  # how often each function was traced (compiled)
        self._start = jax.jit(self._start_fn, static_argnames=("chunk", "n_top"), donate_argnames=("cache",))
        self._decode = jax.jit(self._decode_fn, static_argnames=("n_top",), donate_argnames=("state",))

    # ------------------------------------------------------------------ compiled pieces

    def _start_fn(self, outer, weights: StepWeights, tokens, lengths, cache, rows: RowSampling, state: DecodeState,
                  chunk, n_top):
        """Prompts tokens [batch, prompt_bucket] (right-padded) of `lengths` into the cache; each row's first
        token drawn and recorded into `state` (whose cache is replaced)."""
        self.traces["prefill"] += 1
        with self.context():
            logits, cache = prefill(self.model(outer), tokens, jnp.zeros_like(lengths), lengths, cache, chunk, weights)
            drawn = draw(logits, rows, row_keys(rows, state.generated), self.allowed, n_top)
            return state.replace(cache=cache, lengths=lengths).record(drawn)

    def _decode_fn(self, outer, weights: StepWeights, state: DecodeState, rows: RowSampling, steps, n_top):
        """Up to `steps` iterations of the decode step: feed each row's newest token, draw and record the next."""
        self.traces["decode"] += 1
        with self.context():
            model = self.model(outer)
            end = state.step + steps

            def cond(s: DecodeState):
                return (s.step < end) & ~jnp.all(s.done)

            def body(s: DecodeState) -> DecodeState:
                logits, cache = decode_step(model, weights, s.last[:, None], s.lengths[:, None], s.cache)
                drawn = draw(logits[:, 0], rows, row_keys(rows, s.generated), self.allowed, n_top)
                active = ~s.done
                s = s.replace(cache=cache, lengths=s.lengths + active, step=s.step + 1)
                return s.record(drawn)

            return jax.lax.while_loop(cond, body, state)

    # ------------------------------------------------------------------ host side

    def _batch_bucket(self, n: int) -> int:
        shards = self.batch_shards
        size = max(bucket(n), shards)
        return -(-size // shards) * shards

    def check(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], truncate: bool = False,
              extra: int = 0) -> list[list[int]]:
        """Each prompt checked against the context (max_seq_len) by `check_request`; with `truncate`, its last
        tokens that fit. `extra`: positions needed past the last generated token (speculative drafts)."""
        if len(prompts) == 0:
            raise InferenceError("prompts: give at least one prompt")
        if len(params) != len(prompts):
            raise InferenceError(f"sampling: {len(params)} SamplingParams for {len(prompts)} prompts")
        return [check_request(prompt, p, vocab_size=self.config.vocab_size, context=self.config.max_seq_len,
                              extra=extra, truncate=truncate, prompt_name=f"prompt {i}")
                for i, (prompt, p) in enumerate(zip(prompts, params, strict=True))]

    def start(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], out_length: int,
              extra: int = 0) -> tuple[DecodeState, RowSampling]:
        """Prefill `prompts` (already checked) into a fresh cache and draw each row's first token: the state
        the decode loop continues. extra: cache positions to leave past each row's budget."""
        n = len(prompts)
        batch = self._batch_bucket(n)
        out_length = bucket(out_length, 16)  # one compiled loop serves many budgets (rows stop at their own)
        longest = max(len(p) for p in prompts)
        prompt_bucket = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, self.config.max_seq_len)
        need = max(len(p) + q.max_new_tokens for p, q in zip(prompts, params, strict=True)) + extra
        cache_length = min(max(bucket(need, 128), prompt_bucket), self.config.max_seq_len + extra)
        tokens = np.zeros((batch, prompt_bucket), np.int32)
        lengths = np.ones((batch,), np.int32)
        stop_ids = np.full((batch, MAX_STOP_IDS), -1, np.int32)
        max_new = np.ones((batch,), np.int32)
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            tokens[i, :len(prompt)] = prompt
            lengths[i] = len(prompt)
            stop_ids[i, :len(p.stop_token_ids)] = p.stop_token_ids
            max_new[i] = p.max_new_tokens
        if self.mesh is not None:
            check_divisible("decode batch", (batch, prompt_bucket), ("batch", "length"), self.mesh, self.rules)
        n_top = MAX_LOGPROBS if any(p.logprobs for p in params) else 0  # each row reports its own count
        batch_axes = ("batch", None, None)
        state = DecodeState(
            cache=None, last=self.put(np.zeros(batch, np.int32), ("batch",)), lengths=None,
            generated=self.put(np.zeros(batch, np.int32), ("batch",)),
            done=self.put(np.arange(batch) >= n, ("batch",)),  # padding rows are done from the start
            max_new=self.put(max_new, ("batch",)), stop_ids=self.put(stop_ids, ("batch", None)),
            tokens=self.put(np.zeros((batch, out_length), np.int32), ("batch", None)),
            logprobs=self.put(np.zeros((batch, out_length), np.float32), ("batch", None)),
            top_ids=self.put(np.zeros((batch, out_length, n_top), np.int32), batch_axes),
            top_logprobs=self.put(np.zeros((batch, out_length, n_top), np.float32), batch_axes),
            step=np.zeros((), np.int32))
        rows = self.sampling(list(params), batch)
        state = self._start(self.outer, self.weights, self.put(tokens, ("batch", "length")),
                            self.put(lengths, ("batch",)), self.new_cache(batch, cache_length), rows, state,
                            chunk=min(self.prefill_chunk, prompt_bucket), n_top=n_top)
        return state, rows

    def decode(self, state: DecodeState, rows: RowSampling, steps: int) -> DecodeState:
        """Up to `steps` more decode iterations (fewer when every row is done)."""
        n_top = state.top_ids.shape[2]  # the alternatives `start` made room for
        return self._decode(self.outer, self.weights, state, rows, np.int32(steps), n_top=n_top)

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                     truncate: bool = False) -> list[Generation]:
        """Continue every prompt (token ids) on the device, in one batch; no stop strings (see generate.py)."""
        prompts, params, state, rows = self._begin(prompts, params, truncate)
        state = self.decode(state, rows, state.tokens.shape[1])
        return collect(self.fetch(state), prompts, params)

    def _begin(self, prompts, params, truncate: bool) -> tuple[list[list[int]], list[SamplingParams], DecodeState,
                                                              RowSampling]:
        """Check the requests and prefill them: what generate_ids and stream_ids start from."""
        params = per_prompt(params, len(prompts))
        prompts = self.check(prompts, params, truncate)
        state, rows = self.start(prompts, params, max(p.max_new_tokens for p in params))
        return prompts, params, state, rows

    def stream_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                   chunk: int = 8, truncate: bool = False) -> Iterator[list[list[int]]]:
        """Yield each row's new token ids (stop ids excluded): first the token drawn at prefill, then what every
        `chunk` decode steps add, until all rows are done. The decode function is the one `generate_ids` uses."""
        if chunk < 1:
            raise InferenceError(f"chunk must be a positive integer, got {chunk!r}")
        prompts, params, state, rows = self._begin(prompts, params, truncate)
        sent = [0] * len(prompts)
        while True:
            tokens, generated, done = self.fetch((state.tokens, state.generated, state.done))
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
            state = self.decode(state, rows, chunk)

    def cache_bytes(self, batch: int, length: int) -> int:
        return cache_bytes(self.config, batch, length, self.cache_dtype)


def per_prompt(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt (the same one for all when a single one is given)."""
    if isinstance(params, SamplingParams):
        return [params] * n
    return list(params)


def finish(ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
    """A finished row's tokens without its final stop id, and why it finished (`finish_reason`)."""
    reason = (finish_reason(ids[-1], len(ids), params) if ids else None) or "length"
    return (ids[:-1] if reason == "stop" else ids), reason


def collect(state: DecodeState, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
    """Each request's Generation from a finished decode state fetched to the host (`OnMesh.fetch`; its tokens
    cut to its budget)."""
    tokens, logprobs, top_ids, top_lps, generated = (state.tokens, state.logprobs, state.top_ids,
                                                     state.top_logprobs, state.generated)
    results = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        ids, reason = finish([int(t) for t in tokens[i, :min(int(generated[i]), p.max_new_tokens)]], p)
        n = len(ids)
        results.append(Generation(
            prompt_ids=list(prompt), token_ids=ids, logprobs=[float(x) for x in logprobs[i, :n]],
            top_logprobs=[[(int(a), float(b)) for a, b in zip(top_ids[i, j, :p.logprobs], top_lps[i, j, :p.logprobs],
                                                             strict=True)] for j in range(n)],
            finish_reason=reason))
    return results
