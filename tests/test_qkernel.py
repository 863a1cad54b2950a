"""The CPU kernel for quantised matmuls (model/qmatmul.cc through model/qkernel.py) against a numpy reference
that reads the codes itself (and quantises the activations itself), the pure-JAX path, and one device; every
build this CPU can run (AVX-512 VNNI, AVX2, baseline)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import qkernel
from model.quant import quantize, with_activations

pytestmark = pytest.mark.skipif(qkernel.build() is None, reason="the kernel library is not built here")


def _numpy_weight(q) -> np.ndarray:
    """The float weight [K, N] a QuantizedWeight stands for, decoded in numpy from its bytes (llama.cpp's
    nibble order: in each group, the first half of the rows low, the second half high)."""
    values, scale = np.asarray(q.values), np.asarray(q.scale, np.float64)
    if q.bits == 8:
        codes = values.astype(np.float64)
    else:
        k2, n = values.shape
        g = values.reshape(k2 * 2 // q.group, q.group // 2, n)
        codes = np.concatenate([g & 15, g >> 4], axis=1).reshape(k2 * 2, n).astype(np.float64)
    k, n = codes.shape
    blocks = codes.reshape(k // q.group, q.group, n)
    if q.offset is not None:
        w = blocks * scale[:, None] + np.asarray(q.offset, np.float64)[:, None]
    elif q.format == "q4_0":
        w = (blocks - 8) * scale[:, None]
    else:
        w = blocks * scale[:, None]
    return w.reshape(k, n)


def _numpy_activations(x: np.ndarray) -> np.ndarray:
    """x [M, K] as int8 activations, in numpy: per block of 32, d = max |x| * (1 / 127) in float32, codes
    rounded to nearest (ties to even) from x * (1 / d), back as codes * d (float64)."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32).astype(np.float32)
    d = np.max(np.abs(blocks), axis=-1, keepdims=True) * np.float32(1 / 127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d > 0, np.float32(1) / d, np.float32(0))
    codes = np.round(blocks * inverse)
    assert np.abs(codes).max() <= 127
    return (codes.astype(np.float64) * d.astype(np.float64)).reshape(m, k)


FORMATS = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("q8_0", None), ("q4_0", None),
           ("q4_1", None)]


@pytest.mark.parametrize("activations", ["int8", "float"])
@pytest.mark.parametrize("format, group", FORMATS)
def test_the_kernel_computes_what_numpy_does(format, group, activations):
    """Every format, with int8 activations (integer dot products) and float ones; rows 1..13 (the kernel's
    blocks of rows and their remainders), output widths with a narrower last panel (592 = 512 + 80) and past
    the last full vector (80 = 64 + 16), a contraction of 640 (several groups of each size), a row of zeros."""
    check_against_numpy(format, group, activations)


def check_against_numpy(format, group, activations):
    rng = np.random.default_rng(0)
    k = 640
    run = jax.jit(qkernel.qmatmul)
    for n in (16, 80, 592):
        w = rng.standard_normal((k, n)).astype(np.float32)
        q = with_activations(quantize(w, format, group), activations)
        reference = _numpy_weight(q)
        for m in (1, 3, 4, 8, 13):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x[m // 2, :64] = 0  # blocks of zeros: a scale of 0
            got = np.asarray(run(jnp.asarray(x), q))
            want = (_numpy_activations(x) if activations == "int8" else x.astype(np.float64)) @ reference
            # float32 sums of 640 products: a few ulps of the largest partial sums
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(x).sum(1, keepdims=True).max())


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_the_other_builds_compute_what_numpy_does(isa):
    """The AVX2 build (integer dots by vpmaddubsw, int8 codes by their magnitude and sign) and the baseline
    build, on this CPU (MESHLM_QKERNEL_ISA caps the build a process picks), for every format and both
    activations."""
    if isa == "avx2" and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    code = ("import tests.test_qkernel as t\nfrom model import qkernel\n"
            f"assert qkernel.build() == {isa!r}, qkernel.build()\n"
            "for f, g in t.FORMATS:\n    for a in ('int8', 'float'):\n        t.check_against_numpy(f, g, a)\n")
    env = dict(os.environ, MESHLM_QKERNEL_ISA=isa, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_activations_are_quantised_as_numpy_does():
    """model.quant.quantize_activations (what the pure-JAX path multiplies) gives numpy's codes times scales,
    exactly: the kernel and the reference see the same numbers."""
    from model.quant import quantize_activations

    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 1536)).astype(np.float32) * rng.uniform(0.01, 100, (64, 1))
    x[3, 32:64] = 0
    x[5, :32] = np.arange(32) - 15.5  # halves: ties go to even
    got = np.asarray(jax.jit(quantize_activations)(jnp.asarray(x)), np.float64)
    np.testing.assert_array_equal(got, _numpy_activations(x).astype(np.float32).astype(np.float64))


