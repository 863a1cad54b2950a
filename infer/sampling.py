"""Sampling: what a request asks for, checked on the host once, and the on-device draw.

    SamplingParams    one request's options (OpenAI / vLLM names), validated when built
    check_request     the one check of a request against a model: prompt ids, context room, stop ids
    RowSampling       every row's options as arrays, so one compiled step serves any mix of requests
    draw              the one way a token is drawn: logits -> (token, its log-probability, top alternatives)
    row_done          the one "is this row finished" rule: a stop id, or the token budget spent

Each row of a batch carries its own temperature, top-k, top-p, min-p and seed. A row's random key depends
only on its seed and on how many tokens it has drawn, so the same seed gives the same text whatever else is
in the batch. Token ids the tokenizer cannot decode (holes in a vocabulary, padding rows of an embedding)
are masked in `draw` (`allowed`), so they are never drawn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
MAX_STOP_IDS = 8  # stop token ids per request (rows carry them padded with -1)
MAX_STOP = 8  # stop strings per request
MAX_LOGPROBS = 20  # top alternatives a request may ask for per token
SEED_RANGE = (-(1 << 63), 1 << 64)  # seeds OpenAI clients send: any 64-bit integer, signed or not
INT32_MAX = (1 << 31) - 1


class InferenceError(ValueError):
    """A generation request that cannot be served as asked; the message names the argument."""


class RequestError(InferenceError):
    """A request that does not fit the model: `param` names the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling options (OpenAI / vLLM names and meanings)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off (as is any k >= the vocabulary)
    top_p: float = 1.0  # nucleus: the smallest set of tokens with probability >= top_p
    min_p: float = 0.0  # drop tokens with probability < min_p x the most likely token's
    seed: int = 0  # any 64-bit integer (see seed_words)
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
            ("seed", _is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1], "a 64-bit integer"),
            ("logprobs", _is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS,
             f"an integer in [0, {MAX_LOGPROBS}]"),
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


def check_request(prompt: Sequence[int], params: SamplingParams, *, vocab_size: int, context: int, extra: int = 0,
                  truncate: bool | None = None, prompt_name: str = "prompt",
                  budget_name: str = "max_new_tokens") -> list[int]:
    """The one check of a request against a model: raises RequestError (naming the field) or returns the
    prompt's ids, with `truncate` its last ids that fit.

    context: prompt + completion tokens the model (or engine) holds per sequence; extra: positions needed past
    the last generated token (a speculative round's drafts). truncate: None when the caller cannot truncate,
    False when it could (the message then says how). prompt_name / budget_name: the caller's names of the
    prompt and of max_new_tokens (the server's "messages", "max_tokens")."""
    if len(params.stop_token_ids) > MAX_STOP_IDS:
        raise RequestError(f"stop_token_ids: at most {MAX_STOP_IDS}, got {len(params.stop_token_ids)}",
                           "stop_token_ids")
    if len(params.stop) > MAX_STOP:
        raise RequestError(f"stop: at most {MAX_STOP} strings, got {len(params.stop)}", "stop")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise RequestError(f"{prompt_name} is empty; give at least one token", prompt_name)
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{prompt_name} has token id {bad[0]} outside the vocabulary (0..{vocab_size - 1})",
                           prompt_name)
    room = context - params.max_new_tokens - extra
    if room < 1:
        raise RequestError(f"{budget_name} ({params.max_new_tokens}) leaves no room for a prompt in the context of "
                           f"{context} tokens", budget_name)
    if len(prompt) > room:
        if truncate:
            return prompt[-room:]
        how = ", or pass truncate=True (--truncate) to keep its last tokens" if truncate is False else ""
        raise RequestError(
            f"{prompt_name} has {len(prompt)} tokens and {budget_name} is {params.max_new_tokens}: together more "
            f"than the context of {context} tokens (room for {room} prompt tokens). Shorten the prompt or lower "
            f"{budget_name}{how}", prompt_name)
    return prompt


