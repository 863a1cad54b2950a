"""The model's forward pass against an independent plain-numpy Llama reference.

The reference below is written from the Hugging Face Llama definition (RMSNorm,
rotary embeddings with the rotate_half convention and optional Llama-3.1
frequency scaling, grouped-query causal attention restricted to a segment, SwiGLU
MLP), computed in float64, and fed the model's own weights. Weights are redrawn
so that the logits are O(1), not near zero, and a 1e-5 comparison is meaningful.
Each test also checks that the feature it is about changes the logits, so that
it could fail.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import RopeScaling, abstract_model, get_preset, init_model

RTOL = 1e-5
ATOL = 1e-5
# Weight scales for the redrawn models: logits come out with std ~1 (max ~5), large
# enough that a 1e-5 comparison is a strict one, small enough that float32 rounding
# in the model stays below it (a float32 run of the numpy reference itself is off
# from the float64 one by 2-5e-6 here; at larger scales both exceed 1e-5). The small
# embedding also makes the norm epsilon matter in the first layer.
GAIN = 1.0
EMBED_STD = 0.15


# ---------------------------------------------------------------- numpy reference


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def _inv_freq(head_dim, theta, rope_scaling):
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope_scaling is None:
        return inv_freq
    # Hugging Face `_compute_llama3_parameters`.
    factor = rope_scaling.factor
    low = rope_scaling.low_freq_factor
    high = rope_scaling.high_freq_factor
    original = rope_scaling.original_max_seq_len
    low_freq_wavelen = original / low
    high_freq_wavelen = original / high
    wavelen = 2.0 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope(x, positions, inv_freq):
    """x [B, T, H, D], positions [B, T]."""
    angle = positions[..., None].astype(inv_freq.dtype) * inv_freq  # [B, T, D/2]
    angle = np.concatenate([angle, angle], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    return x * np.cos(angle) + _rotate_half(x) * np.sin(angle)


def _attention(x, p, cfg, positions, segment_ids, inv_freq):
    """x [B, T, d_model] (already normalised); p: this layer's attention weights."""
    q = np.einsum("btd,dhk->bthk", x, p["wq"])
    k = np.einsum("btd,dhk->bthk", x, p["wk"])
    v = np.einsum("btd,dhk->bthk", x, p["wv"])
    q = _rope(q, positions, inv_freq)
    k = _rope(k, positions, inv_freq)
    t = x.shape[1]
    causal = np.tril(np.ones((t, t), dtype=bool))  # [query i, key j]: j <= i
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, i, j]
    allowed = causal[None] & same_doc
    group = cfg.n_heads // cfg.n_kv_heads
    out = np.zeros_like(x)
    for h in range(cfg.n_heads):
        kv = h // group
        scores = np.einsum("bik,bjk->bij", q[:, :, h], k[:, :, kv]) / math.sqrt(cfg.head_dim)
        scores = np.where(allowed, scores, -np.inf)
        probs = _softmax(scores)
        head_out = np.einsum("bij,bjk->bik", probs, v[:, :, kv])
        out = out + head_out @ p["wo"][h]
    return out


def _mlp(x, p):
    return (_silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def reference_logits(w, cfg, tokens, positions=None, segment_ids=None, rope_scaling="config", dtype=np.float64):
    """Llama forward pass in `dtype` (float64 by default). `rope_scaling` overrides cfg.rope_scaling."""
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(t), (b, t))
    if segment_ids is None:
        segment_ids = np.ones((b, t), dtype=np.int32)
    positions = np.asarray(positions)
    segment_ids = np.asarray(segment_ids)
    w = jax.tree.map(lambda a: np.asarray(a, dtype=dtype), w)
    scaling = cfg.rope_scaling if rope_scaling == "config" else rope_scaling
    inv_freq = _inv_freq(cfg.head_dim, cfg.rope_theta, scaling).astype(dtype)

    x = w["embedding"][tokens]
    layers = w["layers"]
    for i in range(cfg.n_layers):
        layer = jax.tree.map(lambda a, i=i: a[i], layers)
        h = _rms_norm(x, layer["attn_norm"]["scale"], cfg.norm_eps)
        x = x + _attention(h, layer["attn"], cfg, positions, segment_ids, inv_freq)
        h = _rms_norm(x, layer["mlp_norm"]["scale"], cfg.norm_eps)
        x = x + _mlp(h, layer["mlp"])
    x = _rms_norm(x, w["final_norm"]["scale"], cfg.norm_eps)
    head = w["embedding"].T if cfg.tie_embeddings else w["lm_head"]
    return x @ head


