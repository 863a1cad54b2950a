"""The int8 KV cache (`--kv-cache int8`, model/cache.py's Int8KV) against plain-numpy references: what a write
stores, the attention over it, a whole model reading it (the float64 reference of test_numpy_reference.py with
its keys and values quantised), the same decode on a mesh and in the serving engine, and how far it moves greedy
decoding from the float cache."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_numpy_reference import _inv_freq, _mlp, _model_with_random_weights, _rms_norm, _rope, _softmax, _tokens

from infer.decode import Decoder
from infer.engine import Engine
from infer.sampling import SamplingParams
from model import get_preset, init_model, make_mesh
from model.cache import Int8KV, cache_bytes, init_cache, quantize_kv
from model.errors import ModelError
from model.transformer import LayerCache, cached_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = get_preset("tiny").replace(init_std=0.3)  # as tests/test_decode.py: peaked, varied distributions


def _numpy_quantised(x):
    """Symmetric int8 over the last axis, in float64: (dequantised x, scale per vector)."""
    x = np.asarray(x, np.float64)
    scale = np.abs(x).max(axis=-1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    return np.round(x / safe) * scale[..., None], scale


# ----------------------------------------------------------------------------- what a write stores


def test_a_write_quantises_each_row_head_and_position_within_half_a_step():
    """New keys (different magnitudes per row, head and position, one all-zero vector) written at each row's own
    slots: every stored (row, kv head, position) has scale max|x| / 127 and dequantises within half a step of x;
    the slots not written keep their zeros."""
    batch, new, kv_heads, head_dim = 3, 5, CONFIG.n_kv_heads, CONFIG.head_dim
    rng = np.random.default_rng(0)
    k = rng.normal(size=(batch, new, kv_heads, head_dim)) * 10.0 ** rng.uniform(-3, 2, (batch, new, kv_heads, 1))
    k[1, 2, 3] = 0.0
    k = k.astype(np.float32)
    starts = np.array([0, 7, 11], np.int32)
    cache = init_cache(CONFIG, batch, 24, jnp.int8)
    view = LayerCache(cache, 1, jnp.asarray(starts)).write(jnp.asarray(k), jnp.asarray(-k))
    stored, _ = view.keys_values()
    assert isinstance(stored, Int8KV) and stored.values.dtype == jnp.int8 and stored.scale.dtype == jnp.float32
    values, scale = np.asarray(stored.values), np.asarray(stored.scale)  # [batch, kv_heads, 24(, head_dim)]
    _, want_scale = _numpy_quantised(k)  # [batch, new, kv_heads]
    for b, start in enumerate(starts):
        got_scale = scale[b, :, start:start + new].transpose(1, 0)  # [new, kv_heads]
        got = (values[b, :, start:start + new].astype(np.float64) * scale[b, :, start:start + new, None])
        got = got.transpose(1, 0, 2)  # [new, kv_heads, head_dim]
        np.testing.assert_allclose(got_scale, want_scale[b], rtol=1e-6, atol=0)
        # half a step, plus float32's rounding of x / scale (|x / scale| <= 127: < 1e-5 of a step)
        assert np.all(np.abs(got - k[b]) <= want_scale[b][..., None] * (0.5 + 1e-5))
        written = np.zeros(24, bool)
        written[start:start + new] = True
        assert not values[b][:, ~written].any() and not scale[b][:, ~written].any()
    assert np.abs(values).max() == 127 and scale[1, 3, 7 + 2] == 0 and not values[1, 3, 7 + 2].any()
    other = view.cache.k[0]  # the other layer passes through untouched
    assert not np.asarray(other.values).any() and not np.asarray(other.scale).any()


# ----------------------------------------------------------------------------- the attention


def _numpy_cached_attention(q, k, v, mask):
    """float64: q [batch, length, heads, head_dim] over k, v [batch, kv_heads, cache_length, head_dim]."""
    batch, length, heads, head_dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros(q.shape)
    for h in range(heads):
        scores = np.einsum("bld,bsd->bls", q[:, :, h], k[:, h // group]) / math.sqrt(head_dim)
        probs = _softmax(np.where(mask, scores, -np.inf))
        out[:, :, h] = np.einsum("bls,bsd->bld", probs, v[:, h // group])
    return out


def test_attention_over_an_int8_cache_equals_numpy_over_the_dequantised_cache():
    """The scales folded into the scores and the probabilities are the same sum as attention over the dequantised
    cache (numpy, float64), to float32 rounding; the float cache it came from gives visibly other outputs."""
    batch, length, heads, kv_heads, head_dim, slots = 2, 3, 8, 2, 64, 40
    rng = np.random.default_rng(1)
    q = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
    k = (rng.normal(size=(batch, kv_heads, slots, head_dim)) * 2).astype(np.float32)
    v = rng.normal(size=(batch, kv_heads, slots, head_dim)).astype(np.float32)
    positions = np.array([[20, 21, 22], [35, 36, 37]])
    mask = np.arange(slots)[None, None, :] <= positions[:, :, None]
    k8, v8 = quantize_kv(jnp.asarray(k)), quantize_kv(jnp.asarray(v))
    got = np.asarray(cached_attention(jnp.asarray(q), k8, v8, jnp.asarray(mask)))

    def dequantised(entry):
        return np.asarray(entry.values, np.float64) * np.asarray(entry.scale, np.float64)[..., None]

    want = _numpy_cached_attention(q.astype(np.float64), dequantised(k8), dequantised(v8), mask)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # outputs O(1): float32 rounding
    unquantised = _numpy_cached_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), mask)
    assert np.abs(unquantised - want).max() > 100 * 2e-6  # the test sees the quantisation


# ----------------------------------------------------------------------------- a whole model


def _numpy_logits(w, cfg, tokens, quantised=False, codes=None):
    """test_numpy_reference's float64 Llama (its helpers), one row; with `quantised`, every layer's keys (after
    the rotary embedding) and values are quantised per (position, kv head) over head_dim.

    codes: an int8 cache's k and v codes per layer ([kv_heads, positions, head_dim]) to use instead of this
    function's own rounding. float32 and float64 may round an entry at a tie (x / scale within 1e-5 of n + 1/2:
    among thousands of entries some are) to neighbouring codes; the codes must equal this function's own except
    within 1e-3 of a tie, and the model then runs on the same codes."""
    tokens = np.asarray(tokens)[None]
    positions = np.arange(tokens.shape[1])[None]
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), w)
    inv_freq = _inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    causal = np.tril(np.ones((tokens.shape[1],) * 2, bool))[None]
    group = cfg.n_heads // cfg.n_kv_heads

    def quantise(x, stored):  # x [1, positions, kv_heads, head_dim]
        dequantised, scale = _numpy_quantised(x)
        if stored is None:
            return dequantised
        steps = x / np.where(scale > 0, scale, 1.0)[..., None]
        stored = np.asarray(stored).transpose(1, 0, 2)[None, :x.shape[1]]
        differ = stored != np.round(steps)
        assert np.all(np.abs(np.abs(steps - np.floor(steps)) - 0.5)[differ] < 1e-3), "codes differ off a tie"
        assert np.all(np.abs(stored - np.round(steps)) <= 1)
        return stored * scale[..., None]

    x = w["embedding"][tokens]
    for i in range(cfg.n_layers):
        p = jax.tree.map(lambda a, i=i: a[i], w["layers"])
        h = _rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
        q = _rope(np.einsum("btd,dhk->bthk", h, p["attn"]["wq"]), positions, inv_freq)
        k = _rope(np.einsum("btd,dhk->bthk", h, p["attn"]["wk"]), positions, inv_freq)
        v = np.einsum("btd,dhk->bthk", h, p["attn"]["wv"])
        if quantised:
            k, v = (quantise(x, None if codes is None else codes[i][j]) for j, x in enumerate((k, v)))
        for head in range(cfg.n_heads):
            scores = np.einsum("bik,bjk->bij", q[:, :, head], k[:, :, head // group]) / math.sqrt(cfg.head_dim)
            probs = _softmax(np.where(causal, scores, -np.inf))
            x = x + np.einsum("bij,bjk->bik", probs, v[:, :, head // group]) @ p["attn"]["wo"][head]
        x = x + _mlp(_rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps), p["mlp"])
    x = _rms_norm(x, w["final_norm"]["scale"], cfg.norm_eps)
    return (x @ (w["embedding"].T if cfg.tie_embeddings else w["lm_head"]))[0]


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _cached_logits(model, cfg, ids, dtype):
    """Logits of `ids` through the KV-cache path (20 tokens prefilled in chunks of 7, then one at a time) and
    the cache's k and v codes per layer ([kv_heads, positions, head_dim]; int8 only)."""
    cache = init_cache(cfg, 1, 32, dtype)
    step = jax.jit(lambda tokens, positions, cache: (lambda h_c: (model.logits(h_c[0]), h_c[1]))(
        model.with_cache(tokens, positions, cache)))
    out = []
    for start, end in [(0, 7), (7, 14), (14, 20), *((p, p + 1) for p in range(20, len(ids)))]:
        logits, cache = step(jnp.asarray([ids[start:end]]), jnp.arange(start, end)[None], cache)
        out.append(np.asarray(logits[0]))
    codes = None
    if isinstance(cache.k[0], Int8KV):
        codes = [(np.asarray(k.values[0]), np.asarray(v.values[0])) for k, v in zip(cache.k, cache.v, strict=True)]
    return np.concatenate(out), codes


