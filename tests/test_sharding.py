"""Every mesh gives the single-device result; every parameter lands where its rule says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import (
    DEFAULT_RULES,
    ShardingError,
    activation_sharding,
    cross_entropy,
    get_preset,
    init_model,
    init_on_mesh,
    logical_to_spec,
    make_mesh,
    parse_mesh,
    place_params,
    sharded_forward,
    state_shardings,
)
from model.sharding import device_grid, logical_axes_of, resolve_mesh_shape

CONFIG = get_preset("tiny")
BATCH, LENGTH = 8, 16


def _batch():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH + 1)), jnp.int32)
    # two packed documents per row, split at a different place in each row
    cut = rng.integers(3, LENGTH - 3, BATCH)
    idx = np.arange(LENGTH)
    segment_ids = jnp.asarray(np.where(idx[None] < cut[:, None], 1, 2), jnp.int32)
    positions = jnp.asarray(np.where(idx[None] < cut[:, None], idx[None], idx[None] - cut[:, None]), jnp.int32)
    return tokens[:, :-1], tokens[:, 1:], positions, segment_ids


def _loss(state, graphdef, tokens, targets, positions, segment_ids):
    logits = nnx.merge(graphdef, state)(tokens, positions, segment_ids)
    return cross_entropy(logits, targets)


def _reference():
    model = init_model(CONFIG, seed=0)
    graphdef, state = nnx.split(model)
    tokens, targets, positions, segment_ids = _batch()
    logits = model(tokens, positions, segment_ids)
    loss, grads = jax.value_and_grad(_loss)(state, graphdef, tokens, targets, positions, segment_ids)
    return logits, loss, grads


REFERENCE = None


def reference():
    global REFERENCE
    if REFERENCE is None:
        REFERENCE = _reference()
    return REFERENCE


MESHES = [
    {"data": 8},
    {"fsdp": 8},
    {"tensor": 2},
    {"tensor": 4},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"fsdp": 2, "tensor": 4},
]


def _mesh(shape):
    size = int(np.prod(list(shape.values())))
    return make_mesh(shape, devices=jax.devices()[:size])


def _assert_close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: ",".join(f"{k}{v}" for k, v in s.items()))
def test_mesh_matches_single_device(shape):
    mesh = _mesh(shape)
    ref_logits, ref_loss, ref_grads = reference()
    tokens, targets, positions, segment_ids = _batch()

    model = init_on_mesh(CONFIG, mesh, seed=0)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)

    # parameters are created in the layout their rules give, with the same values as on one device
    for (path, var), (_, ref_var) in zip(nnx.to_flat_state(state), nnx.to_flat_state(nnx.state(init_model(CONFIG))),
                                         strict=True):
        expected = logical_to_spec(logical_axes_of(var), DEFAULT_RULES)
        assert var[...].sharding.spec == expected, path
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(ref_var[...]))

    logits = sharded_forward(model, mesh)(state, tokens, positions, segment_ids)
    assert logits.sharding.spec == logical_to_spec(("batch", "length", "vocab"))
    _assert_close(logits, ref_logits)

    def loss_and_grad(state, tokens, targets, positions, segment_ids):
        with activation_sharding(mesh):
            return jax.value_and_grad(_loss)(state, graphdef, tokens, targets, positions, segment_ids)

    rows = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length")))
    step = jax.jit(loss_and_grad, in_shardings=(shardings, rows, rows, rows, rows), out_shardings=(None, shardings))
    loss, grads = step(state, tokens, targets, positions, segment_ids)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for (path, grad), (_, ref_grad) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads), strict=True):
        assert grad[...].sharding.spec == logical_to_spec(logical_axes_of(ref_grad)), path
        _assert_close(grad[...], ref_grad[...])


def test_place_params_moves_existing_parameters():
    mesh = _mesh({"fsdp": 4, "tensor": 2})
    graphdef, state = nnx.split(init_model(CONFIG, seed=3))
    model = nnx.merge(graphdef, place_params(state, CONFIG, mesh))
    wq = model.layers.attn.wq[...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (CONFIG.n_layers, CONFIG.d_model // 4, CONFIG.n_heads // 2,
                                                   CONFIG.head_dim)


def test_indivisible_mesh_fails_at_start_up_naming_the_parameter():
    mesh = _mesh({"tensor": 8})  # tiny has 4 kv heads
    with pytest.raises(ShardingError, match=r"'layers/attn/wk' with shape \(2, 64, 4, 8\): dimension 2 "
                                            r"\('kv_heads', size 4\) does not divide by mesh axes 'tensor'"):
        init_on_mesh(CONFIG, mesh)


def test_indivisible_batch_fails_naming_the_input():
    mesh = _mesh({"data": 8})
    model = init_on_mesh(CONFIG, mesh)
    with pytest.raises(ShardingError, match=r"input tokens with shape \(3, 16\): dimension 0 \('batch', size 3\)"):
        sharded_forward(model, mesh)(nnx.state(model), jnp.zeros((3, 16), jnp.int32))


def test_mesh_shapes():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "stage": 1, "fsdp": 4, "tensor": 1}
    mesh = make_mesh(parse_mesh("data=2, tensor=-1"))
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "fsdp": 1, "tensor": 4}
    with pytest.raises(ShardingError, match="needs 16 devices but 8 are available"):
        make_mesh({"data": 4, "tensor": 4})
    with pytest.raises(ShardingError, match="unknown mesh axis 'model'"):
        make_mesh({"model": 8})
    with pytest.raises(ShardingError, match="at most one -1"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ShardingError, match="not AXIS=SIZE"):
        parse_mesh("data:2")


class _Device:
    """A stand-in device of a given process (or slice) for the mesh layout: jax.Mesh needs real devices, the
    device grid does not."""
    platform = device_kind = "cpu"

    def __init__(self, id, process_index, slice_index=None):
        self.id, self.process_index = id, process_index
        if slice_index is not None:
            self.slice_index = slice_index


def _ids(grid) -> np.ndarray:
    return np.vectorize(lambda d: d.id)(grid)


def test_dcn_axes_spread_the_outer_part_of_an_axis_over_slices():
    """dcn_data 2 x dcn_fsdp 2 over 4 processes of 2 devices, tensor 2 inside each: data and fsdp each take one
    slice coordinate (the process), tensor stays inside a process. The processes here own interleaved devices,
    so a plain reshape in device order would put tensor across processes."""
    devices = [_Device(i, process_index=i % 4) for i in range(8)]
    grid = device_grid({"dcn_data": 2, "dcn_fsdp": 2, "tensor": 2}, devices)
    assert grid.shape == (2, 1, 2, 2)  # data, stage, fsdp, tensor
    process = np.vectorize(lambda d: d.process_index)(grid)
    np.testing.assert_array_equal(process[:, 0, :, 0], [[0, 1], [2, 3]])  # slice (data, fsdp) -> process
    assert (process == process[..., :1]).all()  # each tensor pair inside one process
    assert resolve_mesh_shape({"dcn_data": 2, "dcn_fsdp": 2, "tensor": 2}, 8) == {
        "data": 2, "stage": 1, "fsdp": 2, "tensor": 2}
    # in-slice sizes multiply by the slice counts; -1 is "the rest of a slice"
    assert resolve_mesh_shape({"dcn_data": 2, "fsdp": -1}, 8) == {"data": 2, "stage": 1, "fsdp": 4, "tensor": 1}
    # TPU slices (slice_index) rather than processes, when the devices carry distinct ones
    tpu = [_Device(i, process_index=i // 2, slice_index=i // 4) for i in range(8)]
    slices = np.vectorize(lambda d: d.slice_index)(device_grid({"dcn_data": 2, "fsdp": 4}, tpu))
    np.testing.assert_array_equal(slices[:, 0, :, 0], [[0] * 4, [1] * 4])
    # one process with 8 devices, 2 processes each with 4: as plain make_mesh when the processes own blocks
    blocks = [_Device(i, process_index=i // 4) for i in range(8)]
    np.testing.assert_array_equal(_ids(device_grid({"dcn_data": 2, "fsdp": 2, "tensor": 2}, blocks)),
                                  np.arange(8).reshape(2, 1, 2, 2))


def test_bad_dcn_axes_are_errors_that_say_what_to_change():
    with pytest.raises(ShardingError, match="no dcn_tensor: tensor parallelism all-reduces inside every layer"):
        make_mesh({"dcn_tensor": 2})
    with pytest.raises(ShardingError, match=r"spreads over 2 slices .* come from 1 process\(es\)"):
        make_mesh({"dcn_data": 2, "fsdp": -1})  # this test process alone: one slice
    with pytest.raises(ShardingError, match="3 slices .* do not divide the 8 devices"):
        make_mesh({"dcn_data": 3})
    with pytest.raises(ShardingError, match=r"needs 16 devices but 8 are available \(2 slices of 8\)"):
        make_mesh({"dcn_data": 2, "data": 8})
    with pytest.raises(ShardingError, match="slice counts and must be positive"):
        make_mesh({"dcn_fsdp": -1})


def test_rules_table():
    assert logical_to_spec(("batch", "length", "act_embed")) == jax.sharding.PartitionSpec(("data", "fsdp"), None,
                                                                                           None)
    assert logical_to_spec(("layers", "embed", "mlp")) == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    with pytest.raises(ShardingError, match="logical axis 'nonsense' has no rule"):
        logical_to_spec(("nonsense",))
    with pytest.raises(ShardingError, match="map mesh axis 'fsdp' twice"):
        logical_to_spec(("batch", "embed"))
