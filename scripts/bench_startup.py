"""Start-up and first requests of `meshlm serve`, cold and warm: time to ready, and the latency of the first
request of every cache bucket, with what each compiled.

    python scripts/bench_startup.py [--model smollm2-135m | --preset tiny --tokenizer cl100k_base]
        [--slots 8] [--max-length 2048] [--cache DIR] [--out bench_startup.json]

Cold: a fresh, empty compilation cache directory. Warm: the same command again over the cache the cold run
filled (what a restart of a server finds). Each run starts a `meshlm serve` process, waits for /health to say
ok (time to ready, counted from the process start: imports, model load, engine warm-up), then sends one
completion per cache bucket (a prompt of bucket - 1 token ids, no prompt a prefix of another so that the prefix
cache is not hit, 8 new tokens, one at a time) and reads the
server's own compile counters from /metrics (meshlm_xla_compilations, meshlm_xla_compile_seconds,
meshlm_compile_cache_hits) before and after each. Warm-up compiles every bucket's prefill, insert, extract and
generate step, so a request that compiles nothing is the goal; a warm run should compile nothing at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def counters(client: httpx.Client) -> dict[str, float]:
    names = ("meshlm_xla_compilations", "meshlm_xla_compile_seconds", "meshlm_compile_cache_hits")
    found = {}
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name.removeprefix("meshlm_")] = float(value)
    return found


def buckets(max_length: int, minimum: int = 16) -> list[int]:
    out, length = [], minimum
    while length < max_length:
        out.append(length)
        length *= 2
    return [*out, max_length]


def run(args, cache: str, phase: str) -> dict:
    port = free_port()
    source = ["--model", args.model] if args.model else ["--preset", args.preset, "--tokenizer", args.tokenizer]
    command = [sys.executable, "-m", "meshlm", "serve", *source, "--port", str(port), "--slots", str(args.slots),
               "--max-length", str(args.max_length), "--compile-cache", cache, "--log-level", "warning",
               "--served-model-name", "bench"]
    log = open(os.path.join(args.logs, f"serve_{phase}.log"), "w")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"meshlm serve exited with {process.returncode}: see {log.name}")
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        result = {"phase": phase, "ready_s": time.perf_counter() - start, "at_ready": counters(client),
                  "requests": []}
        for length in buckets(args.max_length):
            n = min(length - 1, args.max_length - 8)
            before = counters(client)
            begin = time.perf_counter()
            response = client.post("/v1/completions", json={
                "model": "bench", "prompt": [7 + (13 * length + i) % 500 for i in range(n)], "max_tokens": 8,
                "temperature": 0.0, "ignore_eos": True})
            elapsed = time.perf_counter() - begin
            response.raise_for_status()
            after = counters(client)
            result["requests"].append({
                "bucket": length, "prompt_tokens": n, "seconds": elapsed,
                "compiled": after["xla_compilations"] - before["xla_compilations"],
                "compile_seconds": after["xla_compile_seconds"] - before["xla_compile_seconds"],
                "cache_hits": after["compile_cache_hits"] - before["compile_cache_hits"]})
        return result
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a packaged model (default smollm2-135m unless --preset)")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--tokenizer", default="cl100k_base", help="with --preset")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--cache", default=None, help="compilation cache directory (default: a fresh temporary one)")
    parser.add_argument("--logs", default=tempfile.gettempdir(), help="where the servers' logs go")
    parser.add_argument("--out", default="bench_startup.json")
    args = parser.parse_args()
    if not args.preset and not args.model:
        args.model = "smollm2-135m"
    cache = args.cache or tempfile.mkdtemp(prefix="meshlm-bench-cache-")
    try:
        results = [run(args, cache, "cold"), run(args, cache, "warm")]
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"{cpu}, {os.cpu_count()} cores; meshlm serve {args.model or args.preset}, {args.slots} slots, "
          f"max_length {args.max_length}")
    for r in results:
        at = r["at_ready"]
        print(f"\n{r['phase']}: ready in {r['ready_s']:.1f} s ({at['xla_compilations']:.0f} programs compiled in "
              f"{at['xla_compile_seconds']:.1f} s, {at['compile_cache_hits']:.0f} loaded from the cache)")
        print(f"{'bucket':>7} {'prompt':>7} {'first request s':>16} {'compiled':>9} {'compile s':>10} "
              f"{'cache hits':>11}")
        for q in r["requests"]:
            print(f"{q['bucket']:>7} {q['prompt_tokens']:>7} {q['seconds']:>16.2f} {q['compiled']:>9.0f} "
                  f"{q['compile_seconds']:>10.2f} {q['cache_hits']:>11.0f}")
    with open(args.out, "w") as f:
        json.dump({"machine": cpu, "cores": os.cpu_count(), "model": args.model or args.preset,
                   "slots": args.slots, "max_length": args.max_length, "runs": results}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
