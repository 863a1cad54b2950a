"""The training loop as a user runs it: `meshlm train` in a fresh process, killed, preempted, resumed."""

import json
import os
import signal
import subprocess
import sys

import pytest

from train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(run_dir, store, *overrides, fault=None, timeout=300):
    """`meshlm train` in a fresh process; with `fault`, through tests/fault_train.py, which gives `train` a
    StepHook that injects it (kill_after_step:N, term_at_step:N, nan_at_step:N)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    entry = ["-m", "tests.fault_train", fault] if fault else ["-m", "meshlm", "train"]
    cmd = [sys.executable, *entry, "model.preset=tiny", "model.vocab_size=512",
           f"data.store={store}", f"run_dir={run_dir}",
           "train.steps=20", "train.batch_size=8", "log.every=1", "log.eval_every=10", "log.eval_batches=2",
           "log.progress=false", "log.plot=false", "checkpoint.every=10", "mesh.fsdp=-1", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r.get("kind") == "train"}


def test_killed_run_resumes_bit_for_bit(tmp_path, store):
    straight = _train(tmp_path / "straight", store)
    assert straight.returncode == 0, straight.stderr
    killed = _train(tmp_path / "resumed", store, fault="kill_after_step:10")
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # really killed, after its step-10 checkpoint
    assert max(_losses(tmp_path / "resumed")) == 10
    resumed = _train(tmp_path / "resumed", store)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 10" in resumed.stdout
    expected, got = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(expected) == list(range(1, 21))
    assert got == expected  # every one of the 20 losses, bit for bit (JSON keeps all float64 digits)


def test_sigterm_saves_and_exits_cleanly(tmp_path, store):
    result = _train(tmp_path / "run", store, fault="term_at_step:4")
    assert result.returncode == 0, result.stderr
    assert "SIGTERM: stopped after step 4; saved checkpoint 4" in result.stdout
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")
    resumed = _train(tmp_path / "run", store)
    assert "resumed from step 4" in resumed.stdout and resumed.returncode == 0


@pytest.mark.parametrize("policy", ["skip", "stop", "rollback"])
def test_non_finite_policies(tmp_path, store, policy):
    result = _train(tmp_path / "run", store, f"train.nonfinite={policy}", "train.steps=14", "checkpoint.every=5",
                    fault="nan_at_step:7")
    records = read_metrics(os.path.join(tmp_path / "run", "metrics.jsonl"))
    train = [r for r in records if r.get("kind") == "train"]
    if policy == "skip":
        assert result.returncode == 0, result.stderr
        assert train[-1]["skipped"] == 1 and train[-1]["step"] == 14
    elif policy == "stop":
        assert result.returncode == 2
        assert "step 7: the loss or gradient is not finite (train.nonfinite=stop)" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "step 7: non-finite loss or gradient: rolled back to checkpoint 5" in result.stdout
        assert train[-1]["skipped"] == 0 and train[-1]["step"] == 14


def test_run_directory_holds_config_metrics_and_plot(tmp_path, store):
    result = _train(tmp_path / "run", store, "train.steps=6", "log.plot=true", "log.eval_every=3")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    assert {"step", "loss", "grad_norm", "lr", "tokens_per_s", "step_time", "mfu", "skipped"} <= set(train[0])
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and evals[-1]["val_perplexity"] > 1
    assert "MFU peak: CPU float32 matmul peak measured at start-up" in result.stdout


def test_bad_train_config_is_one_clear_line(tmp_path, store):
    result = _train(tmp_path / "run", store, "optim.learning_rate=1")
    assert result.returncode == 2 and "unknown key optim.'learning_rate'" in result.stderr
    result = _train(tmp_path / "run2", store, "model.vocab_size=128")
    assert result.returncode == 2 and "model.vocab_size is 128" in result.stderr


def test_init_from_starts_a_new_run_from_another_checkpoint(tmp_path, store):
    """train.init_from: the new run's parameters are the source's (with lr 1e-12 a step moves them by about
    1e-12); its optimiser and step count start fresh."""
    import jax
    import numpy as np

    from model.load import load_model

    source = _train(tmp_path / "source", store, "train.steps=10")
    assert source.returncode == 0, source.stderr
    tuned = _train(tmp_path / "tuned", store, "train.steps=1", "optim.lr=1e-12",
                   f"train.init_from={tmp_path / 'source'}")
    assert tuned.returncode == 0, tuned.stderr
    assert "parameters from" in tuned.stdout and "new, 1 steps" in tuned.stdout
    assert _losses(tmp_path / "tuned")[1] < _losses(tmp_path / "source")[1] - 0.5  # it starts where the source ended
    want = load_model(checkpoint=str(tmp_path / "source")).params
    got = load_model(checkpoint=str(tmp_path / "tuned")).params
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-10)


def test_init_from_a_checkpoint_of_another_model_is_refused(tmp_path, store):
    source = _train(tmp_path / "source", store, "train.steps=2", "model.d_ff=256")
    assert source.returncode == 0, source.stderr
    result = _train(tmp_path / "tuned", store, "train.steps=1", f"train.init_from={tmp_path / 'source'}")
    assert result.returncode == 2 and "d_ff" in result.stderr, result.stderr
