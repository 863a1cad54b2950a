"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a draft model proposes k tokens,
the target scores all of them in one forward pass, and a rejection rule keeps exactly the target's
distribution.

One round, per row (rows accept different numbers of tokens and carry their own lengths):
0. (once, at prefill) both models read the prompt; the target draws the first token;
1. the draft feeds the row's last token and samples d_1..d_k from its distributions q_1..q_k
   (k + 1 draft steps: the last one only writes d_k into the draft's cache);
2. the target feeds [last, d_1..d_k] at once and gets p_1..p_{k+1};
3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), in order, until the first rejection;
   at a rejection at i the row takes a token from normalise(max(0, p_i - q_i)), and when all k are
   accepted a bonus token from p_{k+1};
4. both caches hold the kept tokens at the right slots already; slots past the new length hold
   rejected drafts, which no query sees before they are overwritten (the cache invariant).
p and q are the distributions after the row's sampling controls (temperature, top-k, top-p, min-p),
so the output follows the target's sampled distribution; at temperature 0 both are one-hot and the
output is the target's greedy output token for token. The rounds run in a `lax.while_loop`.

Every forward pass is `decode_step` (infer/step.py): the draft's single-token steps and the target's
verification of [last, d_1..d_k]; the draft's tokens are drawn with `draw` (infer/sampling.py).

    speculative = SpeculativeDecoder(target, draft, k=4)   # two Decoders on the same mesh
    results = speculative.generate_ids(prompts, SamplingParams(max_new_tokens=64))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from infer.decode import Decoder, Generation, collect, per_prompt
from infer.sampling import (
    InferenceError,
    RowSampling,
    SamplingParams,
    draw,
    masked,
    processed_logprobs,
    row_done,
    row_keys,
)
from infer.step import StepWeights, decode_step
from model.cache import KVCache


@flax.struct.dataclass
class SpecState:
    target_cache: KVCache
    draft_cache: KVCache
    last: jax.Array  # [batch] int32: the newest token, in neither cache yet
    lengths: jax.Array  # [batch] int32: tokens in both caches (the slot of `last`)
    generated: jax.Array  # [batch] int32
    done: jax.Array  # [batch] bool
    max_new: jax.Array  # [batch] int32
    stop_ids: jax.Array  # [batch, MAX_STOP_IDS] int32
    tokens: jax.Array  # [batch, out_length] int32
    logprobs: jax.Array  # [batch, out_length] float32 (the target's, raw)
    proposed: jax.Array  # [batch] int32: draft tokens proposed
    accepted: jax.Array  # [batch] int32: draft tokens accepted


@dataclasses.dataclass
class SpeculativeStats:
    proposed: int
    accepted: int
    rounds: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)