# ---------------------------------------------------------------- helpers


def _model_with_random_weights(cfg, seed, gain=GAIN, embed_std=EMBED_STD, initialise=False):
    """A model whose weights are redrawn so the logits are O(1), not near zero.

    Matrices are normal with std gain / sqrt(fan_in) (fan_in: the dimensions contracted
    in the forward pass), the embedding normal with std embed_std, norm scales uniform
    in [0.5, 1.5]. The model is built abstractly (shapes only, fast) and then given
    these weights, or with initialise=True built by init_model first.
    """
    m = init_model(cfg, seed=seed) if initialise else abstract_model(cfg, seed=seed)
    pure = nnx.to_pure_dict(nnx.state(m))
    rng = np.random.default_rng(seed + 1234)
    hd = cfg.n_heads * cfg.head_dim
    fan_in = {"wq": cfg.d_model, "wk": cfg.d_model, "wv": cfg.d_model, "wo": hd,
              "w_gate": cfg.d_model, "w_up": cfg.d_model, "w_down": cfg.d_ff, "lm_head": cfg.d_model}
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    new_leaves = []
    for path, leaf in paths_leaves:
        name = str(path[-1].key)
        if name == "scale":
            new = rng.uniform(0.5, 1.5, size=leaf.shape)
        elif name == "embedding":
            new = rng.normal(0.0, embed_std, size=leaf.shape)
        else:
            new = rng.normal(0.0, gain / math.sqrt(fan_in[name]), size=leaf.shape)
        new_leaves.append(new.astype(leaf.dtype))
    new_pure = jax.tree_util.tree_unflatten(treedef, new_leaves)
    nnx.update(m, jax.tree.map(jnp.asarray, new_pure))
    got = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(new_pure), strict=True):
        np.testing.assert_array_equal(a, b)  # the update really took
    return m, new_pure


def _tokens(cfg, batch, length, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, length)).astype(np.int32)


def _compare(m, w, cfg, tokens, positions=None, segment_ids=None):
    args = [tokens]
    if positions is not None or segment_ids is not None:
        args.append(None if positions is None else np.asarray(positions, dtype=np.int32))
    if segment_ids is not None:
        args.append(np.asarray(segment_ids, dtype=np.int32))
    got = np.asarray(m(*[None if a is None else jnp.asarray(a) for a in args]))
    want = reference_logits(w, cfg, tokens, positions, segment_ids)
    assert got.dtype == np.float32
    assert got.shape == want.shape == (*tokens.shape, cfg.vocab_size)
    # The comparison only means something when the logits are not all tiny.
    assert np.std(want) > 0.5, f"logits too small to be a meaningful check: std {np.std(want)}"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    return got, want


# ---------------------------------------------------------------- tests


def test_tiny_default_positions_and_segments():
    cfg = get_preset("tiny")
    m, w = _model_with_random_weights(cfg, seed=0, initialise=True)
    _compare(m, w, cfg, _tokens(cfg, 2, 16, seed=1))


