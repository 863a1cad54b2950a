"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a draft model proposes k tokens,
the target scores all of them in one forward pass, and a rejection rule keeps exactly the target's
distribution.

One round, per row (rows accept different numbers of tokens and carry their own lengths):
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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.decode import Decoder, Generation, _per_prompt, finish
from infer.sampling import InferenceError, RowSampling, SamplingParams, processed_logprobs, row_keys
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
    if draft.config.vocab_size != target.config.vocab_size:
        raise InferenceError(f"draft: its vocabulary has {draft.config.vocab_size} tokens, the target's "
                             f"{target.config.vocab_size}; a draft must use the target's tokenizer")
    if draft.mesh is not target.mesh and (draft.mesh is None or target.mesh is None
                                         or draft.mesh.shape != target.mesh.shape):
        raise InferenceError("draft: it must live on the same mesh as the target")


def _round_fn(target: Decoder, draft: Decoder, k: int):
    """One jitted function: run speculative rounds until every row is done."""

    def run(target_params, draft_params, state: SpecState, rows: RowSampling) -> SpecState:
        with target._context():
            t_model = nnx.merge(target.graphdef, target_params)
            d_model = nnx.merge(draft.graphdef, draft_params)
            batch = state.last.shape[0]
            out_length = state.tokens.shape[1]
            index = jnp.arange(k + 1)
            t_layers, d_layers = t_model.layer_params(), d_model.layer_params()  # once, outside the loop
            t_head, d_head = t_model.head(), d_model.head()

            def cond(s: SpecState):
                return ~jnp.all(s.done)

            def body(s: SpecState) -> SpecState:
                keys = jax.vmap(lambda key: jax.random.split(key, 2 * k + 1))(row_keys(rows, s.generated))
                # 1. draft: k + 1 single-token steps
                d_cache, token, drafts, q_probs = s.draft_cache, s.last, [], []
                for i in range(k + 1):
                    hidden, d_cache = d_model.with_cache(token[:, None], (s.lengths + i)[:, None], d_cache,
                                                         layer_params=d_layers)
                    if i == k:
                        break
                    q = jnp.exp(processed_logprobs(d_model.logits(hidden, d_head)[:, 0], rows))
                    token = jax.vmap(jax.random.categorical)(keys[:, i], jnp.log(q)).astype(jnp.int32)
                    drafts.append(token)
                    q_probs.append(q)
                drafts_arr = jnp.stack(drafts, axis=1)  # [batch, k]
                q_all = jnp.stack(q_probs, axis=1)  # [batch, k, vocab]
                # 2. target: [last, d_1..d_k] in one pass
                fed = jnp.concatenate([s.last[:, None], drafts_arr], axis=1)
                positions = s.lengths[:, None] + index[None]
                hidden, t_cache = t_model.with_cache(fed, positions, s.target_cache, layer_params=t_layers)
                logits = t_model.logits(hidden, t_head)  # [batch, k + 1, vocab]
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
                # 4. the round's tokens: d_1..d_n, then `extra`
                window = jnp.where(index[None] < n[:, None], jnp.pad(drafts_arr, ((0, 0), (0, 1))), extra[:, None])
                raw = jax.nn.log_softmax(logits, axis=-1)
                window_lp = jnp.take_along_axis(raw, window[..., None], axis=-1)[..., 0]
                count = n + 1
                is_stop = jnp.any(window[..., None] == s.stop_ids[:, None, :], axis=-1) & (index[None] < count[:, None])
                first_stop = jnp.min(jnp.where(is_stop, index[None], k + 1), axis=1)
                count = jnp.minimum(count, first_stop + 1)
                active = ~s.done
                slots = jnp.where(active[:, None] & (index[None] < count[:, None]),
                                  s.generated[:, None] + index[None], out_length)
                rows_index = jnp.arange(batch)[:, None]
                generated = s.generated + jnp.where(active, count, 0)
                done = s.done | (active & ((first_stop <= k) | (generated >= s.max_new)))
                return s.replace(
                    target_cache=t_cache, draft_cache=d_cache,
                    last=jnp.where(active, extra, s.last), lengths=s.lengths + jnp.where(active, n + 1, 0),
                    generated=generated, done=done,
                    tokens=s.tokens.at[rows_index, slots].set(window, mode="drop"),
                    logprobs=s.logprobs.at[rows_index, slots].set(window_lp, mode="drop"),
                    proposed=s.proposed + jnp.where(active, k, 0), accepted=s.accepted + jnp.where(active, n, 0))

            return jax.lax.while_loop(cond, body, state)

    return jax.jit(run, donate_argnames=("state",))


