"""Training throughput: step time, tokens/s and MFU of `tiny` and `small`, on one device and on 8
simulated devices, and the same shapes trained by Hugging Face transformers' LlamaForCausalLM
(torch, CPU, AdamW) in the same run when torch and transformers are installed.

    python scripts/bench_train.py [--presets tiny,small] [--steps 5] [--batch B] [--seq-len L]
        [--meshes 'data=1;data=8'] [--no-multi] [--no-transformers] [--attn sdpa|eager]
        [--no-cpu-tuning] [--out bench_train.json]

Shapes (batch x seq_len) default to 32 x 128 for tiny and 32 x 256 for small (8,192 tokens per
step). Every system of a preset is warmed up (compilation excluded), then timed round-robin, one
step each per round, so a noisy machine slows them alike. Step times are the median of `--steps`
rounds (the best is reported too); tokens/s and MFU come from the median. MFU = 6N + attention
FLOPs per token (model.config.flops_per_token) x tokens/s over the float32 matmul peak measured in
the same run; on CPU all simulated devices share the machine's cores, so it is the machine's peak
(the larger of a 2048^3 jnp.dot and the same work split over 8 devices, before and after).

Like `meshlm train`, it runs with model/runtime.py's process settings: tcmalloc preloaded when
installed (the script re-executes itself once) and the XLA:CPU flags checked for this jaxlib;
`--no-cpu-tuning` measures glibc malloc and XLA's defaults instead. torch runs in the same process,
so both systems get the same allocator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.runtime import preload_allocator, set_xla_flags  # noqa: E402  (imports no JAX)

if "--no-cpu-tuning" not in sys.argv:
    preload_allocator()  # re-executes with tcmalloc once, when installed (meshlm's CLI does the same)
set_xla_flags(cpu_devices=8, cpu_tuning="--no-cpu-tuning" not in sys.argv)

SHAPES = {"tiny": (32, 128), "small": (32, 256)}  # (batch, seq_len)
TARGET_MFU, TARGET_RATIO, TARGET_TOKENS = 0.5, 1.2, 8192  # the targets for `small`


@dataclasses.dataclass
class Runner:
    """One system training one preset: `step()` runs one optimiser step and waits for it."""

    system: str
    mesh: str
    step: Callable[[], float]  # returns the loss
    info: dict


def random_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Random token rows, one document per row: tokens, targets, positions, segment_ids, weights."""
    import numpy as np

    from data.pack import positions_from_segments

    rng = np.random.default_rng(seed)
    rows = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    segments = np.ones((batch, seq_len), np.int32)
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": segments,
            "positions": positions_from_segments(segments), "weights": np.ones((batch, seq_len), np.float32)}


def meshlm_runner(config, mesh_shape: dict[str, int], batch_size: int, seq_len: int, execution=None) -> Runner:
    """train/step.py's jitted step (AdamW + clipping, float32) on the first prod(mesh) devices, run with
    `execution` (the preset's: model.config.preset_execution)."""
    import math

    import jax

    from model import make_mesh
    from train.config import OptimSection, ScheduleSection
    from train.step import build_steps

    mesh = make_mesh(mesh_shape, devices=jax.devices()[:math.prod(mesh_shape.values())])
    steps = build_steps(config, OptimSection(), ScheduleSection(), 1000, mesh, batch_size, execution=execution)
    batch = jax.device_put(random_batch(config.vocab_size, batch_size, seq_len), steps.batch_shardings)
    holder = {"state": steps.init(0)}

    def step() -> float:
        holder["state"], metrics = steps.train_step(holder["state"], batch)
        return float(metrics["loss"])  # waits for the step

    mesh_text = ",".join(f"{axis}={size}" for axis, size in mesh_shape.items())
    return Runner("meshlm", mesh_text, step, {"devices": mesh.devices.size})


def transformers_runner(config, batch_size: int, seq_len: int, attn: str) -> Runner | str:
    """LlamaForCausalLM of the same shapes (float32, torch.optim.AdamW, clipping), or why it is skipped."""
    from hf_llama import llama_for_causal_lm

    from model import param_count

    loaded = llama_for_causal_lm(config, attn_implementation=attn)
    if isinstance(loaded, str):
        return loaded
    torch, transformers, model = loaded
    params = sum(p.numel() for p in model.parameters())
    if params != param_count(config):
        raise AssertionError(f"transformers model has {params:,} parameters, meshlm's {param_count(config):,}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.from_numpy(random_batch(config.vocab_size, batch_size, seq_len)["tokens"]).long()

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss  # the same seq_len positions computed; labels shifted inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    info = {"transformers": transformers.__version__, "torch": torch.__version__, "attn_implementation": attn,
            "params": params}
    return Runner(f"transformers LlamaForCausalLM ({attn})", f"{torch.get_num_threads()} torch threads", step, info)


def time_round_robin(runners: list[Runner], steps: int, warmup: int) -> list[dict]:
    """Warm each runner up, then `steps` rounds of one timed step each; per runner its times and losses."""
    first_losses = [[runner.step() for _ in range(warmup)][0] for runner in runners]
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(steps):
        for runner, runner_times in zip(runners, times, strict=True):
            start = time.perf_counter()
            runner.step()
            runner_times.append(time.perf_counter() - start)
    return [{"first_loss": loss, "step_times_s": t, "step_s": statistics.median(t), "best_step_s": min(t)}
            for loss, t in zip(first_losses, times, strict=True)]


