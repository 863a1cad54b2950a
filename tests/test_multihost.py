"""Several processes as the hosts of one run (jax.distributed, gloo collectives between CPU processes), started
by `meshlm launch` on this machine: 2 processes x 4 simulated devices train like 1 process x 8 devices, a
checkpoint they write continues on one process, and bad setups get one-line errors."""

import os
import subprocess
import sys

import datasets
import numpy as np
import pytest

from data.pipeline import PrepareConfig, prepare
from train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    datasets.disable_progress_bars()
    path = str(tmp_path_factory.mktemp("data") / "store")
    prepare(PrepareConfig(out=path, limit=120, tokenizer="bpe:512", seq_len=32, num_proc=1), verbose=False)
    return path


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _train_args(run_dir, store, steps: int) -> list[str]:
    return ["train", "model.preset=tiny", "model.vocab_size=512", f"data.store={store}", f"run_dir={run_dir}",
            f"train.steps={steps}", "train.batch_size=8", "log.every=1", "log.eval_every=10", "log.eval_batches=2",
            "log.progress=false", "log.plot=false", "checkpoint.every=5", *MESH]


def _meshlm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "meshlm", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r.get("kind") == "train"}


def test_two_processes_train_like_one_and_their_checkpoint_continues_on_one(tmp_path, store):
    """Bound: the losses agree to float32 rounding (rtol 1e-6), not bit for bit: the gradients' all-reduce
    between processes (gloo) adds the shards' partial sums in another order than XLA:CPU's all-reduce inside one
    process. Only process 0 writes metrics."""
    one = _meshlm(*_train_args(tmp_path / "one", store, 10), "--cpu-devices", "8")
    assert one.returncode == 0, one.stderr
    two = _meshlm("launch", "--processes", "2", "--cpu-devices", "4", "--",
                  *_train_args(tmp_path / "two", store, 10))
    assert two.returncode == 0, two.stdout + two.stderr
    assert "[0] done: step 10" in two.stdout and "[1] done: step 10" in two.stdout
    expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6)
    with open(tmp_path / "two" / "metrics.jsonl") as f:
        assert len(f.read().splitlines()) == 11  # 10 steps and one evaluation, written once
    # the 2-process checkpoint (step 10) continues on 1 process x 8 devices like the 1-process run does
    for name in ("one", "two"):
        more = _meshlm(*_train_args(tmp_path / name, store, 15), "--cpu-devices", "8")
        assert more.returncode == 0, more.stderr
        assert "resumed from step 10" in more.stdout
    expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    np.testing.assert_allclose([got[s] for s in range(11, 16)], [expected[s] for s in range(11, 16)], rtol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "process_id 2 is not one of 0..1"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2"], "missing: process_id"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "coordinator must be HOST:PORT"),
])
def test_bad_multi_process_settings_are_one_line(args, message):
    result = _meshlm("train", "model.preset=tiny", *args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_coordinator_that_cannot_be_reached_is_an_error_after_a_bounded_wait(tmp_path):
    env = {**_env(), "MESHLM_JOIN_TIMEOUT_SECS": "5"}
    result = subprocess.run([sys.executable, "-m", "meshlm", "train", "model.preset=tiny", "--coordinator",
                             "127.0.0.1:9", "--num-processes", "2", "--process-id", "1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "could not join the multi-process run at 127.0.0.1:9 within 5 s" in result.stderr


def test_launch_exits_non_zero_when_its_processes_fail(store, tmp_path):
    """A mesh larger than the 2 x 4 devices of all processes together: each process says so in one line
    (prefixed with its index) and launch reports the failure and exits with its status."""
    result = _meshlm("launch", "--processes", "2", "--cpu-devices", "4", "--",
                     *_train_args(tmp_path / "bad", store, 2)[:-3], "mesh.data=16", timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "meshlm launch: process" in result.stderr and "exited with 2" in result.stderr
    assert "[0] meshlm train: error:" in result.stdout or "[1] meshlm train: error:" in result.stdout
