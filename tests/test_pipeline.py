"""Pipeline parallelism over the `stage` mesh axis: the same loss and gradients as the un-pipelined model,
for GPipe and circular schedules, alone and combined with data and tensor parallelism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import Execution, get_preset, init_model, make_mesh
from model.loss import cross_entropy
from model.pipeline import PipelineError, bubble_fraction, check_pipeline
from model.placement import param_layout
from model.sharding import activation_sharding

BASE = get_preset("tiny").replace(n_layers=8)


def _batch(config, rows=8, length=16, seed=0):
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (rows, length + 1))
    return jnp.asarray(tokens, jnp.int32)


def _loss_and_grads(config, mesh=None, seed=0, execution=None):
    """(loss, grads) of next-token cross-entropy, on one device or jitted on `mesh` with the rules."""
    graphdef, params = nnx.split(init_model(config, seed, execution))
    params = nnx.to_pure_dict(params)
    tokens = _batch(config)

    def loss(params, tokens):
        return cross_entropy(nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:])

    if mesh is None:
        return jax.jit(jax.value_and_grad(loss))(params, tokens)
    params = jax.device_put(params, param_layout(config, mesh).shardings)

    def sharded(params, tokens):
        with activation_sharding(mesh):
            return jax.value_and_grad(loss)(params, tokens)

    return jax.jit(sharded)(params, tokens)


@pytest.fixture(scope="module")
def reference():
    return _loss_and_grads(BASE)


@pytest.mark.parametrize("mesh_shape, microbatches, virtual", [
    ({"stage": 2, "data": 4}, 2, 1),
    ({"stage": 4, "data": 2}, 4, 1),
    ({"stage": 8}, 8, 1),
    ({"stage": 2, "data": 4}, 2, 2),
    ({"stage": 4, "fsdp": 2}, 4, 2),
    ({"data": 2, "tensor": 2, "stage": 2}, 4, 1),  # (and with V = 2 in the training test below)
])
def test_pipelined_loss_and_gradients_equal_the_plain_model(reference, mesh_shape, microbatches, virtual):
    execution = Execution(pipeline_microbatches=microbatches, pipeline_virtual_stages=virtual)
    if mesh_shape == {"stage": 8}:
        execution = execution.replace(remat="full")  # recomputation inside the schedule: the same gradients
    loss, grads = _loss_and_grads(BASE, make_mesh(mesh_shape), execution=execution)
    want_loss, want_grads = reference
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_the_schedule_rotates_activations_by_collective_permute_and_keeps_weights_in_place():
    config = BASE
    mesh = make_mesh({"stage": 4, "data": 2})
    graphdef, params = nnx.split(init_model(config, execution=Execution(pipeline_microbatches=4)))
    params = jax.device_put(nnx.to_pure_dict(params), param_layout(config, mesh).shardings)

    def forward(params, tokens):
        with activation_sharding(mesh):
            return nnx.merge(graphdef, params)(tokens)

    hlo = jax.jit(forward).lower(params, _batch(config)[:, :-1]).compile().as_text()
    assert "collective-permute" in hlo  # the activations move from stage to stage
    assert "all-gather" not in hlo  # no stage's weights are gathered (nor anything else, on this mesh)


def test_bad_pipelines_are_refused_at_start():
    with pytest.raises(PipelineError, match="n_layers = 8 does not split into 4 stages x 3 virtual stages"):
        check_pipeline(8, 4, 4, 3)
    with pytest.raises(PipelineError, match="pipeline.microbatches = 2 is fewer than the 4 stages"):
        check_pipeline(8, 4, 2, 1)
    with pytest.raises(PipelineError, match="fewer than the 4 stages"):
        _loss_and_grads(BASE, make_mesh({"stage": 4, "data": 2}), execution=Execution(pipeline_microbatches=2))


def test_bubble_fraction():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 4, 2) == pytest.approx(3 / 11)


def _train_losses(config, mesh_shape, steps=3, execution=None):
    from train.config import OptimSection, ScheduleSection
    from train.step import build_steps

    mesh = make_mesh(mesh_shape)
    built = build_steps(config, OptimSection(lr=1e-2), ScheduleSection(warmup_steps=0), steps, mesh, batch_size=8,
                        execution=execution)
    state = built.init(0)
    losses = []
    for _ in range(steps):
        tokens = np.asarray(_batch(config))  # the same batch each step: the loss must fall
        batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                 "positions": np.broadcast_to(np.arange(16), (8, 16)), "segment_ids": np.ones((8, 16), np.int32),
                 "weights": np.ones((8, 16), np.float32)}
        batch = {k: jax.device_put(np.asarray(v), built.batch_shardings[k]) for k, v in batch.items()}
        state, metrics = built.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_training_steps_give_the_same_losses():
    plain, _ = _train_losses(BASE, {"data": 8})
    piped, _ = _train_losses(BASE, {"data": 2, "tensor": 2, "stage": 2},
                             execution=Execution(pipeline_microbatches=4, pipeline_virtual_stages=2))
    np.testing.assert_allclose(piped, plain, rtol=1e-5)
    assert plain[-1] < plain[0]


def test_checkpoints_move_between_pipelined_and_plain_meshes(tmp_path):
    from model.checkpoint import layout_metadata, restore_params, restore_target, save_params

    config = BASE
    piped = make_mesh({"stage": 4, "data": 2})
    layout = param_layout(config, piped)
    params = jax.device_put(nnx.to_pure_dict(nnx.split(init_model(config, seed=4))[1]), layout.shardings)
    assert params["layers"]["mlp"]["w_gate"].sharding.spec[0] == "stage"  # each stage holds 2 of the 8 layers
    save_params(tmp_path / "piped", 1, params, layout_metadata(config, layout.abstract, layout.logical_axes))
    target, expected = restore_target(BASE, make_mesh({"data": 8}))  # no pipeline
    plain = restore_params(tmp_path / "piped", target, layout=expected)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    save_params(tmp_path / "plain", 1, plain, expected)
    target, expected = restore_target(config, make_mesh({"stage": 2, "data": 4}))
    again = restore_params(tmp_path / "plain", target, layout=expected)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decode_on_a_pipelined_mesh_regathers_the_layers_and_matches_one_device():
    """The decode loop does not pipeline: each decode call gathers every layer's weights from its stage
    once (Transformer.layer_params) and runs the layers in order, the batch over the data axes."""
    from infer.decode import Decoder
    from infer.sampling import SamplingParams

    config = BASE.replace(init_std=0.3)
    graphdef, params = nnx.split(init_model(config, seed=1, execution=Execution(pipeline_microbatches=2)))
    prompts = [list(range(3, 12)), list(range(40, 60)), [7, 7, 7]]
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=2)
    one = Decoder(config, graphdef, params).generate_ids(prompts, sampling)
    staged = Decoder(config, graphdef, params, mesh=make_mesh({"stage": 2, "data": 4})).generate_ids(prompts, sampling)
    for a, b in zip(one, staged, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


def test_run_config_checks_the_pipeline_at_start():
    from train.config import TrainConfigError, from_dict

    base = {"model": {"preset": "tiny", "n_layers": 8}, "train": {"batch_size": 8}}
    config = from_dict({**base, "mesh": {"stage": 4, "fsdp": 2}, "pipeline": {"microbatches": 4, "virtual_stages": 2}})
    execution = config.model_execution
    assert (execution.pipeline_microbatches, execution.pipeline_virtual_stages) == (4, 2)
    with pytest.raises(TrainConfigError, match="model.pipeline_microbatches is not a model field.*pipeline.microbat"):
        from_dict({**base, "model": {"preset": "tiny", "pipeline_microbatches": 4}})
    with pytest.raises(TrainConfigError, match="fewer than the 4 stages"):
        from_dict({**base, "mesh": {"stage": 4, "fsdp": 2}, "pipeline": {"microbatches": 2}})
    with pytest.raises(TrainConfigError, match="does not split into 4 stages x 3 virtual stages"):
        from_dict({**base, "mesh": {"stage": 4, "fsdp": 2}, "pipeline": {"microbatches": 4, "virtual_stages": 3}})
    with pytest.raises(TrainConfigError, match="unknown key pipeline.'micro_batches'; did you mean 'microbatches'"):
        from_dict({**base, "pipeline": {"micro_batches": 4}})
