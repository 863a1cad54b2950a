"""Decode attention on CPU: the attention kernel (model/attention_kernel.py) against XLA's pure-JAX
`cached_attention`, in one process.

Two measurements:
- per layer: one decode step's attention over 30 layers' caches (out of cache, as in a step), at several
  batch sizes, float32 and int8 caches; milliseconds per layer, best of --repeats;
- with --decode FORMAT: SmolLM2-135M's decode loop (the packaged GGUF, weights in FORMAT) with the kernel on
  and off, rounds alternating; milliseconds per step, and whether the two gave the same greedy tokens (with
  int8 activations a last-bit difference can move an activation across a rounding boundary, so rows may
  part at near-ties; --activations float shows the tokens without that).

    python scripts/bench_attention.py --out bench_attention.json
    python scripts/bench_attention.py --decode int4:32 --batches 1,8,32
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

set_xla_flags()
preload_allocator()


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def best(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def per_layer(args) -> list[dict]:
    """One step's attention over `layers` caches [batch, 3, cache, 64] (SmolLM2-135M: 9 heads, 3 kv heads),
    rows at positions spread below `position`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from model import attention_kernel
    from model.cache import quantize_kv
    from model.transformer import cached_attention

    rows = []
    layers, heads, kv_heads, dim = 30, 9, 3, 64
    rng = np.random.default_rng(0)
    for cache_format in ("float32", "int8"):
        for batch in args.batches:
            shape = (batch, kv_heads, args.cache, dim)
            ks = [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(layers)]
            vs = [jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(layers)]
            if cache_format == "int8":
                ks, vs = [quantize_kv(k) for k in ks], [quantize_kv(v) for v in vs]
            q = jnp.asarray(rng.standard_normal((batch, 1, heads, dim), np.float32))
            positions = jnp.asarray(rng.integers(args.position // 2, args.position + 1, (batch, 1)), jnp.int32)
            mask = jnp.arange(args.cache)[None, None, :] <= positions[:, :, None]

            def xla(q, ks, vs, mask):
                return sum(cached_attention(q, k, v, mask) for k, v in zip(ks, vs, strict=True))

            def kernel(q, ks, vs, positions):
                return sum(attention_kernel.attention(q, k, v, positions, args.cache)
                           for k, v in zip(ks, vs, strict=True))

            fx, fk = jax.jit(xla), jax.jit(kernel)
            np.testing.assert_allclose(fk(q, ks, vs, positions), fx(q, ks, vs, mask), rtol=1e-4, atol=1e-4)
            t_xla = best(lambda fx=fx, ks=ks, vs=vs, q=q, mask=mask: fx(q, ks, vs, mask), args.repeats) / layers
            t_kernel = best(lambda fk=fk, ks=ks, vs=vs, q=q, p=positions: fk(q, ks, vs, p), args.repeats) / layers
            row = {"cache_format": cache_format, "batch": batch, "cache_length": args.cache,
                   "xla_ms": 1e3 * t_xla, "kernel_ms": 1e3 * t_kernel, "speedup": t_xla / t_kernel}
            print(f"  {cache_format:<8} batch {batch:>3}: XLA {row['xla_ms']:.3f} ms/layer, kernel "
                  f"{row['kernel_ms']:.3f} ({row['speedup']:.2f}x)", flush=True)
            rows.append(row)
    return rows


def decode(args) -> list[dict]:
    """The decode loop with the kernel on and off (two Decoders: each traced with `applies` as it is then)."""
    import jax
    import numpy as np
    from flax import nnx

    from infer.decode import Decoder
    from infer.sampling import SamplingParams
    from model import attention_kernel, get_preset, init_model
    from model.gguf import load_gguf, packaged_model_path
    from model.quant import parse_format, quantize_params, with_activations

    config = get_preset("smollm2-135m")
    graphdef, _ = nnx.split(init_model(config, seed=0))
    config, params = load_gguf(packaged_model_path("smollm2-135m"))
    if args.decode != "float32":
        params = quantize_params(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params,
                                 *parse_format(args.decode))
        params = with_activations(params, args.activations)
    applies = attention_kernel.applies
    off = lambda q, k: False  # noqa: E731
    decoders = {"kernel": Decoder(config, graphdef, params), "xla": Decoder(config, graphdef, params)}
    new = args.new_tokens

    def run(name: str, batch: int):
        attention_kernel.applies = applies if name == "kernel" else off
        try:
            prompts = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, args.prompt_len)).tolist()
            greedy = SamplingParams(max_new_tokens=new, temperature=0.0)
            state, sampling = decoders[name].start(prompts, [greedy] * batch, new)
            jax.block_until_ready(state.tokens)
            start = time.perf_counter()
            state = decoders[name].decode(state, sampling, new)
            jax.block_until_ready(state.tokens)
            return time.perf_counter() - start, np.asarray(state.tokens)
        finally:
            attention_kernel.applies = applies

    rows = []
    for batch in args.batches:
        for name in decoders:
            run(name, batch)  # compile
        times = {name: [] for name in decoders}
        tokens = {}
        for _ in range(args.repeats):
            for name in decoders:
                seconds, tokens[name] = run(name, batch)
                times[name].append(seconds)
        kernel, xla = (1e3 * min(times[n]) / (new - 1) for n in ("kernel", "xla"))
        same = int((tokens["kernel"] == tokens["xla"]).all(axis=1).sum())
        row = {"weights": args.decode, "activations": args.activations, "batch": batch, "kernel_step_ms": kernel,
               "xla_step_ms": xla, "speedup": xla / kernel, "rows_with_same_tokens": same}
        print(f"  {args.decode} batch {batch:>3}: kernel {kernel:.2f} ms/step, XLA {xla:.2f} ({xla / kernel:.2f}x); "
              f"rows with the same tokens {same}/{batch}", flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--cache", type=int, default=256, help="cache slots per row (per-layer measurement)")
    parser.add_argument("--position", type=int, default=160, help="the furthest position a row's query sees")
    parser.add_argument("--decode", default=None, metavar="FORMAT",
                        help="also time SmolLM2's decode loop with weights in FORMAT (float32, int8, int4:32, ...)")
    parser.add_argument("--activations", default="int8", choices=("int8", "float"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_attention.json")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]

    import jax

    from model import qkernel

    if qkernel.build() is None:
        print("the CPU kernels are not built here (or MESHLM_QKERNEL=off): nothing to compare", file=sys.stderr)
        return 1
    flags = [f for f in ("avx512f", "avx512_vnni", "avx2") if f in open("/proc/cpuinfo").read()]
    print(f"{cpu_name()}, {os.cpu_count()} cores ({', '.join(flags)}), jax {jax.__version__}")
    out = {"cpu": cpu_name(), "cores": os.cpu_count(), "flags": flags}
    print(f"per layer: one decode step's attention, 9 heads over 3 kv heads of 64, {args.cache} slots, "
          f"positions up to {args.position}")
    out["per_layer"] = per_layer(args)
    if args.decode:
        print(f"decode loop: SmolLM2-135M, {args.decode} weights, {args.activations} activations, prompts of "
              f"{args.prompt_len}, {args.new_tokens} new tokens")
        out["decode"] = decode(args)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
