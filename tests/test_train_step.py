"""The jitted train step on meshes, ZeRO-3 memory, accumulation, z-loss, masks and the run config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data.pack import positions_from_segments
from model import Execution, get_preset, make_mesh
from train.config import OptimSection, ScheduleSection, TrainConfigError, load_config
from train.step import build_steps, decay_mask, lr_schedule

TINY = get_preset("tiny")
BATCH, LENGTH, STEPS = 8, 32, 5


def _batches(n=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, TINY.vocab_size, (BATCH, LENGTH + 1)).astype(np.int32)
        segments = np.ones((BATCH, LENGTH), np.int32)
        segments[:, 20:] = 2
        weights = np.ones((BATCH, LENGTH), np.float32)
        weights[:, 19] = 0  # the eos predicting the next document's first token
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
                    "positions": positions_from_segments(segments), "weights": weights})
    return out


def _run(shape, microbatches=1, optim=None, batches=None):
    size = int(np.prod(list(shape.values())))
    mesh = make_mesh(shape, devices=jax.devices()[:size])
    steps = build_steps(TINY, optim or OptimSection(), ScheduleSection(warmup_steps=2), STEPS, mesh, BATCH,
                        microbatches)
    state = steps.init(0)
    losses = []
    for batch in batches or _batches():
        state, metrics = steps.train_step(state, jax.device_put(batch, steps.batch_shardings))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, steps


REFERENCE = {}


def reference():
    if not REFERENCE:
        REFERENCE["losses"], REFERENCE["state"], _ = _run({"data": 1})
    return REFERENCE["losses"], REFERENCE["state"]


@pytest.mark.parametrize("shape", [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2"])
def test_first_losses_equal_one_device(shape):
    ref_losses, ref_state = reference()
    losses, state, steps = _run(shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert losses[-1] != losses[0]  # the parameters really moved
    # parameters and Adam moments sit where the rules say. (Their values are not compared element by element:
    # Adam's update g / (sqrt(v) + eps) of a parameter whose gradient is ~1e-9 flips with rounding noise.)
    for got, sharding in zip(jax.tree.leaves((state.params, state.opt_state)),
                             jax.tree.leaves((steps.state_shardings.params, steps.state_shardings.opt_state)),
                             strict=True):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)


def _bytes_on(device, tree) -> int:
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


def test_fsdp8_keeps_an_eighth_of_params_and_optimizer_state_per_device():
    _, state, _ = _run({"fsdp": 8}, batches=_batches(1))
    one = _bytes_on(jax.devices()[0], reference()[1].params) + _bytes_on(jax.devices()[0], reference()[1].opt_state)
    per_device = [_bytes_on(d, state.params) + _bytes_on(d, state.opt_state) for d in jax.devices()]
    # only norm scales and step counters are replicated; they are about 0.4% of tiny's bytes
    assert all(0.124 < b / one < 0.135 for b in per_device), [b / one for b in per_device]


@pytest.mark.parametrize("shape, microbatches", [({"data": 1}, 4), ({"fsdp": 2}, 2)])
def test_gradient_accumulation_equals_the_whole_batch(shape, microbatches):
    losses, _, _ = _run(shape, microbatches)
    np.testing.assert_allclose(losses, reference()[0], rtol=1e-6)


def test_z_loss_changes_the_gradient_not_the_reported_loss():
    batches = _batches(2)
    plain, _, _ = _run({"data": 1}, batches=batches)
    with_z, _, _ = _run({"data": 1}, optim=OptimSection(z_loss=1e-2), batches=batches)
    assert plain[0] == with_z[0]  # the reported loss is the cross-entropy alone
    assert plain[1] != with_z[1]  # the update differed


def test_non_finite_step_is_skipped():
    batches = _batches(3)
    batches[1] = dict(batches[1], weights=batches[1]["weights"] * np.nan)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    steps = build_steps(TINY, OptimSection(), ScheduleSection(), 3, mesh, BATCH)
    state = steps.init(0)
    state, _ = steps.train_step(state, batches[0])
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = steps.train_step(state, batches[1])
    assert not bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.step) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    state, metrics = steps.train_step(state, batches[2])
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))


def test_weight_decay_mask_spares_norms_and_embeddings():
    axes = {"embedding": ("vocab", "embed"), "final_norm": {"scale": ("norm",)},
            "layers": {"attn": {"wq": ("layers", "embed", "heads", "head_dim")},
                       "mlp_norm": {"scale": ("layers", "norm")}}, "lm_head": ("embed", "vocab")}
    mask = decay_mask(axes, decay_norms_and_embeddings=False)
    assert mask == {"embedding": False, "final_norm": {"scale": False},
                    "layers": {"attn": {"wq": True}, "mlp_norm": {"scale": False}}, "lm_head": True}
    assert all(jax.tree.leaves(decay_mask(axes, decay_norms_and_embeddings=True)))


def test_schedule_warmup_then_decay():
    schedule = lr_schedule(OptimSection(lr=1.0), ScheduleSection(kind="cosine", warmup_steps=10, min_lr_ratio=0.1),
                           110)
    assert float(schedule(0)) == pytest.approx(1 / 11) and float(schedule(5)) == pytest.approx(6 / 11)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(110)) == pytest.approx(0.1)
    linear = lr_schedule(OptimSection(lr=1.0), ScheduleSection(kind="linear", warmup_steps=0, min_lr_ratio=0.0), 100)
    assert float(linear(50)) == pytest.approx(0.5)


def test_clipping_bounds_the_update():
    grads = {"w": jnp.full((4,), 100.0)}
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- config


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny, compute_dtype: bfloat16}\nmesh: {data: 2, fsdp: 4}\n"
                    "optim: {lr: 3e-4}\ntrain: {steps: 7}\nrun_dir: runs/x\n")
    config = load_config(str(path), ["optim.weight_decay=0", "model.n_layers=3", "train.batch_size=4"])
    assert config.model.n_layers == 3 and config.model.d_model == 64
    assert config.model_execution == Execution(compute_dtype="bfloat16")  # model.compute_dtype: an older spelling
    assert config.optim.lr == 3e-4 and config.optim.weight_decay == 0.0 and config.train.steps == 7
    assert config.mesh.shape() == {"data": 2, "stage": 1, "fsdp": 4, "tensor": 1}
    assert load_config(None, []).model == get_preset("small")


def test_execution_comes_from_the_run_and_starts_from_the_preset():
    small = load_config(None, [])
    assert small.model == get_preset("small") and small.model_execution == Execution(scan_unroll=6)
    assert "compute_dtype" not in small.to_dict()["model"] and small.to_dict()["execution"]["scan_unroll"] == 6
    config = load_config(None, ["model.preset=tiny", "execution.remat=full", "execution.compute_dtype=bfloat16",
                                "pipeline.microbatches=2"])
    assert config.model == get_preset("tiny")
    assert config.model_execution == Execution(compute_dtype="bfloat16", remat="full", pipeline_microbatches=2)
    assert load_config(None, ["execution.scan_unroll=1"]).model_execution.scan_unroll == 1
    with pytest.raises(TrainConfigError, match="remat is set in both model and execution; set execution.remat"):
        load_config(None, ["model.remat=full", "execution.remat=none"])
    with pytest.raises(TrainConfigError, match=r"execution: Execution.compute_dtype must be one of .*got 'fp8'"):
        load_config(None, ["execution.compute_dtype=fp8"])
    with pytest.raises(TrainConfigError, match=r"unknown key execution.'scan_unrol'; did you mean 'scan_unroll'"):
        load_config(None, ["execution.scan_unrol=2"])


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr_max=1"], r"unknown key optim.'lr_max'; did you mean 'lr'"),
    (["optimizer.lr=1"], r"unknown key 'optimizer'; did you mean 'optim'"),
    (["model.nlayers=2"], r"unknown key model.'nlayers'; did you mean 'n_layers'"),
    (["train.steps=many"], r"train.steps must be int, got 'many'"),
    (["train.batch_size=6", "train.microbatches=4"], r"train.batch_size \(6\) must divide into"),
    (["lr"], r"override 'lr' is not KEY=VALUE"),
    (["model.preset=gpt9"], r"unknown model preset 'gpt9'"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("mesh: [1, 2\n")
    with pytest.raises(TrainConfigError, match="not valid YAML"):
        load_config(str(bad))
