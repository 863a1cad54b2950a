"""Checkpoints: save on one mesh, restore onto another and continue with the same loss; keep-K, every-N,
async saves, layout mismatches, corrupted and half-written steps, and parameters-only restores."""

import os
import shutil
import warnings
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data.pack import positions_from_segments
from model import get_preset, make_mesh
from model.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    check_layout,
    layout_metadata,
    restore_params,
    restore_target,
    save_params,
)
from train.checkpoint import Checkpointer
from train.config import OptimSection, ScheduleSection, TrainConfig
from train.step import build_steps

TINY = get_preset("tiny")
BATCH, LENGTH = 8, 32
CONFIG = TrainConfig(model=TINY).to_dict()
LOADER_STATE = {"version": 1, "store": {"rows": 96, "seq_len": 33, "created": "2025-01-01T00:00:00"},
                "path": "runs/data/x", "split": "train", "val_fraction": 0.01, "global_batch_size": BATCH,
                "seed": 0, "epoch": 1, "batch": 3}


def _batches(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, TINY.vocab_size, (BATCH, LENGTH + 1)).astype(np.int32)
        segments = np.ones((BATCH, LENGTH), np.int32)
        segments[:, 20:] = 2
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
                    "positions": positions_from_segments(segments), "weights": np.ones((BATCH, LENGTH), np.float32)})
    return out


def _steps(shape, config=TINY):
    return build_steps(config, OptimSection(), ScheduleSection(warmup_steps=2), total_steps=10,
                       mesh=make_mesh(shape), batch_size=BATCH)


def _layout(steps, config=TINY):
    return layout_metadata(config, steps.abstract_state.params, steps.logical_axes)


