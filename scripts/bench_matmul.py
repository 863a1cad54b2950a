"""Matmul micro-benchmark at SmolLM2-135M's shapes: every way meshlm could multiply activations [M, K] by a
quantised weight [K, N] on this CPU, per matrix, with the weights out of cache.

Paths (each a jitted function of M rows against DEPTH separate weight matrices, so that a matrix is read from
memory, as in a decode step that goes through 30 layers):
    float32        x @ W
    bfloat16       x.bf16 @ W.bf16, float32 accumulation
    int8 dequant   x @ (W_int8 as float32 * scale)            (what XLA makes of model.quant.dequantize)
    int4 dequant   x @ dequantize(W_int4, groups of 32)
    int8 x int8    round(x / row scale) as int8 @ W_int8 -> int32, times both scales
    kernel int8    model/qmatmul.cc on int8 per channel, activations quantised to int8 (blocks of 32): integer dots
    kernel int4    model/qmatmul.cc on int4, groups of 32, activations as above
    kernel int8 fx / kernel int4 fx   the same with float activations (activations="float": weights turned
                   into floats in registers)

XLA:CPU's `--xla_cpu_experimental_ynn_fusion_type=dot,reduce` (which model/runtime.py sets) changes some of
these a lot, so `--ynn both` (the default) runs every path with and without it, each in its own process (XLA
reads its flags once).

    python scripts/bench_matmul.py --out bench_matmul.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SHAPES = {"576x576": (576, 576), "576x192": (576, 192), "576x1536": (576, 1536), "1536x576": (1536, 576),
          "576x49152": (576, 49152)}  # [K, N] of q and o, k and v, gate and up, down, the LM head
PATHS = ("float32", "bfloat16", "int8 dequant", "int4 dequant", "int8 x int8", "kernel int8", "kernel int4",
         "kernel int8 fx", "kernel int4 fx")
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    extra = [f for f in ("avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {isa}" + (f" ({', '.join(extra)})" if extra else "")


def measure(rows: list[int], shapes: list[str], paths: list[str], repeats: int) -> list[dict]:
    """In this process (XLA_FLAGS already set): one row per (shape, M, path)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from model import qkernel, quant

    results = []
    rng = np.random.default_rng(0)
    for shape_name in shapes:
        k, n = SHAPES[shape_name]
        depth = max(2, min(60, (64 << 20) // (k * n)))  # >= 64 MB of int8 weights in all: out of cache
        floats = [jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.05) for _ in range(depth)]
        int8 = [quant.quantize(w, "int8") for w in floats]
        int4 = [quant.quantize(w, "int4", 32) for w in floats]
        bf16 = [w.astype(jnp.bfloat16) for w in floats]

        def dequant8(x, ws):
            return sum(x @ (q.values.astype(jnp.float32) * q.scale) for q in ws)

        def int8_int8(x, ws):
            sx = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127
            xq = jnp.round(x / jnp.where(sx == 0, 1, sx)).astype(jnp.int8)
            return sum(jax.lax.dot(xq, q.values, preferred_element_type=jnp.int32).astype(jnp.float32)
                       * sx * q.scale for q in ws)

        def kernel(x, ws):
            return sum(qkernel.qmatmul(x, q) for q in ws)

        fns = {
            "float32": (lambda x, ws: sum(x @ w for w in ws), floats),
            "bfloat16": (lambda x, ws: sum(jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
                                           for w in ws), bf16),
            "int8 dequant": (dequant8, int8),
            "int4 dequant": (lambda x, ws: sum(x @ quant.dequantize(q) for q in ws), int4),
            "int8 x int8": (int8_int8, int8),
            "kernel int8": (kernel, int8),
            "kernel int4": (kernel, int4),
            "kernel int8 fx": (kernel, quant.with_activations(int8, "float")),
            "kernel int4 fx": (kernel, quant.with_activations(int4, "float")),
        }
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k), np.float32))
            reference = None
            for path in paths:
                if path.startswith("kernel") and qkernel.build() is None:
                    continue
                fn, weights = fns[path]
                run = jax.jit(fn)
                out = run(x, weights).block_until_ready()
                if path == "float32":
                    reference = np.asarray(out)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run(x, weights).block_until_ready()
                    times.append(time.perf_counter() - start)
                ms = min(times) / depth * 1e3
                error = (float(np.abs(np.asarray(out) - reference).max() / np.abs(reference).max())
                         if reference is not None else None)
                results.append({"shape": shape_name, "k": k, "n": n, "m": m, "path": path, "ms": ms,
                                "gflops": 2 * m * k * n / ms / 1e6, "rel_error_vs_float32": error})
                print(f"  {shape_name:10s} M={m:<4d} {path:14s} {ms:8.4f} ms", file=sys.stderr, flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,32,128", help="values of M, comma-separated")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="which shapes (names as in the table)")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--ynn", choices=("on", "off", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench_matmul.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    shapes = [s.strip() for s in args.shapes.split(",")]
    paths = [p.strip() for p in args.paths.split(",")]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; one of {', '.join(SHAPES)}")
    for p in paths:
        if p not in PATHS:
            ap.error(f"unknown path {p!r}; one of {', '.join(PATHS)}")

    if args.child:  # XLA_FLAGS were set by the parent
        json.dump(measure(rows, shapes, paths, args.repeats), sys.stdout)
        return 0

    results = []
    for ynn in (("on", "off") if args.ynn == "both" else (args.ynn,)):
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(YNN_FLAG.split("=")[0])]
        flags.append(YNN_FLAG if ynn == "on" else "--xla_cpu_experimental_ynn_fusion_type=")
        env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
        print(f"ynn fusion {ynn}:", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", "--rows", args.rows, "--shapes", ",".join(shapes),
               "--paths", ",".join(paths), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        results += [{**r, "ynn": ynn} for r in json.loads(done.stdout)]

    machine = cpu_name()
    print(f"\nms per matrix (best of {args.repeats}), {machine}")
    header = "| shape | M | ynn | " + " | ".join(paths) + " |"
    print(header)
    print("|" + "---|" * 3 + "---:|" * len(paths))
    for s in shapes:
        for m in rows:
            for ynn in sorted({r["ynn"] for r in results}, reverse=True):
                cells = {r["path"]: r["ms"] for r in results if (r["shape"], r["m"], r["ynn"]) == (s, m, ynn)}
                print(f"| {s} | {m} | {ynn} | " + " | ".join(f"{cells[p]:.3f}" if p in cells else "-" for p in paths)
                      + " |")
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "python": platform.python_version(), "results": results}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
