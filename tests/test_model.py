"""Config and execution validation, presets, parameter and FLOP counts, segment masking, remat, mixed precision."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import (
    PRESETS,
    ConfigError,
    Execution,
    ModelConfig,
    cross_entropy,
    flops_per_token,
    get_preset,
    init_model,
    param_count,
)
from model.config import EXECUTION_FIELDS, preset_execution
from model.placement import abstract_model

TINY = get_preset("tiny")


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_heads": 6, "n_kv_heads": 4}, r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"),
        ({"d_model": 60, "n_heads": 8, "head_dim": None}, r"d_model \(60\) must be divisible by n_heads \(8\)"),
        ({"d_ff": 0}, r"d_ff must be a positive integer, got 0"),
        ({"vocab_size": -5}, r"vocab_size must be a positive integer, got -5"),
        ({"head_dim": 7}, r"head_dim must be a positive even integer.*got 7"),
        ({"param_dtype": "fp8"}, r"param_dtype must be one of .*got 'fp8'"),
        ({"norm_eps": 0.0}, r"norm_eps must be > 0, got 0.0"),
    ],
)
def test_config_rejects_bad_values_naming_fields(changes, message):
    fields = {f.name: getattr(TINY, f.name) for f in dataclasses.fields(TINY)}
    fields.update(changes)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**fields)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"compute_dtype": "fp8"}, r"Execution.compute_dtype must be one of .*got 'fp8'"),
        ({"remat": "sometimes"}, r"Execution.remat must be one of .*got 'sometimes'"),
        ({"scan_unroll": 0}, r"Execution.scan_unroll must be a positive integer, got 0"),
        ({"pipeline_microbatches": True}, r"Execution.pipeline_microbatches must be a positive integer, got True"),
    ],
)
def test_execution_rejects_bad_values_naming_fields(changes, message):
    with pytest.raises(ConfigError, match=message):
        Execution(**changes)
    with pytest.raises(ConfigError, match=message):
        Execution().replace(**changes)
    assert Execution(remat="save-dots").remat == "save_dots"


def test_config_is_frozen_and_replace_checks_names():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.d_model = 128
    assert TINY.replace(n_layers=3).n_layers == 3
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field 'n_layer'; did you mean 'n_layers'"):
        TINY.replace(n_layer=3)
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field 'compute_dtype'"):  # an Execution field
        TINY.replace(compute_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"unknown Execution field 'scan_unrol'; did you mean 'scan_unroll'"):
        Execution().replace(scan_unrol=2)


def test_from_dict_keeps_the_architecture_and_drops_old_execution_fields():
    stored = dataclasses.asdict(get_preset("llama3.2-1b"))  # rope_scaling as a dict, as JSON stores it
    assert ModelConfig.from_dict(stored) == get_preset("llama3.2-1b")
    old = {**dataclasses.asdict(TINY), "compute_dtype": "bfloat16", "remat": "full", "scan_unroll": 2,
           "pipeline_microbatches": 4, "pipeline_virtual_stages": 2}  # a checkpoint written before the split
    assert set(old) - set(dataclasses.asdict(TINY)) == set(EXECUTION_FIELDS)
    assert ModelConfig.from_dict(old) == TINY
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field 'd_modle'; did you mean 'd_model'"):
        ModelConfig.from_dict({**old, "d_modle": 64})
    with pytest.raises(ConfigError, match="must be a mapping"):
        ModelConfig.from_dict([("d_model", 64)])


def test_presets_are_architecture_and_small_runs_unrolled():
    assert preset_execution("small") == Execution(scan_unroll=6)  # the CPU demo's layers, unrolled
    assert preset_execution("tiny") == Execution()
    with pytest.raises(ConfigError, match=r"unknown model preset 'smal'"):
        preset_execution("smal")


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown model preset 'llama4'.*valid: tiny, small, smollm2-135m"):
        get_preset("llama4")


def test_smollm2_preset_has_the_real_shapes():
    c = get_preset("smollm2-135m")
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size) == (
        30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100_000 and c.norm_eps == 1e-5


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_equals_the_parameter_tree(name):
    config = get_preset(name)
    state = nnx.state(abstract_model(config))  # shapes only: no memory, even for 70B
    assert param_count(config) == sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))


@pytest.mark.parametrize(
    "name, published",
    # totals published with the released checkpoints (Hugging Face model cards / safetensors index)
    [("smollm2-135m", 134_515_008), ("llama3.2-1b", 1_235_814_400), ("llama3-8b", 8_030_261_248),
     ("llama3-70b", 70_553_706_496)],
)
def test_param_count_matches_published_models(name, published):
    assert param_count(get_preset(name)) == published


def _hand_count_forward_flops(c, seq_len):
    """2 FLOPs per multiply-add of every matmul one token goes through in a forward pass."""
    per_layer = (
        2 * c.d_model * c.n_heads * c.head_dim  # q
        + 2 * 2 * c.d_model * c.n_kv_heads * c.head_dim  # k, v
        + 2 * seq_len * c.n_heads * c.head_dim  # q . k for every key
        + 2 * seq_len * c.n_heads * c.head_dim  # probs . v
        + 2 * c.n_heads * c.head_dim * c.d_model  # o
        + 3 * 2 * c.d_model * c.d_ff  # gate, up, down
    )
    return c.n_layers * per_layer + 2 * c.d_model * c.vocab_size  # + lm head


@pytest.mark.parametrize("name", ["tiny", "small", "llama3-8b"])
@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_is_three_forward_passes(name, tied):
    config = get_preset(name).replace(tie_embeddings=tied)
    assert flops_per_token(config, 512) == 3 * _hand_count_forward_flops(config, 512)


def test_flops_per_token_agrees_with_xla_cost_analysis():
    # One layer: XLA's cost analysis counts a scan's body once, whatever its length.
    config, batch, seq_len = get_preset("small").replace(n_layers=1), 2, 256
    graphdef, state = nnx.split(abstract_model(config))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    compiled = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, tokens).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    # MFU counts attention over the whole sequence; the model computes only the query blocks' keys up to
    # the block's end: with b blocks, (b + 1) / 2b of the score and value matmuls.
    from model.transformer import causal_blocks

    blocks = causal_blocks(seq_len)
    full_attention = flops_per_token(config, seq_len) - flops_per_token(config, 0)
    computed = flops_per_token(config, 0) + full_attention * (blocks + 1) / (2 * blocks)
    ours = computed / 3 * batch * seq_len
    # XLA also counts elementwise work (norms, softmax, rotary); matmuls dominate.
    assert 1.0 <= xla_flops / ours < 1.05, (xla_flops, ours)


# ----------------------------------------------------------------------------- behaviour


def test_packed_documents_do_not_see_each_other():
    model = init_model(TINY, seed=1)
    rng = np.random.default_rng(1)
    doc_a = jnp.asarray(rng.integers(0, TINY.vocab_size, (1, 7)), jnp.int32)
    doc_b = jnp.asarray(rng.integers(0, TINY.vocab_size, (1, 9)), jnp.int32)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segment_ids = jnp.asarray([[1] * 7 + [2] * 9])
    positions = jnp.asarray([list(range(7)) + list(range(9))])
    logits = model(packed, positions, segment_ids)
    np.testing.assert_allclose(logits[:, :7], model(doc_a), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits[:, 7:], model(doc_b), rtol=1e-5, atol=1e-6)
    # and without segment ids, document B does see A (so the check above can fail)
    assert not np.allclose(model(packed, positions)[:, 7:], model(doc_b), atol=1e-4)


def test_later_tokens_do_not_change_earlier_logits():
    model = init_model(TINY, seed=2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 12)), jnp.int32)
    changed = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % TINY.vocab_size)
    np.testing.assert_allclose(model(tokens)[:, :8], model(changed)[:, :8], rtol=1e-6, atol=1e-7)


def _loss_and_grads(config, seed=0, execution=None):
    model = init_model(config, seed, execution)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (2, 17)), jnp.int32)

    def loss(state):
        return cross_entropy(nnx.merge(graphdef, state)(tokens[:, :-1]), tokens[:, 1:])

    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("policy", ["full", "save-dots"])
def test_remat_policies_give_the_same_gradients(policy):
    """float32: recomputation is fused differently, so gradients agree to rounding at the scale of
    each gradient array (elements far below that scale carry the scale's absolute rounding)."""
    loss, grads = _loss_and_grads(TINY)
    remat_loss, remat_grads = _loss_and_grads(TINY, execution=Execution(remat=policy))
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize("policy", ["full"])
def test_remat_policies_give_the_same_gradients_in_float64(policy, float64):
    """In float64 the remat gradients are the plain ones to 1e-12: the float32 differences above
    are rounding."""
    exact = TINY.replace(param_dtype="float64")
    loss, grads = _loss_and_grads(exact, execution=Execution(compute_dtype="float64"))
    remat_loss, remat_grads = _loss_and_grads(exact, execution=Execution(compute_dtype="float64", remat=policy))
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = init_model(TINY, execution=Execution(compute_dtype="bfloat16"))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model)))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, TINY.vocab_size, (2, 16)), jnp.int32)
    logits = model(tokens)
    assert logits.dtype == jnp.float32
    reference = init_model(TINY)(tokens)  # same weights, float32 compute
    scale = float(jnp.max(jnp.abs(reference)))
    error = float(jnp.max(jnp.abs(logits - reference)))
    assert 0 < error < 0.02 * scale  # bf16 rounding, not a different function
    hlo = jax.jit(lambda t: model(t)).lower(tokens).as_text()
    assert "bf16" in hlo


