"""Sampling controls: what a request asks for, checked on the host, and the on-device transform
from logits to the distribution a token is drawn from.

Each row of a batch carries its own temperature, top-k, top-p, min-p and seed, so one compiled
decode step serves any mix of requests. A row's random key depends only on its seed and on how
many tokens it has generated, so the same seed gives the same text whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


class InferenceError(ValueError):
    """A generation request that cannot be served as asked; the message names the argument."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling options (OpenAI / vLLM names and meanings)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # nucleus: the smallest set of tokens with probability >= top_p
    min_p: float = 0.0  # drop tokens with probability < min_p x the most likely token's
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one, which is not returned
    logprobs: int = 0  # how many top alternatives to report per token, besides the chosen token's log-prob

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens > 0, "a positive integer"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, "a number >= 0 (0 is greedy)"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("seed", _is_int(self.seed), "an integer"),
            ("logprobs", _is_int(self.logprobs) and 0 <= self.logprobs <= 20, "an integer in [0, 20]"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise InferenceError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InferenceError(f"stop must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and np.isfinite(x)


@flax.struct.dataclass
class RowSampling:
    """SamplingParams of every row of a batch, as arrays [batch] (padding rows are greedy)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    keys: jax.Array  # one PRNG key per row, from its seed

    @staticmethod
    def from_params(params: list[SamplingParams], batch: int) -> RowSampling:
        return RowSampling.build(*RowSampling.host_arrays(params, batch))

    @staticmethod
    def host_arrays(params: list[SamplingParams], batch: int) -> tuple[np.ndarray, ...]:
        """(temperature, top_k, top_p, min_p, seed) as numpy arrays [batch] (padding rows greedy): what
        `build` turns into a RowSampling, inside a jitted function or outside."""
        rows = list(params) + [SamplingParams(temperature=0.0)] * (batch - len(params))
        return (np.asarray([p.temperature for p in rows], np.float32), np.asarray([p.top_k for p in rows], np.int32),
                np.asarray([p.top_p for p in rows], np.float32), np.asarray([p.min_p for p in rows], np.float32),
                np.asarray([p.seed for p in rows], np.uint32))

    @staticmethod
    @jax.jit
    def build(temperature, top_k, top_p, min_p, seeds) -> RowSampling:
        """One compiled call (per batch size) instead of a dispatch per field and an eager vmap for the keys."""
        return RowSampling(temperature, top_k, top_p, min_p, jax.vmap(jax.random.key)(seeds))


def processed_logprobs(logits: jax.Array, rows: RowSampling) -> jax.Array:
    """logits [batch, vocab] -> log-probabilities [batch, vocab] of the distribution each row samples
    from: temperature, then top-k, top-p and min-p filters (-inf outside what they keep); a greedy
    row (temperature 0) puts all its mass on the argmax."""
    logits = logits.astype(F32)
    vocab = logits.shape[-1]
    greedy = rows.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, rows.temperature)[:, None]
    top = jnp.max(scaled, axis=-1, keepdims=True)
    # min-p: p >= min_p * p_max, i.e. logit >= max + log(min_p)
    floor = jnp.where(rows.min_p[:, None] > 0, top + jnp.log(jnp.maximum(rows.min_p, 1e-30))[:, None], -jnp.inf)

    def sorted_threshold(scaled):
        """The smallest logit top-k and top-p keep, per row (a sort over the vocabulary)."""
        descending = -jnp.sort(-scaled, axis=-1)
        # top-k: keep the k largest (ties at the k-th value kept too)
        k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, vocab), vocab)
        kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
        descending = jnp.where(descending >= kth, descending, -jnp.inf)
        # top-p: keep the smallest prefix (in descending order) whose mass reaches top_p
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        last_kept = jnp.min(jnp.where(mass_before < rows.top_p[:, None], descending, jnp.inf), axis=-1, keepdims=True)
        return jnp.maximum(kth, last_kept)

    # the sort only runs when some sampled row asks for top-k or top-p
    needs_sort = jnp.any(~greedy & ((rows.top_k > 0) | (rows.top_p < 1)))
    threshold = jax.lax.cond(needs_sort, sorted_threshold, lambda x: jnp.full_like(top, -jnp.inf), scaled)
    filtered = jnp.where(scaled >= jnp.maximum(threshold, floor), scaled, -jnp.inf)
    sampled = jax.nn.log_softmax(filtered, axis=-1)
    one_hot = jnp.where(jnp.arange(vocab)[None] == argmax(logits)[:, None], 0.0, -jnp.inf)
    return jnp.where(greedy[:, None], one_hot, sampled)


def argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis (the first index of the maximum) as two plain reductions: XLA:CPU's
    fused value-and-index reduction is ~20x slower over a vocabulary."""
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def row_keys(rows: RowSampling, counter: jax.Array) -> jax.Array:
    """Per row, the key of its `counter[b]`-th draw: depends on the row's seed and count only."""
    return jax.vmap(jax.random.fold_in)(rows.keys, counter.astype(jnp.uint32))


def sample(logprobs: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row from log-probabilities [batch, vocab] with per-row keys. When every row is
    greedy (one-hot), the argmax is the draw and no random numbers are made."""

    def draw(logprobs):
        return jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys, logprobs).astype(jnp.int32)

    one_hot = jnp.all(jnp.sum(jnp.isfinite(logprobs), axis=-1) == 1)
    return jax.lax.cond(one_hot, lambda lp: argmax(lp).astype(jnp.int32), draw, logprobs)