def test_tied_embeddings_with_uneven_positions_and_packed_segments():
    cfg = get_preset("tiny").replace(tie_embeddings=True)
    m, w = _model_with_random_weights(cfg, seed=2)
    assert "lm_head" not in w
    b, t = 2, 16
    tokens = _tokens(cfg, b, t, seed=3)
    # Rotary attention depends only on position differences, so a constant offset alone
    # would be indistinguishable from the default positions: the gaps here are uneven.
    gaps = np.random.default_rng(3).integers(1, 4, size=(b, t))
    positions = 5 + np.cumsum(gaps, axis=1)  # row 0: one run of uneven positions from 6
    positions[1, 7:] -= positions[1, 7]  # row 1: positions restart at its second document
    segment_ids = np.array([[1] * 9 + [2] * 7, [1] * 7 + [2] * 9], dtype=np.int32)
    got, _ = _compare(m, w, cfg, tokens, positions, segment_ids)

    # The positions matter: the default ones give other logits.
    default_positions = reference_logits(w, cfg, tokens, segment_ids=segment_ids)
    assert not np.allclose(default_positions, got, rtol=1e-3, atol=1e-3)

    # The segment rule matters: ignoring it gives different logits for the second document.
    unsegmented = reference_logits(w, cfg, tokens, positions)
    assert not np.allclose(unsegmented[:, 9:], got[:, 9:], rtol=RTOL, atol=ATOL)
    # and the first document's logits are those of the first document alone.
    alone = reference_logits(w, cfg, tokens[:, :7], positions[:, :7])
    np.testing.assert_allclose(got[:, :7], alone, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("original_max_seq_len", [16, 64])
def test_llama3_rope_scaling(original_max_seq_len):
    scaling = RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=original_max_seq_len
    )
    cfg = get_preset("tiny").replace(rope_scaling=scaling, rope_theta=10000.0)
    m, w = _model_with_random_weights(cfg, seed=4)
    b, t = 2, 16
    tokens = _tokens(cfg, b, t, seed=5)
    positions = np.stack([np.arange(t) * 6 + 10, np.arange(t) + 85]).astype(np.int32)  # up to 100
    assert positions.max() == 100
    # Which of the three frequency bands (kept, smoothed, divided by factor) are exercised:
    # with head_dim 8 the wavelengths are 2pi * 10^(0, 1, 2, 3); a 16-token original
    # context has no kept band (that needs a wavelength < 4), a 64-token one has all three.
    wavelen = 2 * math.pi / _inv_freq(cfg.head_dim, cfg.rope_theta, None)
    low_wavelen, high_wavelen = original_max_seq_len / 1.0, original_max_seq_len / 4.0
    kept, divided = wavelen < high_wavelen, wavelen > low_wavelen
    assert (~kept & ~divided).any() and divided.any()
    assert kept.any() == (original_max_seq_len == 64)

    got, want = _compare(m, w, cfg, tokens, positions)
    unscaled = reference_logits(w, cfg, tokens, positions, rope_scaling=None)
    assert not np.allclose(unscaled, want, rtol=1e-3, atol=1e-3)
    assert not np.allclose(unscaled, got, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("head_dim", [16, 4])
def test_explicit_head_dim(head_dim):
    cfg = get_preset("tiny").replace(head_dim=head_dim)
    assert cfg.head_dim != cfg.d_model // cfg.n_heads
    m, w = _model_with_random_weights(cfg, seed=6)
    assert w["layers"]["attn"]["wq"].shape == (cfg.n_layers, cfg.d_model, cfg.n_heads, head_dim)
    b, t = 2, 12
    positions = np.broadcast_to(2 * np.arange(t) + 3, (b, t))  # stride 2: differences matter
    _compare(m, w, cfg, _tokens(cfg, b, t, seed=7), positions)


@pytest.mark.parametrize("length", [128, 192])
def test_causal_blocks_over_long_packed_rows(length):
    """Rows long enough that attention skips the blocks above the diagonal (2 and 3 query blocks),
    with documents that straddle block boundaries."""
    from model.transformer import causal_blocks

    cfg = get_preset("tiny").replace(max_seq_len=256)
    assert causal_blocks(length) == length // 64
    m, w = _model_with_random_weights(cfg, seed=5)
    tokens = _tokens(cfg, 2, length, seed=6)
    cuts = [[0, 50, 100, length], [0, 70, length - 5, length]]  # document boundaries per row
    segment_ids = np.zeros((2, length), np.int32)
    positions = np.zeros((2, length), np.int32)
    for row, bounds in enumerate(cuts):
        for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            segment_ids[row, start:end] = doc + 1
            positions[row, start:end] = np.arange(end - start)
    _compare(m, w, cfg, tokens, positions, segment_ids)
