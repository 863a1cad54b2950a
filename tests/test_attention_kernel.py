"""The CPU kernel for decode attention over a KV cache (model/attention.cc through model/attention_kernel.py)
against a numpy reference that reads the cache itself, the pure-JAX `cached_attention`, every build this CPU
can run (AVX-512, AVX2, baseline), one device against a mesh, and a model's decode with the kernels off."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention_kernel, qkernel
from model.cache import Int8KV, quantize_kv

pytestmark = pytest.mark.skipif(qkernel.build() is None, reason="the kernel library is not built here")

# (batch, length, heads, kv_heads, head_dim, cache_length, visible): head_dim 64 and 128 run unrolled, the
# others by the loop; lengths > 1 are verification steps; visible < cache_length is the engine's bucket
SHAPES = [(3, 1, 9, 3, 64, 40, 40), (2, 1, 4, 4, 16, 7, 7), (2, 3, 8, 2, 32, 50, 37), (1, 5, 4, 1, 48, 33, 33),
          (2, 2, 16, 8, 128, 70, 64), (4, 1, 2, 2, 80, 21, 21)]


def numpy_attention(q, k, v, positions, visible):
    """softmax(q k / sqrt(d)) v in float64, each query over the slots s <= its position, s < visible; k and v
    float arrays [batch, kv_heads, cache_length, head_dim] or Int8KV (decoded here: values * scale)."""
    def decode(x):
        if isinstance(x, Int8KV):
            return np.asarray(x.values, np.float64) * np.asarray(x.scale, np.float64)[..., None]
        return np.asarray(x, np.float64)

    q, k, v = np.asarray(q, np.float64), decode(k), decode(v)
    batch, length, heads, head_dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros(q.shape)
    for b in range(batch):
        for t in range(length):
            seen = min(int(positions[b, t]) + 1, visible)
            for h in range(heads):
                scores = k[b, h // group, :seen] @ q[b, t, h] / np.sqrt(head_dim)
                p = np.exp(scores - scores.max())
                out[b, t, h] = (p / p.sum()) @ v[b, h // group, :seen]
    return out


def case(shape, int8, seed=0):
    """Random q, cache and positions for `shape`: the rows' positions spread over [0, visible)."""
    batch, length, heads, kv_heads, head_dim, cache_length, visible = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, head_dim)).astype(np.float32) * 2
    k, v = (rng.standard_normal((batch, kv_heads, cache_length, head_dim)).astype(np.float32) for _ in range(2))
    starts = np.array([0] + list(rng.integers(0, visible - length + 1, batch - 1)))[:batch]
    starts[-1] = visible - length  # one row reaches the last visible slot
    positions = (starts[:, None] + np.arange(length)[None]).astype(np.int32)
    if int8:
        k, v = quantize_kv(jnp.asarray(k)), quantize_kv(jnp.asarray(v))
    return jnp.asarray(q), k, v, positions