def bench_preset(name: str, args: argparse.Namespace) -> list[dict]:
    from model import flops_per_token, get_preset, parse_mesh
    from model.config import preset_execution

    config, execution = get_preset(name), preset_execution(name)
    batch_size, seq_len = SHAPES.get(name, (32, 256))
    batch_size, seq_len = args.batch or batch_size, min(args.seq_len or seq_len, config.max_seq_len)
    meshes = [m for m in args.meshes.split(";") if m.strip()]
    if args.no_multi:
        meshes = meshes[:1]
    runners: list[Runner | str] = [meshlm_runner(config, parse_mesh(m), batch_size, seq_len, execution)
                                   for m in meshes]
    if not args.no_transformers:
        runners.append(transformers_runner(config, batch_size, seq_len, args.attn))
    live = [r for r in runners if isinstance(r, Runner)]
    timings = iter(time_round_robin(live, args.steps, args.warmup))
    rows = []
    for runner in runners:
        row = {"preset": name, "batch": batch_size, "seq_len": seq_len, "tokens_per_step": batch_size * seq_len,
               "flops_per_token": flops_per_token(config, seq_len)}
        if isinstance(runner, str):
            rows.append({**row, "system": "transformers", "skipped": runner})
            continue
        row.update(system=runner.system, mesh=runner.mesh, **runner.info, **next(timings))
        row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
        rows.append(row)
    return rows


def machine_peak() -> float:
    import jax

    from train.metrics import peak_flops

    return peak_flops(jax.devices())[0]


def print_table(rows: list[dict]) -> None:
    print(f"{'preset':<7} {'system':<38} {'mesh':<16} {'devices':>7} {'batch x len':>11} {'step s':>7} {'best s':>7} "
          f"{'tokens/s':>9} {'MFU':>6} {'loss@1':>7}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['preset']:<7} {r['system']:<38} skipped: {r['skipped']}")
            continue
        devices = f"{r['devices']} sim." if r.get("devices", 1) > 1 else str(r.get("devices", "-"))
        print(f"{r['preset']:<7} {r['system']:<38} {r['mesh']:<16} {devices:>7} {r['batch']:>4} x {r['seq_len']:<4} "
              f"{r['step_s']:>7.3f} {r['best_step_s']:>7.3f} {r['tokens_per_s']:>9,.0f} {r['mfu']:>6.1%} "
              f"{r['first_loss']:>7.3f}")


def summarise(rows: list[dict]) -> list[str]:
    """meshlm / transformers tokens/s per preset, and the issue's targets where they apply."""
    lines = []
    for name in dict.fromkeys(r["preset"] for r in rows):
        ours = [r for r in rows if r["preset"] == name and r["system"] == "meshlm"]
        theirs = [r for r in rows if r["preset"] == name and r["system"] != "meshlm" and "tokens_per_s" in r]
        best = max(ours, key=lambda r: r["tokens_per_s"])
        if theirs:
            ratio = best["tokens_per_s"] / theirs[0]["tokens_per_s"]
            best["ratio_to_transformers"] = ratio
            lines.append(f"{name}: meshlm ({best['mesh']}) / transformers tokens/s = {ratio:.2f}x")
        if name == "small" and best["tokens_per_step"] >= TARGET_TOKENS:
            lines.append(f"target, small MFU >= {TARGET_MFU:.0%}: {best['mfu']:.1%} "
                         f"({'met' if best['mfu'] >= TARGET_MFU else 'NOT met'})")
            if theirs:
                lines.append(f"target, small >= {TARGET_RATIO}x transformers: {best['ratio_to_transformers']:.2f}x "
                             f"({'met' if best['ratio_to_transformers'] >= TARGET_RATIO else 'NOT met'})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (rounds) per system")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    parser.add_argument("--batch", type=int, default=0, help="rows per step (default: per preset)")
    parser.add_argument("--seq-len", type=int, default=0, help="tokens per row (default: per preset)")
    parser.add_argument("--meshes", default="data=1;data=8", help="';'-separated meshes, the first on one device")
    parser.add_argument("--no-multi", action="store_true", help="only the first mesh (skip the 8-device runs)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention")
    parser.add_argument("--no-cpu-tuning", action="store_true",
                        help="glibc malloc and XLA's default CPU flags (model/runtime.py), for comparison")
    parser.add_argument("--out", default="bench_train.json")
    args = parser.parse_args()

    import jax

    peak_before = machine_peak()
    rows = [row for name in args.presets.split(",") for row in bench_preset(name, args)]
    peak_after = machine_peak()
    peak = max(peak_before, peak_after)  # a busy moment should not make the peak look low and MFU high
    for row in rows:
        if "tokens_per_s" in row:
            row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / peak
    malloc = os.environ.get("LD_PRELOAD") or "system (glibc)"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}; "
          f"float32 matmul peak (best of start and end): {peak / 1e9:.1f} GFLOP/s\nallocator: {malloc}; "
          f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '').strip()}")
    print(f"step s: median of {args.steps} round-robin steps after {args.warmup} warm-up; tokens/s and MFU from it")
    print_table(rows)
    summary = summarise(rows)
    print("\n".join(summary))
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "platform": platform.platform(), "cores": os.cpu_count(),
                   "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "").strip(), "allocator": malloc,
                   "peak_flops_per_s": peak,
                   "peak_flops_per_s_before_after": [peak_before, peak_after], "summary": summary, "results": rows},
                  f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
