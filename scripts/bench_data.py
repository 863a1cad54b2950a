"""Data pipeline throughput: MB/s of every stage, tokens/s of tokenization, loader batches/s.

    python scripts/bench_data.py [--tokenizer cl100k_base] [--num-proc 2] [--out bench_data.json]

Runs `prepare` on the embedded corpus (the Python standard library + pydoc
topics) into a temporary store, then times the loader on that store: plain
numpy batches, and global jax.Arrays sharded over 8 simulated CPU devices.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loader_rate(store, batch: int, seconds: float, sharding=None) -> float:
    from data.loader import Loader

    with Loader(store, batch, seed=0, sharding=sharding, prefetch=2) as loader:
        next(loader)  # start-up (thread, first reads) is not steady state
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(loader)
            count += 1
    return count / (time.perf_counter() - start)


def loader_wait(store, batch: int, steps: int, sharding, mesh) -> tuple[float, float]:
    """(mean seconds the consumer waits in next(), mean seconds of its step) with the `small`
    preset's jitted forward + backward on 8 simulated devices as the consumer."""
    import jax
    from flax import nnx

    from data.loader import Loader
    from model import cross_entropy, get_preset, init_on_mesh
    from model.sharding import activation_sharding

    config = get_preset("small", max_seq_len=store.seq_len)
    graphdef, state = nnx.split(init_on_mesh(config, mesh))

    @jax.jit
    def step(state, batch):
        def loss(state):
            with activation_sharding(mesh):
                logits = nnx.merge(graphdef, state)(batch["tokens"], batch["positions"], batch["segment_ids"])
            return cross_entropy(logits, batch["targets"], batch["weights"])
        return jax.grad(loss)(state)

    waits, steps_s = [], []
    with Loader(store, batch, seed=0, sharding=sharding, prefetch=2) as loader:
        jax.block_until_ready(step(state, next(loader)))  # compile
        for _ in range(steps):
            start = time.perf_counter()
            batch_arrays = next(loader)
            waited = time.perf_counter() - start
            jax.block_until_ready(step(state, batch_arrays))
            waits.append(waited)
            steps_s.append(time.perf_counter() - start - waited)
    return sum(waits) / steps, sum(steps_s) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default="cl100k_base")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--loader-seconds", type=float, default=3.0)
    parser.add_argument("--wait-steps", type=int, default=10, help="train steps of `small` timed with the loader")
    parser.add_argument("--out", default="bench_data.json")
    args = parser.parse_args()

    import datasets

    from data.pipeline import PrepareConfig, prepare
    from data.store import open_store

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        report = prepare(PrepareConfig(out=store_path, tokenizer=args.tokenizer, seq_len=args.seq_len,
                                       num_proc=args.num_proc), verbose=False)
        # JAX only now: the pipeline forks its workers, which must not inherit JAX's threads
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        from model import make_mesh
        from model.sharding import named_sharding

        store = open_store(store_path)
        mesh = make_mesh({"data": 2, "fsdp": 4})
        sharding = named_sharding(mesh, ("batch", "length"))
        numpy_rate = loader_rate(store, args.batch, args.loader_seconds)
        jax_rate = loader_rate(store, args.batch, args.loader_seconds, sharding)
        wait, step = loader_wait(store, args.batch, args.wait_steps, sharding, mesh)

    print(f"{'stage':<12} {'docs in':>8} {'docs out':>8} {'MB in':>8} {'seconds':>8} {'MB/s':>8}")
    for s in report["stages"]:
        rate = s["bytes_in"] / 1e6 / s["seconds"] if s["seconds"] else float("nan")
        print(f"{s['stage']:<12} {s['docs_in']:>8,} {s['docs_out']:>8,} {s['bytes_in'] / 1e6:>8.2f} "
              f"{s['seconds']:>8.2f} {rate:>8.1f}")
    tokenize = next(s for s in report["stages"] if s["stage"] == "tokenize")
    print(f"tokenization ({args.tokenizer}, {args.num_proc} processes): {tokenize['extra']['tokens']:,} tokens, "
          f"{tokenize['extra']['tokens_per_s']:,.0f} tokens/s")
    print(f"loader, batch {args.batch} x {args.seq_len}: {numpy_rate:,.0f} batches/s as numpy, "
          f"{jax_rate:,.0f} batches/s as jax.Arrays on 8 simulated devices")
    print(f"loader feeding a `small` forward+backward step ({step * 1e3:.0f} ms): the step waits "
          f"{wait * 1e3:.2f} ms per batch on average")
    result = {"command": " ".join(sys.argv), "platform": platform.platform(), "cpus": os.cpu_count(),
              "report": report, "loader_batches_per_s": {"numpy": numpy_rate, "jax_8_devices": jax_rate},
              "small_step": {"step_seconds": step, "wait_seconds": wait}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