def check_draft(target: Decoder, draft: Decoder) -> None:
    """A draft must share the target's vocabulary and mesh."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise InferenceError(f"draft: its vocabulary has {draft.config.vocab_size} tokens, the target's "
                             f"{target.config.vocab_size}; a draft must use the target's tokenizer")
    if draft.mesh is not target.mesh and (draft.mesh is None or target.mesh is None
                                         or draft.mesh.shape != target.mesh.shape):
        raise InferenceError("draft: it must live on the same mesh as the target")


class SpeculativeDecoder:
    """A target and a draft Decoder (same vocabulary, same mesh) that generate together: exactly the target's
    distribution, in fewer target passes when the draft guesses well. It owns its compiled rounds.

    k: draft tokens proposed per round."""

    def __init__(self, target: Decoder, draft: Decoder, k: int = 4):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise InferenceError(f"draft_tokens must be a positive integer, got {k!r}")
        check_draft(target, draft)
        self.target, self.draft, self.k = target, draft, k
        self.last_stats: SpeculativeStats | None = None
        self._rounds = jax.jit(self._rounds_fn, donate_argnames=("state",))

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                     truncate: bool = False, stats: list | None = None) -> list[Generation]:
        """Continue every prompt (token ids) with speculative sampling; `stats`, when a list, receives a
        SpeculativeStats (also kept as `last_stats`)."""
        target, draft, k = self.target, self.draft, self.k
        params = per_prompt(params, len(prompts))
        if any(p.logprobs for p in params):
            raise InferenceError("logprobs: top alternatives are not reported with a draft model; drop one of them")
        prompts = target.check(prompts, params, truncate, extra=k + 1)
        out_length = max(p.max_new_tokens for p in params) + k + 1
        # both caches hold the prompts; the target draws the first token (the draft's own first draw is unused)
        t_state, rows = target.start(prompts, params, out_length, extra=k + 1)
        d_state, _ = draft.start(prompts, params, out_length, extra=k + 1)
        if d_state.cache.length != t_state.cache.length:
            raise InferenceError("draft: its context (max_seq_len) is shorter than this request needs; "
                                 f"draft {draft.config.max_seq_len}, target {target.config.max_seq_len}")
        def zeros():
            return target.put(np.zeros(t_state.lengths.shape, np.int32), ("batch",))

        state = SpecState(
            target_cache=t_state.cache, draft_cache=d_state.cache, last=t_state.last, lengths=t_state.lengths,
            generated=t_state.generated, done=t_state.done, max_new=t_state.max_new, stop_ids=t_state.stop_ids,
            tokens=t_state.tokens, logprobs=t_state.logprobs, proposed=zeros(), accepted=zeros())
        state = self._rounds(target.outer, target.weights, draft.outer, draft.weights, state, rows)
        tokens, logprobs, generated, proposed, accepted = target.fetch(
            (state.tokens, state.logprobs, state.generated, state.proposed, state.accepted))
        results = collect(t_state.replace(cache=None, tokens=tokens, logprobs=logprobs, generated=generated,
                                          top_ids=np.zeros((*tokens.shape, 0), np.int32),
                                          top_logprobs=np.zeros((*tokens.shape, 0), np.float32)), prompts, params)
        n = len(prompts)
        self.last_stats = SpeculativeStats(int(proposed[:n].sum()), int(accepted[:n].sum()),
                                           int(np.max(proposed[:n])) // k if n else 0)
        if stats is not None:
            stats.append(self.last_stats)
        return results

    def _rounds_fn(self, target_outer, t_weights: StepWeights, draft_outer, d_weights: StepWeights, state: SpecState,
                   rows: RowSampling) -> SpecState:
        """Speculative rounds until every row is done."""
        target, draft, k = self.target, self.draft, self.k
        with target.context():
            t_model, d_model = target.model(target_outer), draft.model(draft_outer)
            batch, out_length = state.last.shape[0], state.tokens.shape[1]
            index = jnp.arange(k + 1)

            def cond(s: SpecState):
                return ~jnp.all(s.done)

            def body(s: SpecState) -> SpecState:
                keys = jax.vmap(lambda key: jax.random.split(key, 2 * k + 1))(row_keys(rows, s.generated))
                # 1. draft: k + 1 single-token steps
                d_cache, token, drafts, q_probs = s.draft_cache, s.last, [], []
                for i in range(k + 1):
                    logits, d_cache = decode_step(d_model, d_weights, token[:, None], (s.lengths + i)[:, None],
                                                  d_cache)
                    if i == k:
                        break
                    drawn = draw(logits[:, 0], rows, keys[:, i], draft.allowed)
                    token = drawn.tokens
                    drafts.append(token)
                    q_probs.append(jnp.exp(drawn.distribution))
                drafts_arr = jnp.stack(drafts, axis=1)  # [batch, k]
                q_all = jnp.stack(q_probs, axis=1)  # [batch, k, vocab]
                # 2. target: [last, d_1..d_k] in one step
                fed = jnp.concatenate([s.last[:, None], drafts_arr], axis=1)
                logits, t_cache = decode_step(t_model, t_weights, fed, s.lengths[:, None] + index[None],
                                              s.target_cache)  # [batch, k + 1, vocab]
                logits = masked(logits, target.allowed)  # as `draw` sees them
                p_all = jax.vmap(lambda lg: jnp.exp(processed_logprobs(lg, rows)), in_axes=1, out_axes=1)(logits)
                # 3. accept / reject
                p_d = jnp.take_along_axis(p_all[:, :k], drafts_arr[..., None], axis=-1)[..., 0]
                q_d = jnp.take_along_axis(q_all, drafts_arr[..., None], axis=-1)[..., 0]
                uniform = jax.vmap(lambda ks: jax.vmap(jax.random.uniform)(ks))(keys[:, k:2 * k])
                accept = uniform * q_d < p_d  # u < p/q, without dividing
                n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # leading accepts
                p_n = jnp.take_along_axis(p_all, n[:, None, None], axis=1)[:, 0]  # p_{n+1}
                q_n = jnp.take_along_axis(jnp.concatenate([q_all, jnp.zeros_like(q_all[:, :1])], axis=1),
                                          n[:, None, None], axis=1)[:, 0]  # q_{n+1}; zero for the bonus
                residual = jnp.maximum(p_n - q_n, 0.0)
                residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_n)
                extra = jax.vmap(jax.random.categorical)(keys[:, 2 * k], jnp.log(residual)).astype(jnp.int32)
                # 4. the round's tokens: d_1..d_n, then `extra`, cut after the first that ends the row
                window = jnp.where(index[None] < n[:, None], jnp.pad(drafts_arr, ((0, 0), (0, 1))), extra[:, None])
                raw = jax.nn.log_softmax(logits, axis=-1)
                window_lp = jnp.take_along_axis(raw, window[..., None], axis=-1)[..., 0]
                ends = row_done(window, s.generated[:, None] + 1 + index[None], s.stop_ids[:, None, :],
                                s.max_new[:, None]) | (index[None] >= n[:, None])
                count = jnp.min(jnp.where(ends, index[None], k), axis=1) + 1  # through the first that ends
                last = jnp.take_along_axis(window, (count - 1)[:, None], axis=1)[:, 0]
                active = ~s.done
                slots = jnp.where(active[:, None] & (index[None] < count[:, None]),
                                  s.generated[:, None] + index[None], out_length)
                rows_index = jnp.arange(batch)[:, None]
                generated = s.generated + jnp.where(active, count, 0)
                done = s.done | (active & row_done(last, generated, s.stop_ids, s.max_new))
                return s.replace(
                    target_cache=t_cache, draft_cache=d_cache,
                    last=jnp.where(active, extra, s.last), lengths=s.lengths + jnp.where(active, n + 1, 0),
                    generated=generated, done=done,
                    tokens=s.tokens.at[rows_index, slots].set(window, mode="drop"),
                    logprobs=s.logprobs.at[rows_index, slots].set(window_lp, mode="drop"),
                    proposed=s.proposed + jnp.where(active, k, 0), accepted=s.accepted + jnp.where(active, n, 0))

            return jax.lax.while_loop(cond, body, state)