def test_bfloat16_params():
    model = init_model(TINY.replace(param_dtype="bfloat16"), execution=Execution(compute_dtype="bfloat16"))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(nnx.state(model)))
    assert model(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.float32


@pytest.mark.parametrize("length", [64, 96, 200, 256, 640])
def test_block_skipping_attention_equals_full_attention(length):
    from model.transformer import attention_mask, causal_blocks, grouped_query_attention

    blocks = causal_blocks(length)
    assert length % blocks == 0 and 1 <= blocks <= 8 and (blocks == 1 or length // blocks >= 64)
    keys = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(keys[0], (2, length, 4, 8))
    k, v = (jax.random.normal(key, (2, length, 2, 8)) for key in keys[1:])
    segment_ids = jnp.asarray(np.repeat([[1, 2, 3]], 2, axis=0).repeat(-(-length // 3), axis=1)[:, :length])
    mask = attention_mask(segment_ids)
    full = grouped_query_attention(q, k, v, mask)  # every query against every key
    blocked = grouped_query_attention(q, k, v, mask, causal=True)
    np.testing.assert_allclose(blocked, full, rtol=1e-5, atol=1e-6)


def test_unrolled_layer_scan_gives_the_same_loss_and_gradients():
    config = TINY.replace(n_layers=3)
    loss, grads = _loss_and_grads(config)
    for unroll in (2, 3, 8):
        unrolled_loss, unrolled_grads = _loss_and_grads(config, execution=Execution(scan_unroll=unroll))
        np.testing.assert_allclose(unrolled_loss, loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(unrolled_grads), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
