"""Pipeline schedules on 8 simulated CPU devices: train-step time and bubble versus stages S, microbatches M
and virtual stages V, next to the same step without pipelining.

    python scripts/bench_pipeline.py [--layers 8] [--batch 32] [--seq-len 128] [--out bench_pipeline.json]

The model is the `small` preset with --layers layers (8: divisible by S x V for every row). All 8 simulated
devices share this machine's cores, so a pipeline cannot run faster here: the numbers show the schedule's
overhead (idle stages still compute on zeros, the rotation, the extra iterations), not a speed-up. The
bubble column is the schedule's idle share, (S-1) / (V*M + S - 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.runtime import preload_allocator, set_xla_flags  # noqa: E402  (imports no JAX)

preload_allocator()
set_xla_flags(cpu_devices=8)

CASES = [  # (mesh, M, V)
    ({"data": 8}, 1, 1),
    ({"stage": 2, "data": 4}, 2, 1), ({"stage": 2, "data": 4}, 4, 1), ({"stage": 2, "data": 4}, 8, 1),
    ({"stage": 2, "data": 4}, 4, 2), ({"stage": 2, "data": 4}, 8, 2),
    ({"stage": 4, "data": 2}, 4, 1), ({"stage": 4, "data": 2}, 8, 1), ({"stage": 4, "data": 2}, 8, 2),
    ({"stage": 8}, 8, 1), ({"stage": 8}, 16, 1),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_pipeline.json")
    args = parser.parse_args()

    import jax
    import numpy as np

    from model import Execution, get_preset, make_mesh
    from model.pipeline import bubble_fraction
    from train.config import OptimSection, ScheduleSection
    from train.step import build_steps

    rows = []
    rng = np.random.default_rng(0)
    for shape, m, v in CASES:
        config = get_preset("small").replace(n_layers=args.layers)
        execution = Execution(pipeline_microbatches=m, pipeline_virtual_stages=v)
        mesh = make_mesh(shape)
        steps = build_steps(config, OptimSection(), ScheduleSection(), 100, mesh, batch_size=args.batch,
                            execution=execution)
        state = steps.init(0)
        tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
        batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                 "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), (args.batch, args.seq_len)),
                 "segment_ids": np.ones((args.batch, args.seq_len), np.int32),
                 "weights": np.ones((args.batch, args.seq_len), np.float32)}
        batch = {k: jax.device_put(np.ascontiguousarray(x), steps.batch_shardings[k]) for k, x in batch.items()}
        state, _ = steps.train_step(state, batch)  # compile
        jax.block_until_ready(state)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state, metrics = steps.train_step(state, batch)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        stages = mesh.shape["stage"]
        rows.append({"mesh": shape, "stages": stages, "microbatches": m, "virtual_stages": v,
                     "bubble": bubble_fraction(stages, m, v), "step_s": min(times), "loss": float(metrics["loss"])})
        print(f"{str(shape):<26} M={m:<3} V={v}  bubble {rows[-1]['bubble']:6.1%}  step {min(times) * 1e3:8.1f} ms",
              flush=True)
    base = rows[0]["step_s"]
    print(f"\n{'mesh':<26} {'S':>2} {'M':>3} {'V':>2} {'bubble':>7} {'step ms':>9} {'vs no pipeline':>15}")
    for r in rows:
        print(f"{str(r['mesh']):<26} {r['stages']:>2} {r['microbatches']:>3} {r['virtual_stages']:>2} "
              f"{r['bubble']:>7.1%} {r['step_s'] * 1e3:>9.1f} {r['step_s'] / base:>14.2f}x")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "jax": jax.__version__, "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len,
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
