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


def test_demo_prepares_trains_evaluates_and_samples(tmp_path):
    """The main job end to end, made small: few documents, short rows, a handful of steps."""
    result = run("demo", "--run-dir", str(tmp_path / "demo"), "--limit", "80", "--seq-len", "64", "--steps", "6",
                 "--new-tokens", "8", "log.progress=false")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "on 8 cpu devices" in out and "parameters: 6,819,072" in out
    assert "mesh: data=2, stage=1, fsdp=2, tensor=2" in out
    assert "layers/attn/wq" in out and "P(None, 'fsdp', 'tensor', None)" in out
    assert "validation loss" in out and "unigram entropy of the same tokens" in out
    assert out.rstrip().split("== 4. sample")[1].count("def fibonacci(n):") == 1
    assert (tmp_path / "demo" / "train" / "loss.png").exists()
    again = run("demo", "--run-dir", str(tmp_path / "demo"), "--limit", "80", "--seq-len", "64", "--steps", "6",
                "--new-tokens", "8", "log.progress=false")
    assert again.returncode == 0 and "(already prepared)" in again.stdout and "resumed from step 6" in again.stdout

    # `meshlm generate` on the run: the text on stdout, the rest on stderr; streamed, plain and speculative
    # greedy text agree
    run_dir = str(tmp_path / "demo" / "train")
    common = ["--checkpoint", run_dir, "--prompt", "import os\n", "--max-tokens", "12", "--temperature", "0",
              "--ignore-eos"]
    plain, streamed = run("generate", *common), run("generate", *common, "--stream", "--stream-chunk", "5")
    drafted = run("generate", *common, "--draft", run_dir, "--draft-tokens", "3")
    for result in (plain, streamed, drafted):
        assert result.returncode == 0, result.stderr
    assert plain.stdout == streamed.stdout == drafted.stdout and len(plain.stdout) > 1  # (spaces, after 6 steps)
    assert "12 tokens (length)" in plain.stderr and "draft acceptance 100%" in drafted.stderr
    bad = run("generate", *common, "--top-p", "0")
    assert bad.returncode == 2 and "top_p must be a number in (0, 1], got 0.0" in bad.stderr


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
    result = run("train", "model.preset=tiny", "mesh.data=3", "mesh.fsdp=1")
    assert result.returncode == 2 and "needs 3 devices but 8 are available" in result.stderr