def _assert_same(restored, host):
    """Bit for bit, leaf by leaf."""
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(host), strict=True):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == np.asarray(want).tobytes()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two train steps on {fsdp 8}, saved as step 2; then the loss of the next step on the same mesh."""
    steps = _steps({"fsdp": 8})
    batches = _batches(3)
    state = steps.init(0)
    for batch in batches[:2]:
        state, _ = steps.train_step(state, jax.device_put(batch, steps.batch_shardings))
    host = jax.device_get(state)
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    with Checkpointer(directory, keep=3, every=1, async_save=False) as checkpointer:
        assert checkpointer.save(2, state, LOADER_STATE, CONFIG, _layout(steps))
    _, metrics = steps.train_step(state, jax.device_put(batches[2], steps.batch_shardings))
    return SimpleNamespace(steps=steps, layout=_layout(steps), batches=batches, host=host, directory=directory,
                           next_loss=float(metrics["loss"]))


def _state(run):
    return jax.device_put(run.host, run.steps.state_shardings)


def test_restore_onto_another_mesh_continues_with_the_same_loss(run):
    steps = _steps({"data": 2, "tensor": 4})
    assert _layout(steps) == run.layout  # the layout does not depend on the mesh
    with Checkpointer(run.directory) as checkpointer:
        restored = checkpointer.restore_latest(steps.abstract_state, run.layout)
    assert restored.step == 2 and int(restored.state.step) == 2
    assert restored.loader_state == LOADER_STATE and restored.config == CONFIG
    _assert_same(restored.state, run.host)
    for array, target in zip(jax.tree.leaves(restored.state), jax.tree.leaves(steps.abstract_state), strict=True):
        assert array.sharding == target.sharding
    _, metrics = steps.train_step(restored.state, jax.device_put(run.batches[2], steps.batch_shardings))
    np.testing.assert_allclose(float(metrics["loss"]), run.next_loss, rtol=1e-5)


def test_every_n_steps_force_at_the_end_and_keep_k(run, tmp_path):
    state = _state(run)
    with Checkpointer(tmp_path, keep=2, every=3, async_save=False) as checkpointer:
        assert checkpointer.restore_latest(run.steps.abstract_state, run.layout) is None
        saved = [checkpointer.save(step, state, None, CONFIG, run.layout, force=step == 7) for step in range(1, 8)]
        assert saved == [False, False, True, False, False, True, True]
        assert checkpointer.steps() == [6, 7]
        assert not checkpointer.save(7, state, None, CONFIG, run.layout, force=True)  # already there
        restored = checkpointer.restore_latest(run.steps.abstract_state, run.layout)
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]
    assert restored.step == 7 and restored.loader_state is None


def test_async_save_keeps_its_copy_while_the_next_step_donates_the_state(run, tmp_path):
    steps = run.steps
    state = _state(run)
    with Checkpointer(tmp_path, every=1, async_save=True) as checkpointer:
        assert checkpointer.save(2, state, LOADER_STATE, CONFIG, run.layout)
        state, _ = steps.train_step(state, jax.device_put(run.batches[2], steps.batch_shardings))
        checkpointer.wait()
        restored = checkpointer.restore_latest(steps.abstract_state, run.layout)
    _assert_same(restored.state, run.host)


@pytest.mark.parametrize("change, expected", [
    ({"n_layers": 3}, ["n_layers: checkpoint 2, model 3",
                       "layers/attn/wq: checkpoint (2, 64, 8, 8), model (3, 64, 8, 8)"]),
    ({"d_ff": 256}, ["d_ff: checkpoint 128, model 256",
                     "layers/mlp/w_up: checkpoint (2, 64, 128), model (2, 64, 256)"]),
], ids=["n_layers", "d_ff"])
def test_another_model_fails_before_orbax_reads_an_array(run, change, expected, monkeypatch):
    config = TINY.replace(**change)
    steps = _steps({"fsdp": 8}, config)
    requested = []
    original = ocp.CheckpointManager.restore

    def spy(self, step, *args, **kwargs):
        requested.append(sorted(kwargs["args"].keys()))
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
    with Checkpointer(run.directory) as checkpointer, pytest.raises(CheckpointError) as error:
        checkpointer.restore_latest(steps.abstract_state, _layout(steps, config))
    message = str(error.value)
    assert all(line in message for line in expected), message
    assert "n_layers=2" in message and "d_ff=128" in message  # which model the checkpoint holds
    assert requested == [["layout"]]  # only the layout was read


def test_check_layout_names_missing_extra_and_changed_parameters(run):
    saved = {**run.layout, "params": dict(run.layout["params"])}
    saved["params"]["lm_head_old"] = saved["params"].pop("lm_head")
    saved["params"]["embedding"] = {**saved["params"]["embedding"], "dtype": "bfloat16"}
    with pytest.raises(CheckpointError) as error:
        check_layout(saved, run.layout, "ckpt/5")
    message = str(error.value)
    assert "missing from the checkpoint: lm_head" in message
    assert "in the checkpoint but not in the model: lm_head_old" in message
    assert "embedding dtype: checkpoint bfloat16, model float32" in message
    # the whole architecture is compared, max_seq_len and init_std too
    longer = {**run.layout, "model_config": {**run.layout["model_config"], "max_seq_len": 4096, "init_std": 0.1}}
    with pytest.raises(CheckpointError, match=r"max_seq_len: checkpoint 128, model 4096\n  init_std: checkpoint "):
        check_layout(run.layout, longer, "ckpt/5")
    # how the model ran is not part of it: checkpoints written before the split stored it, and are read
    old = {**run.layout, "model_config": {**run.layout["model_config"], "compute_dtype": "bfloat16", "remat": "full",
                                          "scan_unroll": 2, "pipeline_microbatches": 4, "pipeline_virtual_stages": 2}}
    check_layout(old, run.layout, "ckpt/5")
    unknown = {**run.layout, "model_config": {**run.layout["model_config"], "n_experts": 8}}
    with pytest.raises(CheckpointError, match="n_experts: checkpoint 8, model None"):
        check_layout(unknown, run.layout, "ckpt/5")
    stacked = {**run.layout, "stacking": "unstacked"}
    with pytest.raises(CheckpointError, match="stacking: checkpoint 'stacked', model 'unstacked'"):
        check_layout(run.layout, stacked, "ckpt/5")


def _data_files(step_dir, item):
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / item / "ocdbt.process_0")
             for name in names if os.path.basename(root) == "d"]
    return sorted(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(8)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


CORRUPTIONS = {
    "truncated-array-file": lambda step: _truncate(_data_files(step, "params")[-1]),
    "deleted-array-file": lambda step: os.remove(_data_files(step, "opt_state")[-1]),
    "flipped-bytes": lambda step: _flip(_data_files(step, "params")[-1]),  # only the checksums notice
    "garbage-array-metadata": lambda step: (step / "params" / "_METADATA").write_text("{garbage"),
    "garbage-layout": lambda step: (step / "layout" / "metadata").write_text("{garbage"),
    "no-commit-marker": lambda step: os.remove(step / "commit_success.txt"),  # half-written
}


# When one array fails to read, Orbax abandons the reads still in flight; Python reports them as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_unreadable_latest_falls_back_to_the_previous_step(run, tmp_path, corrupt):
    state = _state(run)
    with Checkpointer(tmp_path, keep=5, every=1, async_save=False) as checkpointer:
        for step in (2, 4):
            checkpointer.save(step, state, LOADER_STATE, CONFIG, run.layout)
    CORRUPTIONS[corrupt](tmp_path / "4")
    with Checkpointer(tmp_path, keep=5, every=1, async_save=False) as checkpointer:
        with pytest.warns(CheckpointWarning, match=r"step 4: .*Restored step 2 instead"):
            restored = checkpointer.restore_latest(run.steps.abstract_state, run.layout)
        assert restored.step == 2
        _assert_same(restored.state, run.host)
        with pytest.warns(CheckpointWarning, match="moved it to 4.unreadable-"):
            assert checkpointer.save(3, state, LOADER_STATE, CONFIG, run.layout)  # step 4 no longer blocks 3
        assert checkpointer.steps() == [2, 3]
    assert any(name.startswith("4.unreadable-") for name in os.listdir(tmp_path))


def test_an_unfinished_orbax_save_is_ignored(run, tmp_path):
    state = _state(run)
    with Checkpointer(tmp_path, every=1, async_save=False) as checkpointer:
        checkpointer.save(2, state, LOADER_STATE, CONFIG, run.layout)
    unfinished = tmp_path / "4.orbax-checkpoint-tmp-1234567"  # how Orbax names a step it is writing
    shutil.copytree(tmp_path / "2", unfinished)
    os.remove(unfinished / "commit_success.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        with Checkpointer(tmp_path, every=1) as checkpointer:
            restored = checkpointer.restore_latest(run.steps.abstract_state, run.layout)
    assert restored.step == 2
    assert not unfinished.exists()  # a run's Checkpointer removes what an interrupted save left


def test_restore_params_only_onto_a_given_sharding(run, tmp_path):
    target, layout = restore_target(TINY, make_mesh({"fsdp": 2, "tensor": 4}))
    assert layout == run.layout
    params = restore_params(run.directory, target, layout=layout)
    _assert_same(params, run.host.params)
    for array, abstract in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True):
        assert array.sharding == abstract.sharding
    # a parameters-only checkpoint (imported weights) reads back the same way, but cannot resume training
    save_params(tmp_path, 0, params, layout)
    _assert_same(restore_params(tmp_path, target, step=0), run.host.params)
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(CheckpointError, match="parameters only"):
        checkpointer.restore_latest(run.steps.abstract_state, run.layout)
    other, other_layout = restore_target(TINY.replace(n_layers=3), make_mesh({"fsdp": 8}))
    with pytest.raises(CheckpointError, match="n_layers: checkpoint 2, model 3"):
        restore_params(run.directory, other, layout=other_layout)
    with pytest.raises(CheckpointError, match=r"layers/attn/wq: checkpoint \(2, 64, 8, 8\), model \(3, 64, 8, 8\)"):
        restore_params(run.directory, other)  # without a layout: paths and shapes


def test_a_checkpoint_written_before_the_execution_split_restores():
    """tests/data/old_checkpoint was written by the code before ModelConfig and Execution were split (its
    made_with.py): its layout's model_config holds compute_dtype, remat, scan_unroll and the pipeline fields.
    The architecture is read from it, the execution fields dropped, and the parameters restore bit for bit
    onto a mesh, equal to the values saved beside it."""
    import json

    from model.checkpoint import read_layout, reader
    from model.config import ModelConfig

    directory = os.path.join(os.path.dirname(__file__), "data", "old_checkpoint", "checkpoints")
    with reader(directory) as manager:
        assert manager.all_steps() == [7]
        saved = read_layout(manager, 7)
    assert saved["model_config"]["compute_dtype"] == "bfloat16" and saved["model_config"]["scan_unroll"] == 2
    config = ModelConfig.from_dict(saved["model_config"])
    assert config == ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                                 max_seq_len=16)
    target, layout = restore_target(config, make_mesh({"fsdp": 2, "data": 4}))
    assert json.dumps(layout["model_config"], sort_keys=True) != json.dumps(saved["model_config"], sort_keys=True)
    params = restore_params(directory, target, layout=layout)
    want = np.load(os.path.join(directory, "..", "params.npz"))
    flat = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sorted(flat) == sorted(want.files)
    for path, leaf in flat.items():
        np.testing.assert_array_equal(np.asarray(leaf), want[path])
    other, other_layout = restore_target(config.replace(d_ff=64), make_mesh({"data": 8}))
    with pytest.raises(CheckpointError, match="d_ff: checkpoint 32, model 64"):
        restore_params(directory, other, layout=other_layout)


def test_relative_directories_work(run, tmp_path, monkeypatch):
    """Orbax wants absolute paths; users type relative ones (the demo does)."""
    target, layout = restore_target(TINY, make_mesh({"fsdp": 8}))
    params = restore_params(run.directory, target, layout=layout)
    monkeypatch.chdir(tmp_path)
    save_params("relative/ckpt", 3, params, layout)
    _assert_same(restore_params("relative/ckpt", target, layout=layout), run.host.params)
    with Checkpointer("relative/run") as checkpointer:
        assert checkpointer.restore_latest(run.steps.abstract_state, run.layout) is None
