"""Forward-pass throughput of the presets, against this machine's measured matmul peak.

    python scripts/bench_forward.py [--presets tiny,small] [--batch 8] [--seq-len 256] [--out bench_forward.json]

For each preset: parameters, training FLOPs per token (6N + attention), forward
tokens/s, achieved forward FLOP/s (a third of the training FLOPs per token times
tokens/s), and that as a fraction of the float32 matmul peak measured in the
same run (a large jnp.dot on the same device). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_preset(name: str, batch: int, seq_len: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model import flops_per_token, get_preset, init_model, param_count

    config = get_preset(name)
    seq_len = min(seq_len, config.max_seq_len)
    graphdef, state = nnx.split(init_model(config))
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, config.vocab_size, jnp.int32)
    from train.metrics import best_seconds

    seconds = best_seconds(lambda: forward(state, tokens), repeats)
    tokens_per_s = batch * seq_len / seconds
    forward_flops = flops_per_token(config, seq_len) / 3
    return {
        "preset": name, "params": param_count(config), "train_flops_per_token": flops_per_token(config, seq_len),
        "batch": batch, "seq_len": seq_len, "forward_s": seconds, "tokens_per_s": tokens_per_s,
        "forward_flops_per_s": forward_flops * tokens_per_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--out", default="bench_forward.json")
    args = parser.parse_args()

    import jax

    from train.metrics import measure_matmul_peak

    peak = measure_matmul_peak(args.matmul_size, args.repeats)
    rows = [bench_preset(name, args.batch, args.seq_len, args.repeats) for name in args.presets.split(",")]
    for row in rows:
        row["fraction_of_matmul_peak"] = row["forward_flops_per_s"] / peak

    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} cores, "
          f"float32 matmul peak ({args.matmul_size}^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'preset':<8} {'params':>12} {'train FLOPs/tok':>16} {'batch x len':>12} {'tokens/s':>10} "
          f"{'fwd GFLOP/s':>12} {'of peak':>8}")
    for r in rows:
        print(f"{r['preset']:<8} {r['params']:>12,} {r['train_flops_per_token']:>16,.0f} "
              f"{r['batch']:>5} x {r['seq_len']:<4} {r['tokens_per_s']:>10,.0f} "
              f"{r['forward_flops_per_s'] / 1e9:>12.2f} {r['fraction_of_matmul_peak']:>8.1%}")
    result = {
        "command": " ".join(sys.argv), "platform": platform.platform(), "device": str(device.device_kind),
        "jax": jax.__version__, "matmul_peak_flops_per_s": peak, "results": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
