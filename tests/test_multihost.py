"""Several processes as the hosts of one run (jax.distributed, gloo collectives between CPU processes), started
by `meshlm launch` on this machine: 2 processes x 4 simulated devices train like 1 process x 8 devices (with and
without a pipeline between them), a checkpoint they write continues on 1 process and on 4 processes as 4 slices
(dcn_* axes), preemption, a non-finite step and a lost process are met by all processes alike, and bad setups
get one-line errors."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _train_args(run_dir, store, steps: int, mesh=MESH) -> list[str]:
    return ["train", "model.preset=tiny", "model.vocab_size=512", f"data.store={store}", f"run_dir={run_dir}",
            f"train.steps={steps}", "train.batch_size=8", "log.every=1", "log.eval_every=10", "log.eval_batches=2",
            "log.progress=false", "log.plot=false", "checkpoint.every=5", *mesh]


def _meshlm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "meshlm", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def one(store, tmp_path_factory):
    """The reference: 10 steps in one process with 8 devices."""
    run_dir = tmp_path_factory.mktemp("runs") / "one"
    result = _meshlm(*_train_args(run_dir, store, 10), "--cpu-devices", "8")
    assert result.returncode == 0, result.stderr
    return run_dir


def _launch(processes: int, devices: int, *command, timeout=300):
    return _meshlm("launch", "--processes", str(processes), "--cpu-devices", str(devices), "--", *command,
                   timeout=timeout)


@pytest.fixture(scope="module")
def two(store, tmp_path_factory):
    """The same 10 steps as 2 processes x 4 devices (`meshlm launch`)."""
    run_dir = tmp_path_factory.mktemp("runs") / "two"
    result = _launch(2, 4, *_train_args(run_dir, store, 10))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[0] done: step 10" in result.stdout and "[1] done" not in result.stdout  # process 0 reports
    return run_dir


def test_two_processes_train_like_one_and_their_checkpoint_continues_on_one_and_on_four(tmp_path, store, one, two):
    """Bound: the losses agree to float32 rounding (rtol 1e-6), not bit for bit: the gradients' all-reduce
    between processes (gloo) adds the shards' partial sums in another order than XLA:CPU's all-reduce inside one
    process. Only process 0 writes metrics. The 2-process checkpoint (parameters, optimiser and loader state)
    continues on 1 process x 8 devices and on 4 processes x 2 devices, there as 4 slices (dcn_data 2 x dcn_fsdp
    2, tensor inside a process), with the steps and batches of the 1-process run."""
    shutil.copytree(two, tmp_path / "two")
    expected, got = _losses(one), _losses(tmp_path / "two")
    assert sorted(got) == list(range(1, 11))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6)
    with open(tmp_path / "two" / "metrics.jsonl") as f:
        assert len(f.read().splitlines()) == 11  # 10 steps and one evaluation, written once
    shutil.copytree(one, tmp_path / "one")
    shutil.copytree(two, tmp_path / "four")
    for name in ("one", "two"):
        more = _meshlm(*_train_args(tmp_path / name, store, 15), "--cpu-devices", "8")
        assert more.returncode == 0, more.stderr
        assert "resumed from step 10" in more.stdout
    slices = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=2", "mesh.dcn_data=2", "mesh.dcn_fsdp=2"]
    more = _launch(4, 2, *_train_args(tmp_path / "four", store, 15, mesh=slices))
    assert more.returncode == 0, more.stdout + more.stderr
    assert "resumed from step 10" in more.stdout
    expected = _losses(tmp_path / "one")
    for name in ("two", "four"):
        got = _losses(tmp_path / name)
        np.testing.assert_allclose([got[s] for s in range(11, 16)], [expected[s] for s in range(11, 16)], rtol=1e-6)


def test_a_pipeline_between_two_processes_trains_like_one_process(tmp_path, store):
    """stage 2 is the outermost axis, so each process holds one stage and the activations handed from stage to
    stage go between the processes (gloo). Equal to float32 rounding, as above."""
    mesh = ["mesh.data=1", "mesh.stage=2", "mesh.fsdp=2", "mesh.tensor=2", "pipeline.microbatches=2"]
    alone = _meshlm(*_train_args(tmp_path / "one", store, 6, mesh), "--cpu-devices", "8")
    assert alone.returncode == 0, alone.stderr
    both = _launch(2, 4, *_train_args(tmp_path / "two", store, 6, mesh))
    assert both.returncode == 0, both.stdout + both.stderr
    assert "pipeline: 2 stages" in both.stdout
    expected, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], rtol=1e-6)


def test_generate_with_two_processes_equals_one_token_for_token(one):
    """Greedy and sampled: the same text from a mesh split over 2 processes as from 1 process, printed once."""
    for sampling in (["--temperature", "0"], ["--temperature", "0.9", "--seed", "5"]):
        args = ["generate", "--checkpoint", str(one), "--prompt", "def f(x):", "--max-tokens", "16",
                "--mesh", "data=2,tensor=4", *sampling]
        alone = _meshlm(*args, "--cpu-devices", "8")
        assert alone.returncode == 0, alone.stderr
        both = _launch(2, 4, *args)
        assert both.returncode == 0, both.stdout + both.stderr
        # gloo's own connection lines are dropped (model.runtime.quiet_native_stdout): stdout is the text
        lines = both.stdout.splitlines()
        assert "".join(line[4:] + "\n" for line in lines if line.startswith("[0] ")).endswith(alone.stdout)
        assert not [line for line in lines if line.startswith("[1] ") and line[4:].strip()]  # process 0 prints


def _start(commands: list[list[str]], devices: int = 4) -> list[subprocess.Popen]:
    """Process i of len(commands) runs `python commands[i]` with the cluster settings of one run."""
    cluster = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", str(len(commands)),
               "--cpu-devices", str(devices)]
    return [subprocess.Popen([sys.executable, *command, *cluster, "--process-id", str(i)], cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, command in enumerate(commands)]


def _with_fault(fault: str, train_args: list[str]) -> list[str]:
    return ["-m", "tests.fault_train", fault, *train_args[1:]]  # train_args: ["train", overrides...]


def test_sigterm_to_one_process_stops_both_after_the_same_step_and_the_rerun_resumes_bit_for_bit(
        tmp_path, store, two):
    """Process 1 alone gets SIGTERM after step 4 (tests/fault_train.py): both processes stop after step 4,
    save it and exit 0; `meshlm launch` of the same command then resumes and ends with the very losses of the
    uninterrupted 2-process run."""
    run_dir = tmp_path / "preempted"
    train_args = _train_args(run_dir, store, 10)
    processes = _start([["-m", "meshlm", *train_args], _with_fault("term_at_step:4", train_args)])
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err
    assert "SIGTERM: stopped after step 4" in outputs[0][0]  # process 0 logs it: it stopped too
    assert sorted(_losses(run_dir)) == [1, 2, 3, 4]
    resumed = _launch(2, 4, *_train_args(run_dir, store, 10))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[0] run" in resumed.stdout and "resumed from step 4" in resumed.stdout
    assert _losses(run_dir) == _losses(two)  # all 10, bit for bit


def test_a_non_finite_step_on_one_process_rolls_every_process_back(tmp_path, store):
    """NaN in process 1's rows of step 7's batch only: the step's loss is global, so both processes see it
    non-finite, both restore checkpoint 5 and both go on to step 8 (train.nonfinite=rollback)."""
    run_dir = tmp_path / "nan"
    train_args = [*_train_args(run_dir, store, 8), "train.nonfinite=rollback"]
    processes = _start([["-m", "meshlm", *train_args], _with_fault("nan_at_step:7", train_args)])
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err
    assert "step 7: non-finite loss or gradient: rolled back to checkpoint 5" in outputs[0][0]
    with open(run_dir / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if r.get("kind") == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 6, 7, 8]  # step 7 undone: 6..8 again
    assert all(np.isfinite(r["loss"]) for r in records)


def test_a_killed_process_is_named_by_the_others_which_stop_and_the_rerun_resumes(tmp_path, store):
    """SIGKILL to process 1 once a checkpoint exists: process 0's next collective fails; it does not hang: the
    processes left answer a roll call (model.runtime.lost_peer_error), process 0 names process 1 as lost and
    exits 1 within ROLL_CALL_SECS. Running the same command again resumes from the last complete checkpoint."""
    from model.runtime import ROLL_CALL_SECS

    run_dir = tmp_path / "killed"
    train_args = _train_args(run_dir, store, 40)
    processes = _start([["-m", "meshlm", *train_args], _with_fault("kill_after_step:5", train_args)])
    _, err1 = processes[1].communicate(timeout=300)
    assert processes[1].returncode == -9, err1
    start = time.monotonic()
    _, err0 = processes[0].communicate(timeout=ROLL_CALL_SECS + 90)
    assert processes[0].returncode == 1, err0
    assert time.monotonic() - start < ROLL_CALL_SECS + 20
    assert "meshlm train: error (process 0): lost process 1 of 2: a collective with it failed" in err0, err0
    assert "Traceback" not in err0
    resumed = _launch(2, 4, *_train_args(run_dir, store, 10))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step 5" in resumed.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.mark.parametrize("override, message", [
    ("mesh.data=16", "needs 64 devices but 8 are available"),  # more than both processes have together
    ("train.batch_size=7", "train.batch_size 7 does not divide over 2 processes"),
])
def test_launch_exits_non_zero_when_its_processes_fail(store, tmp_path, override, message):
    """A setup that cannot run on 2 processes x 4 devices: each process says so in one line (prefixed with its
    index) and launch reports the failure and exits with its status."""
    result = _meshlm("launch", "--processes", "2", "--cpu-devices", "4", "--",
                     *_train_args(tmp_path / "bad", store, 2), override, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "meshlm launch: process" in result.stderr and "exited with 2" in result.stderr
    assert "[0] meshlm train: error (process 0):" in result.stderr or "[1] meshlm train: error (process 1):" in \
        result.stderr
    assert message in result.stderr
