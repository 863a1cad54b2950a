"""Loading quantised weights: SmolLM2-135M's Q4_1 GGUF dequantised to float32, with its blocks kept
(`--quantize keep`), quantised at load (`--quantize int8`), and meshlm checkpoints written by
`meshlm convert [--quantize ...]`: seconds until the parameters are on the device, peak resident memory,
and each checkpoint's size on disk.

    python scripts/bench_quant_load.py [--repeats 3] [--out bench_quant_load.json]

Every load runs in a process of its own (`--one KIND`), so its peak RSS (getrusage's ru_maxrss) is that load's
plus the imports; a process that only imports what a load imports (jax, flax, orbax, model.load, gguf) and
starts the CPU backend is measured the same way as the baseline. A load is `model.load.load_model` and then
the parameters put on the default device (what a Decoder does first), waited for. Checkpoints are written
first by the `meshlm convert` command into a temporary directory. Best time and highest peak over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m"
CHECKPOINTS = {"float32": None, "int8": "int8", "int4:32": "int4:32", "q4_1 (GGUF blocks kept)": "keep"}


def one(kind: str, checkpoint: str | None) -> dict:
    """In this process: import, then (unless kind is 'imports') load and place; seconds and peak RSS."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import gguf  # noqa: F401  (the GGUF reader: imported by every load of a GGUF)
    import jax

    from model.load import load_model
    from model.quant import describe_quantization, quantize_params

    jax.devices()
    start = time.perf_counter()
    weights = ""
    if kind != "imports":
        if checkpoint:
            loaded = load_model(checkpoint=checkpoint)
        else:
            loaded = load_model(model=MODEL, keep_quantized=kind == "gguf keep")
        params = loaded.params
        if kind == "gguf int8 at load":
            params = quantize_params(params, "int8")
        jax.block_until_ready(jax.device_put(params))
        weights = describe_quantization(params)
    seconds = time.perf_counter() - start
    return {"kind": kind, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weights": weights}


def measure(kind: str, checkpoint: str | None, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", kind] + (["--checkpoint", checkpoint]
                                                                              if checkpoint else [])
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"kind": kind, "seconds": min(r["seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "weights": runs[0]["weights"]}


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.checkpoint)))
        return

    rows = [measure(kind, None, args.repeats) for kind in ("imports", "gguf float32", "gguf keep",
                                                           "gguf int8 at load")]
    with tempfile.TemporaryDirectory(prefix="bench-quant-load-") as scratch:
        for name, quantize in CHECKPOINTS.items():
            out = os.path.join(scratch, name.split()[0].replace(":", "_"))
            subprocess.run([sys.executable, "-m", "meshlm", "convert", "--model", MODEL, "--out", out,
                            *(["--quantize", quantize] if quantize else [])], cwd=ROOT, check=True,
                           capture_output=True)
            row = measure(f"checkpoint {name}", out, args.repeats)
            row["disk_mb"] = disk_bytes(out) / 1e6
            rows.append(row)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"{'load':<36} {'seconds':>8} {'peak RSS MB':>12} {'on disk MB':>11}  matmul weights")
    for row in rows:
        disk = f"{row['disk_mb']:.1f}" if "disk_mb" in row else ""
        print(f"{row['kind']:<36} {row['seconds']:>8.2f} {row['peak_rss_mb']:>12.0f} {disk:>11}  {row['weights']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": cpu_model(), "cpus": os.cpu_count(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
