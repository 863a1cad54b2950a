"""Training throughput: tokens/s, step time and MFU of `tiny` and `small`, on one device and on 8
simulated devices, and — when torch and transformers are installed — the same shapes trained by
Hugging Face transformers' LlamaForCausalLM (torch, CPU, AdamW) in the same run.

    python scripts/bench_train.py [--presets tiny,small] [--steps 5] [--out bench_train.json]

MFU = 6N + attention FLOPs per token (model.config.flops_per_token) x tokens/s over the float32
matmul peak measured in the same run (on CPU all simulated devices share the machine's cores, so
it is the machine's peak). Step times are the median of `--steps` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"tiny": (32, 128), "small": (32, 256)}  # (batch, seq_len): small at 8,192 tokens per step


def random_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    import numpy as np

    from data.pack import positions_from_segments

    rng = np.random.default_rng(seed)
    rows = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
    segments = np.ones((batch, seq_len), np.int32)
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "segment_ids": segments,
            "positions": positions_from_segments(segments), "weights": np.ones((batch, seq_len), np.float32)}


def median_step(run_step, steps: int) -> float:
    run_step()  # compile / warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_meshlm(name: str, mesh_shape: dict, steps: int) -> dict:
    import jax

    from model import get_preset, make_mesh
    from train.config import OptimSection, ScheduleSection
    from train.step import build_steps

    config = get_preset(name)
    batch_size, seq_len = SHAPES[name]
    size = 1
    for n in mesh_shape.values():
        size *= n
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:size])
    built = build_steps(config, OptimSection(), ScheduleSection(), 1000, mesh, batch_size)
    batch = jax.device_put(random_batch(config.vocab_size, batch_size, seq_len), built.batch_shardings)
    holder = {"state": built.init(0)}

    def run_step():
        holder["state"], metrics = built.train_step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    seconds = median_step(run_step, steps)
    return {"system": "meshlm", "preset": name, "mesh": mesh_shape, "batch": batch_size, "seq_len": seq_len,
            "step_s": seconds, "tokens_per_s": batch_size * seq_len / seconds}


def bench_transformers(name: str, steps: int) -> dict | None:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    from model import get_preset, param_count

    config = get_preset(name)
    batch_size, seq_len = SHAPES[name]
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=config.max_seq_len, attn_implementation="sdpa",
    )).float()
    params = sum(p.numel() for p in model.parameters())
    assert params == param_count(config), (params, param_count(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batch = random_batch(config.vocab_size, batch_size, seq_len)
    ids = torch.from_numpy(batch["tokens"]).long()

    def run_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_step(run_step, steps)
    return {"system": f"transformers {__import__('transformers').__version__} (torch {torch.__version__}, sdpa)",
            "preset": name, "mesh": {"torch threads": torch.get_num_threads()}, "batch": batch_size,
            "seq_len": seq_len, "step_s": seconds, "tokens_per_s": batch_size * seq_len / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--meshes", default="data=1;data=8", help="';'-separated meshes, e.g. 'data=1;fsdp=8'")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", default="bench_train.json")
    args = parser.parse_args()

    import jax

    from model import flops_per_token, get_preset, parse_mesh
    from train.metrics import peak_flops

    peak, peak_source = peak_flops(jax.devices())
    rows = []
    for name in args.presets.split(","):
        for mesh_text in args.meshes.split(";"):
            rows.append(bench_meshlm(name, parse_mesh(mesh_text), args.steps))
        if not args.no_transformers:
            rows.append(bench_transformers(name, args.steps) or {"system": "transformers", "preset": name,
                                                                  "skipped": "torch/transformers not installed"})
    for row in rows:
        if "tokens_per_s" in row:
            config = get_preset(row["preset"])
            row["mfu"] = flops_per_token(config, row["seq_len"]) * row["tokens_per_s"] / peak
    print(f"MFU peak: {peak_source}")
    print(f"{'preset':<7} {'system':<44} {'mesh':<18} {'batch x len':>11} {'step s':>7} {'tokens/s':>9} {'MFU':>6}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['preset']:<7} {r['system']:<44} skipped: {r['skipped']}")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        print(f"{r['preset']:<7} {r['system'][:44]:<44} {mesh:<18} {r['batch']:>4} x {r['seq_len']:<4} "
              f"{r['step_s']:>7.3f} {r['tokens_per_s']:>9,.0f} {r['mfu']:>6.1%}")
    for name in args.presets.split(","):
        ours = max((r for r in rows if r["preset"] == name and r["system"] == "meshlm"),
                   key=lambda r: r["tokens_per_s"])
        theirs = [r for r in rows if r["preset"] == name and "tokens_per_s" in r and r["system"] != "meshlm"]
        if theirs:
            print(f"{name}: meshlm / transformers tokens/s = {ours['tokens_per_s'] / theirs[0]['tokens_per_s']:.2f}x")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "platform": platform.platform(), "jax": jax.__version__,
                   "peak_flops_per_s": peak, "peak_source": peak_source, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