def test_project_uses_the_kernel_on_cpu_and_matches_the_pure_jax_path():
    """`project` lowers to the custom call on CPU (so the other tests exercise the kernel, not the fallback) and
    gives the einsum of the dequantised weight; above MAX_ROWS it is that einsum."""
    from model.quant import dequantize

    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 4, 16)).astype(np.float32)  # [embed, heads, head_dim]: N is 64
    from model.quant import quantize_activations

    q = quantize(w, "int4", 32)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)).astype(np.float32))
    fn = jax.jit(lambda x, q: qkernel.project(x, q, jnp.float32, "bld,dhk->blhk"))
    assert "meshlm_qmatmul" in fn.lower(x, q).as_text()
    want = jnp.einsum("bld,dhk->blhk", quantize_activations(x), dequantize(q))
    np.testing.assert_allclose(fn(x, q), want, rtol=1e-5, atol=1e-5)
    big = jnp.asarray(rng.standard_normal((1, qkernel.MAX_ROWS + 1, 64)).astype(np.float32))
    assert "meshlm_qmatmul" not in fn.lower(big, q).as_text()


@pytest.mark.parametrize("shape", [{"data": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}])
@pytest.mark.parametrize("format", ["int8", "int4"])
def test_the_kernel_on_a_mesh_computes_what_one_device_does(shape, format):
    """Under shard_map: wq-like weights split over tensor along their output, wo/w_down-like weights along
    their contraction (partial sums added across tensor); fsdp-split weights gathered first."""
    from model.quant import dequantize, logical_axes, quantize_activations
    from model.sharding import activation_sharding, make_mesh, named_sharding

    mesh = make_mesh(shape)
    rng = np.random.default_rng(2)
    cases = [("bld,df->blf", (256, 512), ("embed", "mlp")),  # gate/up: N over tensor
             ("blf,fd->bld", (512, 256), ("mlp", "embed")),  # down: K over tensor
             ("blhk,hkd->bld", (8, 64, 256), ("heads", "head_dim", "embed"))]  # wo: K over tensor, 2 dims
    for equation, wshape, axes in cases:
        w = rng.standard_normal(wshape).astype(np.float32)
        q = quantize(w, format, contract=2 if len(wshape) == 3 else 1)
        xshape = (4, 3, *wshape[:len(wshape) - 1]) if len(wshape) == 3 else (4, 3, wshape[0])
        x = jnp.asarray(rng.standard_normal(xshape).astype(np.float32))
        one = jax.jit(lambda x, q, e=equation, a=axes: qkernel.project(x, q, jnp.float32, e, a))(x, q)
        names = logical_axes(q, axes)
        placed = jax.tree.map(lambda a, n: jax.device_put(a, named_sharding(mesh, n)), q, names,
                              is_leaf=lambda v: isinstance(v, tuple))
        xs = jax.device_put(x, named_sharding(mesh, ("batch", "length", *((None,) * (x.ndim - 2)))))

        def run(x, q, e=equation, a=axes):
            with activation_sharding(mesh):
                return qkernel.project(x, q, jnp.float32, e, a)

        fn = jax.jit(run)
        assert "meshlm_qmatmul" in fn.lower(xs, placed).as_text()
        # the shards sum the products in another order (partial sums added across tensor): float32 rounding of
        # sums of K terms, within a few ulps per level of a blocked sum (log2 K <= 16 levels) of sum |x||w|
        seen = quantize_activations(x.reshape(4, 3, -1)).reshape(x.shape)  # the activations the products use
        magnitude = jnp.einsum(equation, jnp.abs(seen), jnp.abs(dequantize(q)))
        np.testing.assert_array_less(np.abs(fn(xs, placed) - one), 16 * np.finfo(np.float32).eps * magnitude + 1e-30)


def test_decoding_with_the_kernel_gives_the_pure_jax_tokens(monkeypatch):
    """A tiny quantised model decodes the same tokens, and log-probabilities to float tolerance, with the kernel
    and with it turned off (MESHLM_QKERNEL=off: dequantise at each matmul)."""
    from flax import nnx

    from infer.decode import Decoder
    from infer.sampling import SamplingParams
    from model.config import PRESETS
    from model.quant import quantize_params
    from model.transformer import Transformer

    config = PRESETS["tiny"]
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    params = quantize_params(nnx.to_pure_dict(state), "int4", 32)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, config.vocab_size, n)) for n in (4, 11)]
    sampling = [SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=2),
                SamplingParams(max_new_tokens=6, temperature=0.9, seed=4, logprobs=2)]
    with_kernel = Decoder(config, graphdef, params).generate_ids(prompts, sampling)
    monkeypatch.setenv("MESHLM_QKERNEL", "off")
    qkernel._load.cache_clear()
    try:
        assert qkernel.build() is None
        without = Decoder(config, graphdef, params).generate_ids(prompts, sampling)
    finally:
        monkeypatch.delenv("MESHLM_QKERNEL")
        qkernel._load.cache_clear()
    for a, b in zip(with_kernel, without, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


def test_the_build_names_the_instruction_set():
    assert qkernel.build() in ("avx512-vnni", "avx512", "avx2", "baseline")
