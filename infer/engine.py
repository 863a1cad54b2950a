"""The serving engine: `slots` concurrent sequences over one batched KV cache, driven by three verbs that any
scheduler can call (JetStream's engine API):

    prefill(prompt, sampling, reuse=None) -> Prefill   a prompt's keys and values, and its first token
    insert(prefill, state, slot) -> state              that prefill into a slot of the batch
    generate(state) -> (state, Step)                   one more token for every slot, in one step

A slot's row of the `SlotState` holds its cache, the token to feed next and that token's position, its sampling
options and how many tokens it has drawn. A row's random key depends only on its seed and that count (as in the
decode loop), so a request's tokens do not depend on its slot or on its neighbours. Free slots still run (the
batch has one static shape) but write past the end of their cache, which drops the writes.

Everything that holds one sequence (a Prefill's cache, a prefix-cache entry) has as many identical rows as the
mesh has batch shards, so it is laid out like the batch; row 0 is the one that is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from infer.sampling import InferenceError, RowSampling, SamplingParams, check_request, draw, row_keys
from infer.step import OnMesh, StepWeights, bucket, decode_step, prefill
from model.cache import KVCache, cache_bytes
from model.config import ModelConfig
from model.sharding import DEFAULT_RULES, Rules, check_divisible

MIN_BUCKET = 16  # the shortest prompt bucket and cache a prefill makes


@flax.struct.dataclass
class SlotState:
    """The batch the engine decodes: one row per slot."""

    cache: KVCache  # n_layers x [slots, kv_heads, max_length, head_dim]
    tokens: jax.Array  # [slots] int32: the token to feed next (drawn, its KV not yet in the cache)
    lengths: jax.Array  # [slots] int32: tokens in the cache = the position of `tokens`
    generated: jax.Array  # [slots] int32: tokens drawn so far (the counter of the row's random key)
    rows: RowSampling  # [slots] sampling options and seeds


@dataclasses.dataclass
class Prefill:
    """A prompt run through the model: its KV, ready to insert into a slot, and the first token drawn."""

    cache: KVCache  # n_layers x [shards, kv_heads, length bucket, head_dim]; row 0 is read
    length: int  # prompt tokens whose keys and values are in the cache
    token: int  # the first generated token
    logprob: float  # its log-probability under the model
    rows: RowSampling  # the request's sampling options, [shards]
    reused: int  # leading prompt tokens whose KV came from `reuse` instead of being computed


@dataclasses.dataclass
class Step:
    """What one generate step drew, per slot."""

    tokens: np.ndarray  # [slots] int32, fetched from the device
    logprobs: jax.Array  # [slots] float32, left on the device (fetch it when needed)


class Engine(OnMesh):
    """Prefill, insert and generate for one model, on one device or a mesh.

    slots: sequences decoded together (rounded up to a multiple of the mesh's batch shards);
    max_length: cache slots per sequence = the longest prompt + completion (default and at most the
    model's max_seq_len); kv_cache: "auto" (the compute dtype) or "int8" (model/cache.py).
    """

    def __init__(self, config: ModelConfig, graphdef: Any, params: Any, slots: int = 8, max_length: int | None = None,
                 mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, prefill_chunk: int = 512,
                 allowed: np.ndarray | None = None, kv_cache: str = "auto"):
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise InferenceError(f"slots must be a positive integer, got {slots!r}")
        max_length = config.max_seq_len if max_length is None else max_length
        if not isinstance(max_length, int) or not 2 <= max_length <= config.max_seq_len:
            raise InferenceError(f"max_length must be an integer in [2, {config.max_seq_len}] (the model's "
                                 f"max_seq_len), got {max_length!r}")
        super().__init__(config, graphdef, params, mesh, rules, allowed, kv_cache)
        self.shards = self.batch_shards
        self.slots = -(-slots // self.shards) * self.shards
        self.max_length, self.prefill_chunk = max_length, prefill_chunk
        if mesh is not None:
            check_divisible("engine slots", (self.slots,), ("batch",), mesh, rules)
        self.traces = {"prefill": 0, "generate": 0, "insert": 0}  # how often each function was traced
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("length", "chunk"), donate_argnames=("cache",))
        self._insert = jax.jit(self._insert_fn, donate_argnames=("state",))
        self._generate = jax.jit(self._generate_fn, static_argnames=("visible",), donate_argnames=("state",))
        self._extract = jax.jit(self._extract_fn, static_argnames=("length",))
        self._resize = jax.jit(self._resize_fn, static_argnames=("length",))

    # ------------------------------------------------------------------ the three verbs

    def prefill(self, prompt: Sequence[int], params: SamplingParams,
                reuse: tuple[KVCache, int] | None = None) -> Prefill:
        """Run a prompt (token ids) into a fresh cache and draw its first token.

        reuse: (a cache holding an earlier sequence's KV, n): its first n positions hold the KV of
        prompt[:n] (a prefix-cache hit); only prompt[n:] is computed."""
        prompt = self.check(prompt, params)
        n, start = len(prompt), (reuse[1] if reuse is not None else 0)
        if not 0 <= start < n:
            raise InferenceError(f"reuse: {start} reused tokens for a prompt of {n}; reuse fewer than the prompt")
        length = self.cache_bucket(n)
        new = n - start
        width = min(bucket(new, MIN_BUCKET), length)
        tokens = np.zeros((self.shards, width), np.int32)
        tokens[:, :new] = prompt[start:]
        cache = None if reuse is None else self._resize(reuse[0], length=length)
        sampling = tuple(self.put(x, ("batch",)) for x in RowSampling.host_arrays([params] * self.shards,
                                                                                   self.shards))
        token, logprob, cache, rows = self._prefill(
            self.outer, self.weights, self.put(tokens, ("batch", "length")),
            self.put(np.full(self.shards, start, np.int32), ("batch",)),
            self.put(np.full(self.shards, new, np.int32), ("batch",)), cache, sampling,
            length=length, chunk=min(self.prefill_chunk, width))
        token, logprob = jax.device_get((token, logprob))
        return Prefill(cache, n, int(token[0]), float(logprob[0]), rows, start)

    def insert(self, prefill: Prefill, state: SlotState, slot: int) -> SlotState:
        """Copy a prefill into `slot` (its cache rows, next token, position, sampling options)."""
        if not 0 <= slot < self.slots:
            raise InferenceError(f"slot {slot} is not one of the engine's {self.slots} slots")
        return self._insert(state, prefill.cache, prefill.rows, jnp.int32(prefill.token), jnp.int32(prefill.length),
                            jnp.int32(slot))

    def generate(self, state: SlotState, longest: int | None = None) -> tuple[SlotState, Step]:
        """One decode step for every slot: feed each slot's token, draw the next.

        longest: the most tokens any busy slot holds after this step (its cache plus the token fed);
        attention then reads only the first cache_bucket(longest) positions, so a step's cost follows the
        busy sequences' lengths, not max_length (one compiled step per bucket). Default: all positions."""
        visible = self.max_length if longest is None else self.cache_bucket(longest)
        state, tokens, logprobs = self._generate(self.outer, self.weights, state, visible=visible)
        return state, Step(np.asarray(jax.device_get(tokens)), logprobs)

    # ------------------------------------------------------------------ around them

    def init_state(self) -> SlotState:
        """Every slot free: positions past the cache's end, so free slots write nothing."""
        rows = self.sampling([], self.slots)
        return SlotState(cache=self.new_cache(self.slots, self.max_length),
                         tokens=self.put(np.zeros(self.slots, np.int32), ("batch",)),
                         lengths=self.put(np.full(self.slots, self.max_length, np.int32), ("batch",)),
                         generated=self.put(np.zeros(self.slots, np.int32), ("batch",)),
                         rows=rows)

    def warm_up(self) -> None:
        """Compile, before the first request, every program that requests without a prefix-cache hit use: for
        each cache length (MIN_BUCKET, 2 x MIN_BUCKET, ... max_length) the prefill of a prompt of that bucket, its
        insert, the extract that keeps a finished sequence, and the generate step attending over that length.
        With the persistent compilation cache, a restart loads them instead of compiling. (A prefix-cache hit
        computes a shorter width of prompt and compiles that prefill at its first use.)"""
        state = self.init_state()
        greedy = SamplingParams(max_new_tokens=1, temperature=0.0)
        for length in self.cache_buckets():
            n = min(length, self.max_length - 1)  # a prompt whose cache bucket is `length`
            state = self.insert(self.prefill([0] * n, greedy), state, 0)
            self.extract(state, 0, n)
            state, _ = self.generate(state, length)

    def cache_buckets(self) -> list[int]:
        """The cache lengths sequences are held in: MIN_BUCKET, 2 x MIN_BUCKET, ... up to max_length."""
        lengths, length = [], MIN_BUCKET
        while length < self.max_length:
            lengths.append(length)
            length *= 2
        return [*lengths, self.max_length]

    def extract(self, state: SlotState, slot: int, length: int) -> KVCache:
        """The KV of a slot's first `length` positions (bucketed), shaped like a Prefill's cache: what the
        prefix cache keeps of a finished sequence."""
        return self._extract(state.cache, jnp.int32(slot), length=self.cache_bucket(length))

    def check(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        """`check_request` against this engine's context (max_length): the prompt's ids, or a RequestError."""
        return check_request(prompt, params, vocab_size=self.config.vocab_size, context=self.max_length)

    def cache_bucket(self, n: int) -> int:
        """The cache length a sequence of n tokens is held in: a power of two (>= MIN_BUCKET), at most max_length."""
        return min(bucket(n, MIN_BUCKET), self.max_length)

    def cache_bytes(self, length: int) -> int:
        """Device memory of one sequence's cache of `length` positions (all its rows)."""
        return cache_bytes(self.config, self.shards, length, self.cache_dtype)

    def cache_summary(self) -> str:
        """The KV cache in a line: its format, bytes per slot, and, when int8, how many times the slots of a
        compute-dtype cache fit in the same memory."""
        per_slot = cache_bytes(self.config, 1, self.max_length, self.cache_dtype)
        line = f"KV cache {jnp.dtype(self.cache_dtype).name}, {per_slot / 2**20:.1f} MiB per slot"
        plain = self.execution.compute_jnp_dtype
        if jnp.dtype(plain) != jnp.dtype(self.cache_dtype):
            line += (f" ({cache_bytes(self.config, 1, self.max_length, plain) / per_slot:.2f}x the slots of "
                     f"{jnp.dtype(plain).name} in the same memory)")
        return line

    # ------------------------------------------------------------------ compiled pieces

    def _prefill_fn(self, outer, weights: StepWeights, tokens, starts, lengths, cache, sampling, length, chunk):
        """One call: a zero cache of `length` positions (unless `cache` is given, holding reused KV), the
        prompt run into it, the first token drawn. -> (tokens, log-probs, cache, the rows' RowSampling)."""
        self.traces["prefill"] += 1
        with self.context():
            if cache is None:
                cache = self.new_cache(tokens.shape[0], length, inside=True)
            rows = RowSampling.build(*sampling)
            logits, cache = prefill(self.model(outer), tokens, starts, lengths, cache, chunk, weights)
            drawn = draw(logits, rows, row_keys(rows, jnp.zeros(tokens.shape[0], jnp.int32)), self.allowed)
            return drawn.tokens, drawn.logprobs, cache, rows

    def _insert_fn(self, state: SlotState, cache: KVCache, rows: RowSampling, token, length, slot) -> SlotState:
        self.traces["insert"] += 1
        with self.context():
            def put(big: jax.Array, small: jax.Array) -> jax.Array:  # row 0 of small into row `slot` of big
                return jax.lax.dynamic_update_slice(big, small[:1].astype(big.dtype), (slot,) + (0,) * (big.ndim - 1))

            cache = jax.tree.map(put, state.cache, cache)  # every array of the cache: values, and int8 scales
            return SlotState(cache=cache, tokens=state.tokens.at[slot].set(token),
                             lengths=state.lengths.at[slot].set(length), generated=state.generated.at[slot].set(1),
                             rows=jax.tree.map(lambda a, b: a.at[slot].set(b[0]), state.rows, rows))

    def _generate_fn(self, outer, weights: StepWeights, state: SlotState, visible: int):
        self.traces["generate"] += 1
        with self.context():
            logits, cache = decode_step(self.model(outer), weights, state.tokens[:, None], state.lengths[:, None],
                                        state.cache, visible=visible)
            drawn = draw(logits[:, 0], state.rows, row_keys(state.rows, state.generated), self.allowed)
            state = state.replace(cache=cache, tokens=drawn.tokens, generated=state.generated + 1,
                                  lengths=jnp.minimum(state.lengths + 1, self.max_length))
            return state, drawn.tokens, drawn.logprobs

    def _extract_fn(self, cache: KVCache, slot, length: int) -> KVCache:
        def row(x: jax.Array) -> jax.Array:  # [slots, kv_heads, max_length(, head_dim)] -> [shards, ..., length, ...]
            one = jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)[:, :, :length]
            return jnp.broadcast_to(one, (self.shards, *one.shape[1:]))

        with self.context():
            return jax.tree.map(row, cache)

    def _resize_fn(self, cache: KVCache, length: int) -> KVCache:
        """A cache cut or zero-padded to `length` positions."""
        def fit(x: jax.Array) -> jax.Array:  # [rows, kv_heads, cache_length(, head_dim)]
            keep = min(x.shape[2], length)
            return jnp.zeros((*x.shape[:2], length, *x.shape[3:]), x.dtype).at[:, :, :keep].set(x[:, :, :keep])

        with self.context():
            return jax.tree.map(fit, cache)