def check_against_numpy(shape, int8):
    q, k, v, positions = case(shape, int8)
    visible = shape[-1]
    assert attention_kernel.applies(q, k)
    got = jax.jit(attention_kernel.attention, static_argnums=4)(q, k, v, jnp.asarray(positions), visible)
    want = numpy_attention(q, k, v, positions, visible)
    # float32 dot products of head_dim terms and a softmax: a few ulps of the values' magnitude
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * np.abs(want).max() + 1e-6)


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_computes_what_numpy_does(shape, int8):
    check_against_numpy(shape, int8)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_the_other_builds_compute_what_numpy_does(isa):
    """The AVX2 build (8 lanes) and the baseline build (4) on this CPU (MESHLM_QKERNEL_ISA caps the build)."""
    if isa == "avx2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    code = ("import tests.test_attention_kernel as t\n"
            "for s in t.SHAPES:\n    for i in (False, True):\n        t.check_against_numpy(s, i)\n"
            "import ctypes, glob\nlib = ctypes.CDLL(glob.glob('model/_qmatmul*.so')[0])\n"
            "lib.MeshlmAttentionBuild.restype = ctypes.c_char_p\n"
            f"assert lib.MeshlmAttentionBuild().decode() == {isa!r}, lib.MeshlmAttentionBuild()\n")
    env = dict(os.environ, MESHLM_QKERNEL_ISA=isa, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_with_cache_uses_the_kernel_and_matches_the_pure_jax_attention():
    """A layer's `LayerCache.attend` lowers to the custom call on CPU and gives `cached_attention`'s result
    over the same cache and mask; past MAX_QUERIES queries per kv head, or a head_dim the kernel does not take,
    it is `cached_attention`."""
    from model.transformer import cached_attention

    def crop(x):
        return jax.tree.map(lambda a: a[:, :, :37], x)

    for int8 in (False, True):
        shape = (2, 3, 8, 2, 32, 50, 37)
        q, k, v, positions = case(shape, int8, seed=1)
        mask = jnp.arange(37)[None, None, :] <= positions[:, :, None]
        fn = jax.jit(lambda q, k, v, p, m: attention_kernel.cached_attention(
            q, k, v, p, 37, lambda: cached_attention(q, crop(k), crop(v), m)))
        assert "meshlm_attention" in fn.lower(q, k, v, positions, mask).as_text()
        want = cached_attention(q, crop(k), crop(v), mask)
        np.testing.assert_allclose(fn(q, k, v, positions, mask), want, rtol=1e-5, atol=1e-5)
    assert not attention_kernel.applies(jnp.zeros((1, attention_kernel.MAX_QUERIES // 4 + 1, 8, 32)), k)
    assert not attention_kernel.applies(jnp.zeros((1, 1, 8, 24)), jnp.zeros((1, 2, 10, 24)))
    assert not attention_kernel.applies(jnp.zeros((1, 1, 8, 32), jnp.bfloat16), jnp.zeros((1, 2, 10, 32)))


@pytest.mark.parametrize("shape", [{"data": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 8}])
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_the_kernel_on_a_mesh_computes_what_one_device_does(shape, int8):
    """Under shard_map each device attends over its rows and kv heads of the cache (placed by the rules table):
    the same numbers as on one device, bit for bit (each (row, kv head) is computed alike)."""
    from model.cache import CACHE_AXES
    from model.sharding import activation_sharding, make_mesh, named_sharding
    from model.transformer import cached_attention

    mesh = make_mesh(shape)
    q, k, v, positions = case((8, 2, 16, 4, 64, 24, 20), int8, seed=2)
    one = jax.jit(attention_kernel.attention, static_argnums=4)(q, k, v, jnp.asarray(positions), 20)
    place = lambda x: jax.device_put(x, named_sharding(mesh, CACHE_AXES[:x.ndim]))  # noqa: E731
    ks, vs = jax.tree.map(place, k), jax.tree.map(place, v)
    qs = jax.device_put(q, named_sharding(mesh, ("batch", "length", "heads", None)))

    def run(q, k, v, positions):
        with activation_sharding(mesh):
            mask = jnp.arange(24)[None, None, :] <= jnp.minimum(positions, 19)[:, :, None]
            return attention_kernel.cached_attention(q, k, v, positions, 20,
                                                     lambda: cached_attention(q, k, v, mask))

    fn = jax.jit(run)
    lowered = fn.lower(qs, ks, vs, positions).as_text()
    assert "meshlm_attention" in lowered
    np.testing.assert_array_equal(np.asarray(fn(qs, ks, vs, positions)), np.asarray(one))


@pytest.mark.parametrize("kv_cache", ["auto", "int8"])
def test_decoding_with_the_kernel_gives_the_pure_jax_tokens(monkeypatch, kv_cache):
    """A small model with head_dim 16 decodes the same tokens, and log-probabilities to float tolerance, with
    the kernels and with them turned off (MESHLM_QKERNEL=off), on a float32 and an int8 cache."""
    from flax import nnx

    from infer.decode import Decoder
    from infer.sampling import SamplingParams
    from model.config import ModelConfig
    from model.transformer import Transformer

    config = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                         max_seq_len=64)
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, config.vocab_size, n)) for n in (4, 11)]
    sampling = [SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=2),
                SamplingParams(max_new_tokens=8, temperature=0.9, seed=4, logprobs=2)]

    def decode():
        decoder = Decoder(config, graphdef, params, kv_cache=kv_cache)
        return decoder.generate_ids(prompts, sampling)

    traced = []  # the kernel's calls while the decoder's steps were traced
    kernel = attention_kernel.attention
    monkeypatch.setattr(attention_kernel, "attention", lambda *a: traced.append(a[0].shape) or kernel(*a))
    with_kernel = decode()
    assert {1} <= {shape[1] for shape in traced}, traced  # decode steps, one new position per row
    monkeypatch.setenv("MESHLM_QKERNEL", "off")
    qkernel._load.cache_clear()
    try:
        assert qkernel.build() is None
        without = decode()
    finally:
        monkeypatch.delenv("MESHLM_QKERNEL")
        qkernel._load.cache_clear()
    for a, b in zip(with_kernel, without, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
