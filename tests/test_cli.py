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
    # quantised at load (model/quant.py): int8 and int4 weights decode; a bad format is one line
    for quantize in ("int8", "int4:32"):
        quantised = run("generate", *common, "--quantize", quantize)
        assert quantised.returncode == 0 and "12 tokens (length)" in quantised.stderr, quantised.stderr
    bad = run("generate", *common, "--quantize", "int4:48")
    assert bad.returncode == 2 and "quantisation 'int4:48': int4 groups are 32, 64 or 128" in bad.stderr


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


def _one_line_error(result, *fragments):
    """Bad input: exit status 2 and one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and last.startswith("meshlm "), result.stderr
    for fragment in fragments:
        assert fragment in last, result.stderr


def test_bad_command_line_input_is_one_line(tmp_path):
    """Arguments that cannot work end the command before anything starts; bad source files name the problem."""
    result = run("serve", "--preset", "tiny", "--tokenizer", "cl100k_base", "--port", "99999")
    _one_line_error(result, "--port: 99999 is out of range", "at most 65535")
    assert len(result.stderr.strip().splitlines()) == 1
    _one_line_error(run("serve", "--preset", "tiny", "--tokenizer", "cl100k_base", "--slots", "0"),
                    "--slots: 0 is out of range")
    # the model source is checked before the port is bound: no server starts
    nosuch = run("serve", "--model", "nosuch")
    _one_line_error(nosuch, "no packaged weights for 'nosuch'")
    assert "Uvicorn running" not in nosuch.stderr
    _one_line_error(run("serve", "--gguf", str(tmp_path / "missing.gguf")), "missing.gguf: no such GGUF file")
    _one_line_error(run("serve", "--preset", "tiny"), "--preset (random weights) needs --tokenizer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a document"}\n{"text": oops}\n')
    _one_line_error(run("data", "prepare", "--out", str(tmp_path / "store"), "--source", str(bad)),
                    "bad.jsonl: line 2: not valid JSON")
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    _one_line_error(run("data", "prepare", "--out", str(tmp_path / "store"), "--source", str(csv)),
                    "x.csv: the sources read .txt, .jsonl, .json, .parquet files")


def test_serve_exits_when_the_model_fails_to_load(tmp_path):
    """A load that fails after the port is bound ends the process with the error in one line, exit status 2
    (an orchestrator sees a process that exits, not a server answering 503 forever)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run("serve", "--preset", "tiny", "--tokenizer", str(tmp_path / "nosuch.tiktoken"), "--port", str(port))
    _one_line_error(result, "nosuch.tiktoken")
    assert "Uvicorn running" in result.stderr  # it failed after binding the port


def test_user_errors_have_one_base_class_per_package():
    """The CLI catches each package's base class: renaming an error class keeps its one-line message."""
    import meshlm
    from data.errors import DataError
    from infer.sampling import InferenceError
    from model.checkpoint import CheckpointError
    from model.config import ConfigError
    from model.errors import ModelError
    from model.hf import WeightsError
    from model.pipeline import PipelineError
    from model.sharding import ShardingError
    from train.config import TrainConfigError
    from train.errors import TrainError
    from train.loop import TrainingStopped

    assert all(issubclass(c, ModelError) for c in (ConfigError, ShardingError, CheckpointError, WeightsError,
                                                   PipelineError))
    assert issubclass(TrainConfigError, TrainError) and issubclass(TrainingStopped, TrainError)
    assert set(meshlm._user_errors()) == {DataError, ModelError, TrainError, InferenceError}