@pytest.fixture(scope="module")
def redrawn():
    """tiny with head_dim 16 (its d_model / heads is 8) and weights redrawn as in test_numpy_reference.py, so
    that the logits are O(1): (config, model, weights as a dict)."""
    cfg = get_preset("tiny").replace(head_dim=16)
    return (cfg, *_model_with_random_weights(cfg, seed=5))


def test_a_model_reading_an_int8_cache_equals_numpy_with_quantised_keys_and_values(redrawn):
    """Prefill and single steps over an int8 cache give the logits of the float64 numpy Llama whose attention
    reads quantised keys and values (the cache's codes where it rounded a tie the other way), to the 1e-5 of
    test_numpy_reference.py. Without the quantisation numpy is further away than that (the test sees the int8
    cache), and the float cache matches that unquantised model as before."""
    cfg, model, w = redrawn
    ids = _tokens(cfg, 1, 28, seed=6)[0].tolist()
    got, codes = _cached_logits(model, cfg, ids, jnp.int8)
    want = _numpy_logits(w, cfg, ids, quantised=True, codes=codes)
    assert np.std(want) > 0.5  # O(1) logits: a 1e-5 comparison means something
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    unquantised = _numpy_logits(w, cfg, ids)
    assert np.abs(unquantised - want).max() > 1e-3
    np.testing.assert_allclose(_cached_logits(model, cfg, ids, jnp.float32)[0], unquantised, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def model():
    return init_model(CONFIG, seed=3)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def test_int8_decode_on_a_mesh_equals_one_device(model):
    """{data 2, tensor 4}: rows over data, kv heads over tensor, for the int8 values and their scales alike."""
    graphdef, params = nnx.split(model)
    one = Decoder(CONFIG, graphdef, params, prefill_chunk=64, kv_cache="int8")
    sharded = Decoder(CONFIG, graphdef, params, prefill_chunk=64, kv_cache="int8",
                      mesh=make_mesh({"data": 2, "tensor": 4}))
    prompts = _prompts([7, 33, 12], seed=8)
    sampling = [SamplingParams(max_new_tokens=9, temperature=0.0, logprobs=5),
                SamplingParams(max_new_tokens=9, temperature=0.7, seed=3, logprobs=5),
                SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.9, seed=4, logprobs=5)]
    for a, b in zip(one.generate_ids(prompts, sampling), sharded.generate_ids(prompts, sampling), strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    cache = sharded.new_cache(2, 16)
    assert tuple(cache.k[0].values.sharding.spec) == (("data", "fsdp"), "tensor", None, None)
    assert tuple(cache.k[0].scale.sharding.spec) == (("data", "fsdp"), "tensor", None)


def test_int8_engine_with_prefix_cache_hits_equals_the_int8_decode_loop(model):
    """The engine copies rows (insert), keeps a finished sequence (extract) and reuses it (resize): the scales
    travel with the values, so every request gets the decode loop's tokens, on a {data 2, tensor 2} mesh."""
    from infer.scheduler import Request, Scheduler

    graphdef, params = nnx.split(model)
    engine = Engine(CONFIG, graphdef, params, slots=2, max_length=128, kv_cache="int8",
                    mesh=make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4]))
    decoder = Decoder(CONFIG, graphdef, params, kv_cache="int8")
    system = _prompts([40], seed=1)[0]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    work = [(system + [5, 6], greedy), (system + [9], greedy),
            (system + [1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.8, seed=4))]
    scheduler = Scheduler(engine, prefix_cache_bytes=1 << 24)
    tokens = [[] for _ in work]
    for i, (prompt, sampling) in enumerate(work):
        scheduler.submit(Request(prompt, sampling, lambda event, i=i: tokens[i].extend(event.token_ids)))
    while scheduler.queue or scheduler.busy:
        scheduler.step()
    assert scheduler.prefix_cache.hits >= 1
    prompts, sampling = zip(*work, strict=True)
    assert tokens == [r.token_ids for r in decoder.generate_ids(prompts, sampling)]
    assert "x the slots of float32" in engine.cache_summary()