def speculative_generate(target: Decoder, draft: Decoder, prompts: Sequence[Sequence[int]],
                         params: SamplingParams | Sequence[SamplingParams], k: int = 4,
                         truncate: bool = False, stats: list | None = None) -> list[Generation]:
    """Generate with speculative sampling; `stats`, when a list, receives a SpeculativeStats."""
    if not isinstance(k, int) or k < 1:
        raise InferenceError(f"draft_tokens must be a positive integer, got {k!r}")
    check_draft(target, draft)
    params = _per_prompt(params, len(prompts))
    if any(p.logprobs for p in params):
        raise InferenceError("logprobs: top alternatives are not reported with a draft model; drop one of them")
    prompts = target.check(prompts, params, truncate, extra=k + 1)
    out_length = max(p.max_new_tokens for p in params) + k + 1
    # both caches hold all but each prompt's last token; the first round feeds it
    heads = [p[:-1] or [0] for p in prompts]
    t_state, rows = target.start(heads, params, out_length, extra=k + 2)
    d_state, _ = draft.start(heads, params, out_length, extra=k + 2)
    lengths = np.zeros(t_state.lengths.shape, np.int32)
    last = np.zeros(t_state.lengths.shape, np.int32)
    for i, p in enumerate(prompts):
        lengths[i], last[i] = len(p) - 1, p[-1]
    if d_state.cache.length != t_state.cache.length:
        raise InferenceError("draft: its context (max_seq_len) is shorter than this request needs; "
                             f"draft {draft.config.max_seq_len}, target {target.config.max_seq_len}")
    state = SpecState(
        target_cache=t_state.cache, draft_cache=d_state.cache, last=target._put(last, ("batch",)),
        lengths=target._put(lengths, ("batch",)), generated=t_state.generated, done=t_state.done,
        max_new=t_state.max_new, stop_ids=t_state.stop_ids, tokens=t_state.tokens, logprobs=t_state.logprobs,
        proposed=target._put(np.zeros(lengths.shape, np.int32), ("batch",)),
        accepted=target._put(np.zeros(lengths.shape, np.int32), ("batch",)))
    compiled = target.__dict__.setdefault("_speculative", {})  # one compiled loop per (draft, k)
    if (id(draft), k) not in compiled:
        compiled[(id(draft), k)] = (draft, _round_fn(target, draft, k))
    state = compiled[(id(draft), k)][1](target.params, draft.params, state, rows)
    tokens, logprobs, generated, proposed, accepted = jax.device_get(
        (state.tokens, state.logprobs, state.generated, state.proposed, state.accepted))
    results = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        ids, reason = finish([int(t) for t in tokens[i, :min(int(generated[i]), p.max_new_tokens)]], p)
        n = len(ids)
        results.append(Generation(prompt_ids=list(prompt), token_ids=ids,
                                  logprobs=[float(x) for x in logprobs[i, :n]], top_logprobs=[[] for _ in range(n)],
                                  finish_reason=reason))
    if stats is not None:
        rounds = int(np.max(proposed[:len(prompts)])) // k if len(prompts) else 0
        stats.append(SpeculativeStats(int(proposed[:len(prompts)].sum()), int(accepted[:len(prompts)].sum()), rounds))
    return results