def seed_words(seed: int) -> tuple[int, int]:
    """A 64-bit seed (signed or not) as two 32-bit words (low, high): every such seed maps to a key, and
    seeds in [0, 2^32) give the same key as jax.random.key(seed)."""
    bits = seed & ((1 << 64) - 1)
    return bits & 0xFFFFFFFF, bits >> 32


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
        """(temperature, top_k, top_p, min_p, seed low word, seed high word) as numpy arrays [batch] (padding
        rows greedy): what `build` turns into a RowSampling, inside a jitted function or outside."""
        rows = list(params) + [SamplingParams(temperature=0.0)] * (batch - len(params))
        words = np.asarray([seed_words(p.seed) for p in rows], np.uint32).reshape(batch, 2)
        return (np.asarray([p.temperature for p in rows], np.float32),
                np.asarray([min(p.top_k, INT32_MAX) for p in rows], np.int32),
                np.asarray([p.top_p for p in rows], np.float32), np.asarray([p.min_p for p in rows], np.float32),
                words[:, 0], words[:, 1])

    @staticmethod
    @jax.jit
    def build(temperature, top_k, top_p, min_p, seed_low, seed_high) -> RowSampling:
        """One compiled call (per batch size) instead of a dispatch per field and an eager vmap for the keys."""
        keys = jax.vmap(jax.random.key)(seed_low)
        high = jax.random.key_data(jax.vmap(jax.random.fold_in)(keys, seed_high))
        keys = jax.random.wrap_key_data(jnp.where((seed_high != 0)[:, None], high, jax.random.key_data(keys)))
        return RowSampling(temperature, top_k, top_p, min_p, keys)


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
    top_k = jnp.where(rows.top_k < vocab, rows.top_k, 0)  # k >= the vocabulary keeps everything: no filter

    def sorted_threshold(scaled):
        """The smallest logit top-k and top-p keep, per row (a sort over the vocabulary)."""
        descending = -jnp.sort(-scaled, axis=-1)
        # top-k: keep the k largest (ties at the k-th value kept too)
        k = jnp.where(top_k > 0, top_k, vocab)
        kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
        descending = jnp.where(descending >= kth, descending, -jnp.inf)
        # top-p: keep the smallest prefix (in descending order) whose mass reaches top_p
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        last_kept = jnp.min(jnp.where(mass_before < rows.top_p[:, None], descending, jnp.inf), axis=-1, keepdims=True)
        return jnp.maximum(kth, last_kept)

    # the sort only runs when some sampled row asks for top-k or top-p
    needs_sort = jnp.any(~greedy & ((top_k > 0) | (rows.top_p < 1)))
    threshold = jax.lax.cond(needs_sort, sorted_threshold, lambda x: jnp.full_like(top, -jnp.inf), scaled)
    filtered = jnp.where(scaled >= jnp.maximum(threshold, floor), scaled, -jnp.inf)
    sampled = jax.nn.log_softmax(filtered, axis=-1)
    one_hot = jnp.where(jnp.arange(vocab)[None] == argmax(logits)[:, None], 0.0, -jnp.inf)
    return jnp.where(greedy[:, None], one_hot, sampled)


def argmax(x: jax.Array) -> jax.Array:
    """argmax over the last axis (the first index of the maximum) as two plain reductions: XLA:CPU's
    fused value-and-index reduction is much slower over a vocabulary."""
    top = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)


def row_keys(rows: RowSampling, counter: jax.Array) -> jax.Array:
    """Per row, the key of its `counter[b]`-th draw: depends on the row's seed and count only."""
    return jax.vmap(jax.random.fold_in)(rows.keys, counter.astype(jnp.uint32))


def sample(logprobs: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row from log-probabilities [batch, vocab] with per-row keys. When every row is
    greedy (one-hot), the argmax is the draw and no random numbers are made."""

    def categorical(logprobs):
        return jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys, logprobs).astype(jnp.int32)

    one_hot = jnp.all(jnp.sum(jnp.isfinite(logprobs), axis=-1) == 1)
    return jax.lax.cond(one_hot, lambda lp: argmax(lp).astype(jnp.int32), categorical, logprobs)


@flax.struct.dataclass
class Draw:
    """What `draw` gives per row."""

    tokens: jax.Array  # [batch] int32: the token drawn
    logprobs: jax.Array  # [batch] float32: its log-probability under the model (before temperature and filters)
    distribution: jax.Array  # [batch, vocab] float32: the log-probabilities it was drawn from (after them)
    top_ids: jax.Array  # [batch, n_top] int32: the model's most likely tokens
    top_logprobs: jax.Array  # [batch, n_top] float32: their log-probabilities


def draw(logits: jax.Array, rows: RowSampling, keys: jax.Array, allowed: jax.Array | None = None,
         n_top: int = 0) -> Draw:
    """The one way a token is drawn: each row's next token from logits [batch, vocab] with its key
    ([batch] keys, e.g. `row_keys(rows, counter)`), and what the callers report of it.

    allowed: bool [vocab] or [batch, vocab]: tokens that may be drawn (the others get probability zero
    before temperature and the filters, so sampling follows the model renormalised over the allowed set);
    None allows every id. n_top: how many of the most likely alternatives to return."""
    logits = masked(logits, allowed)
    distribution = processed_logprobs(logits, rows)
    tokens = sample(distribution, keys)
    raw = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0]
    if n_top:
        top_logprobs, top_ids = jax.lax.top_k(raw, n_top)
    else:
        top_logprobs, top_ids = jnp.zeros((logits.shape[0], 0), F32), jnp.zeros((logits.shape[0], 0), jnp.int32)
    return Draw(tokens, chosen, distribution, top_ids.astype(jnp.int32), top_logprobs)


def masked(logits: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """Float32 logits with the ids that may not be drawn at -inf (`allowed` as in `draw`; None: unchanged)."""
    logits = logits.astype(F32)
    return logits if allowed is None else jnp.where(allowed, logits, -jnp.inf)


def row_done(token, generated, stop_ids, max_new):
    """The one "is this row finished" rule, on device arrays (inside a compiled step) or host numbers (the
    scheduler) alike: its newest token is one of its stop ids (stop_ids [..., n], -1 padded), or it has
    generated its budget (a final stop token counts)."""
    xp = jnp if any(isinstance(x, jax.Array) for x in (token, generated, stop_ids, max_new)) else np
    stopped = xp.any(xp.asarray(token)[..., None] == xp.asarray(stop_ids), axis=-1)
    return stopped | (xp.asarray(generated) >= xp.asarray(max_new))


def finish_reason(token: int, generated: int, params: SamplingParams) -> str | None:
    """Why a request whose newest token is `token` after `generated` tokens is finished ("stop" or
    "length"), or None: `row_done` for one request on the host."""
    if not bool(row_done(token, generated, params.stop_token_ids or [-1], params.max_new_tokens)):
        return None
    return "stop" if token in params.stop_token_ids else "length"