def test_int8_greedy_decode_departs_from_the_float_cache_only_where_numpy_says_it_may(redrawn):
    """Greedy decoding with int8 and float caches from the same prompts. Up to the first token where the two
    differ both runs have fed the same tokens, so they differ only by the cache; the bound on that difference
    comes from the numpy model: DELTA_j, the most any log-probability at step j moves between numpy with and
    without quantised keys and values. Until the runs part, each int8 log-probability is within DELTA_j of the
    float one, and they may part only at a step whose float top two are within 2 DELTA_j (otherwise int8 could
    not reorder them). Slack 1e-3: a tie that float32 rounds to the neighbouring code moves a log-probability by
    up to 7e-4 on these models (seen as the numpy reference's own error in a run without `codes`)."""
    cfg, model, w = redrawn
    graphdef, params = nnx.split(model)
    prompts = _prompts([5, 17, 30, 44, 9, 60], seed=11)
    sampling = SamplingParams(max_new_tokens=24, temperature=0.0)
    floats = Decoder(cfg, graphdef, params).generate_ids(prompts, sampling)
    int8s = Decoder(cfg, graphdef, params, kv_cache="int8").generate_ids(prompts, sampling)
    agreed = total = 0
    for prompt, f, q in zip(prompts, floats, int8s, strict=True):
        n = len(f.token_ids)
        ids = prompt + f.token_ids
        exact = _log_softmax(_numpy_logits(w, cfg, ids))[len(prompt) - 1:-1]  # [n, vocab]: before each token
        delta = np.abs(_log_softmax(_numpy_logits(w, cfg, ids, quantised=True))[len(prompt) - 1:-1] - exact).max(-1)
        same = next((j for j, (a, b) in enumerate(zip(f.token_ids, q.token_ids, strict=True)) if a != b), n)
        assert np.all(np.abs(np.subtract(q.logprobs[:same], f.logprobs[:same])) <= delta[:same] + 1e-3)
        if same < n:
            top = np.sort(exact[same])
            assert top[-1] - top[-2] < 2 * delta[same] + 1e-3, (same, top[-1] - top[-2], delta[same])
        agreed, total = agreed + same, total + n
    assert agreed >= 0.9 * total, (agreed, total)  # "most": 100% here, 95% with head_dim 8


