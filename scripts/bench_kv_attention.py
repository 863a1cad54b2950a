"""One layer's decode attention over a KV cache (`model.transformer.cached_attention`), float32 against int8
(model/cache.py's Int8KV), at a preset's head shapes: why the int8 cache's scales are folded into the scores and
the probabilities instead of being multiplied into a dequantised copy of the cache first.

    python scripts/bench_kv_attention.py [--preset smollm2-135m] [--shapes 1x256,32x256,8x2048,1x8192]
        [--rounds 30] [--out bench_kv_attention.json]

Each shape is rows x cache positions, one new query per row, every position visible. Three variants: the float32
cache; int8 as the attention reads it (the values converted for the two dots, the k scales on the scores, the v
scales on the probabilities); int8 dequantised first (values x scales in float32, then the float attention).
Rounds alternate between the variants and the best round is kept, so a busy machine slows them alike.
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
set_xla_flags(cpu_devices=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--shapes", default="1x256,32x256,8x2048,1x8192", help="ROWSxPOSITIONS,...")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default="bench_kv_attention.json")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from model import get_preset
    from model.cache import dequantize_kv, quantize_kv
    from model.transformer import cached_attention

    config = get_preset(args.preset)

    def dequantised_first(q, k, v, mask):
        return cached_attention(q, dequantize_kv(k, q.dtype), dequantize_kv(v, q.dtype), mask)

    rng = np.random.default_rng(0)
    results = []
    print(f"{args.preset}: {config.n_heads} heads, {config.n_kv_heads} kv heads, head_dim {config.head_dim}; "
          f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}")
    print(f"{'rows':>5} {'positions':>9} {'float32 us':>10} {'int8 us':>8} {'dequantised first us':>21} "
          f"{'int8 / f32':>10}")
    for shape in args.shapes.split(","):
        rows, positions = (int(n) for n in shape.split("x"))
        cache_shape = (rows, config.n_kv_heads, positions, config.head_dim)
        q = jnp.asarray(rng.normal(size=(rows, 1, config.n_heads, config.head_dim)), jnp.float32)
        k = jnp.asarray(rng.normal(size=cache_shape), jnp.float32)
        v = jnp.asarray(rng.normal(size=cache_shape), jnp.float32)
        mask = jnp.ones((rows, 1, positions), bool)
        variants = {"float32": (jax.jit(cached_attention), (q, k, v, mask)),
                    "int8": (jax.jit(cached_attention), (q, quantize_kv(k), quantize_kv(v), mask)),
                    "int8, dequantised first": (jax.jit(dequantised_first), (q, quantize_kv(k), quantize_kv(v),
                                                                           mask))}
        best = {}
        for name, (fn, inputs) in variants.items():
            jax.block_until_ready(fn(*inputs))  # compile
            best[name] = float("inf")
        for _ in range(args.rounds):
            for name, (fn, inputs) in variants.items():
                start = time.perf_counter()
                for _ in range(10):
                    out = fn(*inputs)
                jax.block_until_ready(out)
                best[name] = min(best[name], (time.perf_counter() - start) / 10)
        results.append({"rows": rows, "positions": positions, **{f"{name} seconds": s for name, s in best.items()}})
        print(f"{rows:>5} {positions:>9} {1e6 * best['float32']:>10.0f} {1e6 * best['int8']:>8.0f} "
              f"{1e6 * best['int8, dequantised first']:>21.0f} {best['int8'] / best['float32']:>9.2f}x")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(["python", *sys.argv]), "preset": args.preset,
                   "platform": platform.platform(), "results": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
