"""The Llama-family decoder-only transformer, in Flax NNX, top to bottom.

RMSNorm -> grouped-query attention with rotary embeddings -> SwiGLU MLP, in
pre-norm residual blocks; the blocks are stored stacked (a leading `layers`
axis) and run with `jax.lax.scan`. Parameters carry logical axis names and
activations are pinned with `constrain`, so the same code runs on any mesh
(see sharding.py). Parameters live in `param_dtype`, matmuls run in
`compute_dtype`, and norms, softmax and logits are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import ModelConfig
from model.sharding import constrain

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


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v with n_heads / n_kv_heads query heads per key/value head.

    q [batch, length, heads, head_dim]; k, v [batch, kv_length, kv_heads, head_dim];
    mask [batch, length, kv_length]. JAX's implementation: scores and softmax in float32, and
    cuDNN's fused kernel where one applies.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=q.shape[-1] ** -0.5)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.dtype = config.compute_jnp_dtype
        self.config = config
        self.wq = _param(rngs, config, (d, h, hd), ("embed", "heads", "head_dim"))
        self.wk = _param(rngs, config, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, config, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, config, (h, hd, d), ("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)  # [batch, length, act_embed]
        q = jnp.einsum("bld,dhk->blhk", x, self.wq[...].astype(self.dtype))
        k = jnp.einsum("bld,dhk->blhk", x, self.wk[...].astype(self.dtype))
        v = jnp.einsum("bld,dhk->blhk", x, self.wv[...].astype(self.dtype))
        inv_freq = rope_inverse_frequencies(self.config)  # a trace-time constant
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        out = grouped_query_attention(q, k, v, mask)  # [batch, length, heads, head_dim]
        out = jnp.einsum("blhk,hkd->bld", out, self.wo[...].astype(self.dtype))
        return constrain(out, ("batch", "length", "act_embed"))


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = config.compute_jnp_dtype
        self.w_gate = _param(rngs, config, (config.d_model, config.d_ff), ("embed", "mlp"))
        self.w_up = _param(rngs, config, (config.d_model, config.d_ff), ("embed", "mlp"))
        self.w_down = _param(rngs, config, (config.d_ff, config.d_model), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate = x @ self.w_gate[...].astype(self.dtype)
        up = x @ self.w_up[...].astype(self.dtype)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return constrain(hidden @ self.w_down[...].astype(self.dtype), ("batch", "length", "act_embed"))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), positions, mask)
        return x + self.mlp(self.mlp_norm(x))


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    """n_layers Blocks whose parameters are stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=rngs)

    return make(rngs)


REMAT_POLICY = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


class Transformer(nnx.Module):
    """Token ids -> float32 logits over the vocabulary."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedding = _param(rngs, config, (config.vocab_size, config.d_model), ("vocab", "embed"))
        self.layers = _stacked_blocks(config, rngs)
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
        config, dtype = self.config, self.config.compute_jnp_dtype
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        mask = attention_mask(segment_ids)

        # ZeRO-3: gather the table's `embed` shards, keep `vocab` split for the lookup.
        table = constrain(self.embedding[...], ("vocab", "act_embed"))
        x = jnp.take(table, tokens, axis=0).astype(dtype)
        x = constrain(x, ("batch", "length", "act_embed"))

        graphdef, stacked = nnx.split(self.layers)

        def layer(x, params):
            return nnx.merge(graphdef, params)(x, positions, mask), None

        if config.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICY[config.remat], prevent_cse=False)
        x, _ = jax.lax.scan(layer, x, stacked)

        x = self.final_norm(x)
        if config.tie_embeddings:
            logits = jnp.einsum("bld,vd->blv", x, self.embedding[...].astype(dtype), preferred_element_type=F32)
        else:
            logits = jnp.einsum("bld,dv->blv", x, self.lm_head[...].astype(dtype), preferred_element_type=F32)
        return constrain(logits, ("batch", "length", "vocab"))