# ----------------------------------------------------------------------------- memory and bad input


@pytest.mark.parametrize("preset, ratio", [("smollm2-135m", 256 / 68), ("llama3-8b", 512 / 132)])
def test_int8_bytes_per_slot(preset, ratio):
    """int8 + a float32 scale per head_dim values: head_dim + 4 bytes where float32 takes 4 * head_dim."""
    config = get_preset(preset)
    per_token = cache_bytes(config, 1, 1, jnp.int8)
    assert per_token == 2 * config.n_layers * config.n_kv_heads * (config.head_dim + 4)
    assert cache_bytes(config, 1, 1, jnp.float32) / per_token == pytest.approx(ratio)


def test_an_unknown_kv_cache_format_is_an_error_naming_the_choices(model):
    graphdef, params = nnx.split(model)
    with pytest.raises(ModelError, match=r"kv_cache: 'int4' is not a KV-cache format; choose auto or int8"):
        Decoder(CONFIG, graphdef, params, kv_cache="int4")


def test_the_command_line_names_the_flag_and_the_choices():
    result = subprocess.run([sys.executable, "-m", "meshlm", "generate", "--model", "smollm2-135m", "--prompt", "x",
                             "--kv-cache", "int4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "argument --kv-cache: invalid choice: 'int4' (choose from 'auto', 'int8')" in result.stderr
