"""The `meshlm` command line, run as a user runs it: a fresh process."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI sets its own
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "meshlm", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_demo_runs_a_sharded_forward_on_8_simulated_devices():
    result = run("demo", "--preset", "tiny", "--seq-len", "32", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "on 8 cpu devices" in out
    assert "parameters: 106,816" in out
    assert "mesh: data=2, stage=1, fsdp=2, tensor=2" in out
    assert "layers/attn/wq" in out and "P(None, 'fsdp', 'tensor', None)" in out
    assert "laid out as P(('data', 'fsdp'), None, 'tensor')" in out
    difference = float(out.split("single-device logits| = ")[1].split()[0])
    assert difference < 1e-5


def test_plan_lays_out_70b_without_allocating_it():
    result = run("plan", "--preset", "llama3-70b", "--mesh", "fsdp=-1,tensor=8", "--devices", "256")
    assert result.returncode == 0, result.stderr
    assert "parameters: 70,553,706,496" in result.stdout
    assert "fsdp=32, tensor=8" in result.stdout
    assert "(80, 256, 3584)" in result.stdout  # w_gate's shard on each device


def test_bad_input_is_a_clear_error():
    result = run("plan", "--preset", "smollm2-135m", "--mesh", "tensor=2", "--devices", "2")
    assert result.returncode == 2
    assert "'layers/attn/wk' with shape (30, 576, 3, 64)" in result.stderr
    result = run("demo", "--preset", "llama-9000")
    assert result.returncode == 2 and "unknown model preset 'llama-9000'" in result.stderr
    result = run("demo", "--preset", "tiny", "--mesh", "data=3")
    assert result.returncode == 2 and "needs 3 devices but 8 are available" in result.stderr
