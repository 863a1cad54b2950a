"""The Llama-family decoder-only transformer, in Flax NNX, top to bottom.

RMSNorm -> grouped-query attention with rotary embeddings -> SwiGLU MLP, in
pre-norm residual blocks; the blocks are stored stacked (a leading `layers`
axis) and run with `jax.lax.scan` (against a KV cache, as a Python loop over
the layers: see `Transformer.with_cache`). Parameters carry logical axis names and
activations are pinned with `constrain`, so the same code runs on any mesh
(see sharding.py). Parameters live in the ModelConfig's `param_dtype`; how the
model runs (matmuls in the Execution's `compute_dtype`, remat, scan unrolling,
the pipeline schedule) is the Execution the Transformer is built with. Norms,
softmax and logits are float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import attention_kernel
from model.cache import Int8KV, KVCache, constrain_cache, quantize_kv
from model.config import Execution, ModelConfig
from model.pipeline import pipelined
from model.qkernel import project
from model.quant import QuantizedWeight, layer_of, quantize
from model.sharding import constrain, mesh_axis_size

F32 = jnp.float32


def _param(rngs: nnx.Rngs, config: ModelConfig, shape: tuple[int, ...], logical_axes: tuple[str, ...],
           init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, config.param_jnp_dtype)
    else:
        value = config.init_std * jax.random.normal(rngs.params(), shape, config.param_jnp_dtype)
    return nnx.Param(value, logical_axes=logical_axes)


class RMSNorm(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = config.norm_eps
        self.scale = _param(rngs, config, (config.d_model,), ("norm",), init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, length, act_embed]
        x32 = x.astype(F32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


# ----------------------------------------------------------------------------- rotary embeddings


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], with Llama 3.1 scaling when configured."""
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
    scaling = config.rope_scaling
    if scaling is not None:
        wavelen = 2 * np.pi / inv_freq
        low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
        high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
        smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > low_freq_wavelen, inv_freq / scaling.factor,
            np.where(wavelen < high_freq_wavelen, inv_freq, blended),
        )
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate pairs (i, i + head_dim/2) of x [batch, length, heads, head_dim] by position * freq."""
    angles = positions.astype(F32)[..., None] * inv_freq  # [batch, length, head_dim/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------- attention


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[batch, length, length] True where query i may see key j: j <= i, same document."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same_doc


def causal_blocks(length: int) -> int:
    """How many query blocks causal self-attention over `length` tokens is split into: blocks of
    at least 64 queries, at most 8 blocks, and a count that divides `length`."""
    blocks = max(1, min(8, length // 64))
    while length % blocks:
        blocks -= 1
    return blocks


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                            causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v with n_heads / n_kv_heads query heads per key/value head.

    q [batch, length, heads, head_dim]; k, v [batch, kv_length, kv_heads, head_dim];
    mask [batch, length, kv_length], True where a query may see a key. Scores and softmax
    are float32. `causal`: the mask never lets query i see key j > i (self-attention over
    the same positions), so the queries are split into blocks and block i only meets the
    keys up to its end -- the upper-triangle blocks, all masked, are never computed.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)  # [batch, length, kv_heads, group, head_dim]
    blocks = causal_blocks(length) if causal and length == k.shape[1] else 1
    size = length // blocks
    outs = []
    for i in range(blocks):  # a static loop: at most 8 blocks
        queries, seen = slice(i * size, (i + 1) * size), slice(0, (i + 1) * size if blocks > 1 else k.shape[1])
        scores = jnp.einsum("btkgd,bskd->bktgs", q[:, queries], k[:, seen], preferred_element_type=F32)
        scores = jnp.where(mask[:, None, queries, None, seen], scores * head_dim**-0.5, jnp.finfo(F32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [batch, kv_heads, length, group, kv_length]
        outs.append(jnp.einsum("bktgs,bskd->btkgd", probs, v[:, seen]))
    out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=1)
    return out.reshape(batch, length, heads, head_dim)


def cached_attention(q: jax.Array, k: jax.Array | Int8KV, v: jax.Array | Int8KV, mask: jax.Array) -> jax.Array:
    """Attention of new queries over one layer's cache, read in its stored layout.

    q [batch, length, heads, head_dim]; k, v [batch, kv_heads, cache_length, head_dim], float or Int8KV;
    mask [batch, length, cache_length]. Both dots batch over (row, kv head), whose keys and values are
    contiguous [cache_length, head_dim] matrices: the cache is never transposed. An int8 cache's values enter
    the dots as they are (converted to q's dtype); its scales, one per (row, kv head, position), multiply the
    scores (k's) and the probabilities (v's), which is the same sum as over the dequantised cache.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # [batch, kv_heads, group * length, head_dim]: the group's queries of every position as one matrix
    q = q.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, group * length, head_dim)
    key_scale = head_dim**-0.5  # [] or [batch, kv_heads, 1, cache_length]
    if isinstance(k, Int8KV):
        k, key_scale = k.values.astype(q.dtype), k.scale[:, :, None, :] * head_dim**-0.5
    scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=F32) * key_scale
    scores = scores.reshape(batch, kv_heads, group, length, -1)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [batch, kv_heads, group, length, cache_length]
    if isinstance(v, Int8KV):
        probs, v = probs * v.scale[:, :, None, None, :], v.values.astype(q.dtype)
    probs = probs.astype(v.dtype).reshape(batch, kv_heads, group * length, -1)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v).reshape(batch, kv_heads, group, length, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def _project(x: jax.Array, param: nnx.Param, dtype: Any, equation: str) -> jax.Array:
    """`jnp.einsum(equation, x, weight)` in the compute dtype. A quantised weight (model/quant.py) goes to
    model/qkernel.py: the CPU kernel where it applies, else dequantised where it is used."""
    value = param.get_value()
    if isinstance(value, QuantizedWeight):
        return project(x, value, dtype, equation, param.get_metadata().get("logical_axes"))
    return jnp.einsum(equation, x, value.astype(dtype))


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, execution: Execution, *, rngs: nnx.Rngs):
        d, h, kv, hd = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.dtype = execution.compute_jnp_dtype
        self.config = config
        self.wq = _param(rngs, config, (d, h, hd), ("embed", "heads", "head_dim"))
        self.wk = _param(rngs, config, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, config, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, config, (h, hd, d), ("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x [batch, length, act_embed] -> (out [batch, length, act_embed], cache).

        Without a cache: causal self-attention among the `length` tokens (mask [batch, length, length]).
        With one: this layer's keys and values are written at the rows' slots first, and the queries
        attend over the whole cache (mask [batch, length, cache_length])."""
        x = x.astype(self.dtype)
        q = _project(x, self.wq, self.dtype, "bld,dhk->blhk")
        k = _project(x, self.wk, self.dtype, "bld,dhk->blhk")
        v = _project(x, self.wv, self.dtype, "bld,dhk->blhk")
        inv_freq = rope_inverse_frequencies(self.config)  # a trace-time constant
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if cache is None:
            out = grouped_query_attention(q, k, v, mask, causal=True)  # [batch, length, heads, head_dim]
        else:
            cache = cache.write(k, v)
            out = cache.attend(q, positions, mask)
        out = _project(out, self.wo, self.dtype, "blhk,hkd->bld")
        return constrain(out, ("batch", "length", "act_embed")), cache


class LayerCache:
    """The whole KVCache seen from one layer (a static index): the layer writes its new keys and
    values at each row's slots and reads its own arrays; the other layers' arrays pass through."""

    def __init__(self, cache: KVCache, layer: int, starts: jax.Array, visible: int | None = None):
        self.cache, self.layer, self.starts = cache, layer, starts  # starts [batch]: each row's first new slot
        self.visible = visible  # attention reads the first `visible` slots (default: all)

    def at(self, layer: int) -> LayerCache:
        return LayerCache(self.cache, layer, self.starts, self.visible)

    def write(self, k: jax.Array, v: jax.Array) -> LayerCache:
        """k, v [batch, length, kv_heads, head_dim] into slots starts[b] .. starts[b] + length - 1 (quantised
        there when the cache is int8: each new (row, kv head, position) gets its own scale)."""
        rows = jnp.arange(k.shape[0])[:, None]
        slots = self.starts[:, None] + jnp.arange(k.shape[1])[None, :]  # [batch, length]

        def put(arrays: tuple, new: jax.Array) -> tuple:
            old = arrays[self.layer]  # [batch, kv_heads, cache_length, head_dim], or an Int8KV
            if isinstance(old, Int8KV):
                new = quantize_kv(new)  # values [batch, length, kv_heads, head_dim], scale [batch, length, kv_heads]
            updated = jax.tree.map(lambda o, n: o.at[rows, :, slots].set(n.astype(o.dtype), mode="drop"), old, new)
            return arrays[:self.layer] + (updated,) + arrays[self.layer + 1:]

        return LayerCache(KVCache(put(self.cache.k, k), put(self.cache.v, v)), self.layer, self.starts, self.visible)

    def attend(self, q: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """This layer's attention of q [batch, length, heads, head_dim] at `positions` [batch, length] over its
        cache (mask: `positions` as with_cache makes it): by the CPU kernel (model/attention_kernel.py) where it
        applies, which reads each row only as far as its queries see, else `cached_attention`."""
        reference = lambda: cached_attention(q, *self.keys_values(), mask)  # noqa: E731
        k, v = constrain_cache((self.cache.k[self.layer], self.cache.v[self.layer]))
        if not attention_kernel.applies(q, k):
            return reference()
        visible = k.shape[2] if self.visible is None else self.visible
        return attention_kernel.cached_attention(q, k, v, positions, visible, reference)

    def keys_values(self) -> tuple[jax.Array | Int8KV, jax.Array | Int8KV]:
        k, v = self.cache.k[self.layer], self.cache.v[self.layer]
        if self.visible is not None and self.visible < k.shape[2]:
            k, v = jax.tree.map(lambda x: x[:, :, :self.visible], (k, v))
        return constrain_cache((k, v))


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, config: ModelConfig, execution: Execution, *, rngs: nnx.Rngs):
        self.dtype = execution.compute_jnp_dtype
        self.w_gate = _param(rngs, config, (config.d_model, config.d_ff), ("embed", "mlp"))
        self.w_up = _param(rngs, config, (config.d_model, config.d_ff), ("embed", "mlp"))
        self.w_down = _param(rngs, config, (config.d_ff, config.d_model), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate = _project(x, self.w_gate, self.dtype, "bld,df->blf")
        up = _project(x, self.w_up, self.dtype, "bld,df->blf")
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return constrain(_project(hidden, self.w_down, self.dtype, "blf,fd->bld"), ("batch", "length", "act_embed"))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: ModelConfig, execution: Execution, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config, rngs=rngs)
        self.attn = Attention(config, execution, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, execution, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        attended, cache = self.attn(self.attn_norm(x), positions, mask, cache)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), cache


def _stacked_blocks(config: ModelConfig, execution: Execution, rngs: nnx.Rngs) -> Block:
    """n_layers Blocks whose parameters are stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(config, execution, rngs=rngs)

    return make(rngs)


REMAT_POLICY = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class Transformer(nnx.Module):
    """Token ids -> float32 logits over the vocabulary. `config` is what the model is (its parameters),
    `execution` how it runs (default: Execution(), float32 and a plain layer scan)."""

    def __init__(self, config: ModelConfig, execution: Execution | None = None, *, rngs: nnx.Rngs):
        execution = Execution() if execution is None else execution
        self.config = config
        self.execution = execution
        self.embedding = _param(rngs, config, (config.vocab_size, config.d_model), ("vocab", "embed"))
        self.layers = _stacked_blocks(config, execution, rngs)
        self.final_norm = RMSNorm(config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = _param(rngs, config, (config.d_model, config.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [batch, length] -> logits [batch, length, vocab] (float32).

        positions: each token's position for the rotary embedding (default 0..length-1).
        segment_ids: document ids of packed rows; a token attends only to earlier
        tokens with the same id (default: one document per row).
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        x = self._layers(self.embed(tokens), positions, attention_mask(segment_ids))
        return self.logits(x)

    def with_cache(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                   layer_params: list | None = None, visible: int | None = None) -> tuple[jax.Array, KVCache]:
        """Run new tokens against a KV cache: (hidden states [batch, length, act_embed], updated cache).

        tokens, positions [batch, length]: row b's tokens sit at slots positions[b] (consecutive,
        starting at positions[b, 0]); their keys and values are written there, and each token sees
        the cache slots up to its own position. Apply `logits` to the hidden states you need.
        The layers run as a Python loop (static layer indices: each layer reads and updates its own
        cache arrays in place; compile time grows with n_layers). layer_params: `self.layer_params()`;
        a decode loop makes it once, outside the loop, instead of slicing the stacked weights per step.
        visible: attend over the cache's first `visible` slots only (every position of these tokens must be
        below it): a batch whose rows are short need not read a long cache.
        """
        visible = cache.length if visible is None else min(visible, cache.length)
        slots = jnp.arange(visible)
        mask = slots[None, None, :] <= positions[:, :, None]  # [batch, length, cache_length]
        if layer_params is None:
            layer_params = self.layer_params()
        graphdef = nnx.split(self.layers)[0]
        x = self.embed(tokens)
        view = LayerCache(cache, 0, positions[:, 0].astype(jnp.int32), visible)
        for layer, params in enumerate(layer_params):
            x, view = nnx.merge(graphdef, params)(x, positions, mask, view.at(layer))
        return x, view.cache

    def layer_params(self) -> list:
        """Each layer's parameters as separate arrays (copies of the stacked ones; a quantised weight stays
        quantised)."""
        stacked = nnx.split(self.layers)[1]
        return [jax.tree.map(lambda p, layer=layer: layer_of(p, layer), stacked,
                             is_leaf=lambda p: isinstance(p, QuantizedWeight))
                for layer in range(self.config.n_layers)]

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, length] -> [batch, length, act_embed] in the compute dtype."""
        # ZeRO-3: gather the table's `embed` shards, keep `vocab` split for the lookup.
        table = constrain(self.embedding[...], ("vocab", "act_embed"))
        x = jnp.take(table, tokens, axis=0).astype(self.execution.compute_jnp_dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def head(self) -> jax.Array | QuantizedWeight:
        """The LM head as [embed, vocab] in the compute dtype (the transposed table when tied): a decode
        loop makes it once, outside the loop, instead of relaying the table out every step. A quantised
        model's head is quantised: an untied one as it was loaded; a tied one (the embedding table stays float
        for the lookup) made here, in llama.cpp's Q8_0 (blocks of 32 along `embed`, which gives back a Q8_0
        table's own values, e.g. SmolLM2's), or int8 per channel where 32 does not divide `embed`."""
        dtype = self.execution.compute_jnp_dtype
        if not self.config.tie_embeddings:
            value = self.lm_head.get_value()
            return value if isinstance(value, QuantizedWeight) else value.astype(dtype)
        if self.is_quantized():
            format = "q8_0" if self.config.d_model % 32 == 0 else "int8"
            head = quantize(self.embedding[...].T, format, name="embedding (the tied LM head)")
            return head.replace(activations=self._quantized()[0].activations)  # as the layers' matmuls do
        return self.embedding[...].T.astype(dtype)

    def is_quantized(self) -> bool:
        """Whether the layers' weights are quantised (model/quant.py)."""
        return bool(self._quantized())

    def _quantized(self) -> list[QuantizedWeight]:
        return [v for v in jax.tree.leaves(nnx.split(self.layers)[1], is_leaf=lambda v: isinstance(v, QuantizedWeight))
                if isinstance(v, QuantizedWeight)]

    def logits(self, x: jax.Array, head: jax.Array | QuantizedWeight | None = None) -> jax.Array:
        """Final norm and LM head: [batch, length, act_embed] -> float32 logits [batch, length, vocab].
        head: `self.head()`, made once by a decode loop (default: made here)."""
        dtype = self.execution.compute_jnp_dtype
        x = self.final_norm(x)
        if head is None and self.config.tie_embeddings and not self.is_quantized():
            logits = jnp.einsum("bld,vd->blv", x, self.embedding[...].astype(dtype), preferred_element_type=F32)
        else:
            head = self.head() if head is None else head
            if isinstance(head, QuantizedWeight):
                names = self.embedding.get_metadata().get("logical_axes", (None, None))[::-1] \
                    if self.config.tie_embeddings else self.lm_head.get_metadata().get("logical_axes")
                logits = project(x.astype(dtype), head, dtype, "bld,dv->blv", names).astype(F32)
            else:
                logits = jnp.einsum("bld,dv->blv", x, head, preferred_element_type=F32)
        return constrain(logits, ("batch", "length", "vocab"))

    def _layers(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """The stacked blocks, run by lax.scan; as a pipeline over the `stage` mesh axis when it has more
        than one device (model/pipeline.py)."""
        execution = self.execution
        graphdef, stacked = nnx.split(self.layers)

        def run(params, x, positions, mask):  # a run of layers (params: [layers, ...]) on x
            def layer(x, params):
                return nnx.merge(graphdef, params)(x, positions, mask)[0], None

            if execution.remat != "none":
                layer = jax.checkpoint(layer, policy=REMAT_POLICY[execution.remat], prevent_cse=False)
            count = jax.tree.leaves(params)[0].shape[0]
            return jax.lax.scan(layer, x, params, unroll=min(execution.scan_unroll, count))[0]

        stages = mesh_axis_size("stage")
        if stages > 1:
            return pipelined(run, stacked, x, positions, mask, stages, execution.pipeline_microbatches,
                             execution.pipeline_virtual_stages)
        return run(stacked, x, positions, mask)
