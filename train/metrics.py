"""Training metrics: the peak FLOP/s that MFU divides by, a JSONL log, and the loss plot.

MFU = model FLOPs/s (6N + attention per token, `model.config.flops_per_token`)
over the peak of the devices in use: a table of bf16 peaks per chip for TPUs
and GPUs, and on CPU a float32 matmul peak measured on this machine at start-up
(all simulated CPU devices share the same cores, so it is the machine's peak).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 FLOP/s per chip, from the vendors' spec sheets. Matched against `device.device_kind` in order.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], str, float]] = [
    (("v6 lite", "v6e"), "TPU v6e", 918e12),
    (("v5 lite", "v5e"), "TPU v5e", 197e12),
    (("v5p", "v5"), "TPU v5p", 459e12),
    (("v4",), "TPU v4", 275e12),
    (("h200",), "NVIDIA H200", 989e12),
    (("h100",), "NVIDIA H100", 989e12),
    (("a100",), "NVIDIA A100", 312e12),
]


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed call (compilation, warm-up)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of the fastest of `repeats` size^3 matmuls on the default device."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.dot)
    return 2 * size**3 / best_seconds(lambda: matmul(a, b), repeats)


def measure_sharded_matmul_peak(devices: list[jax.Device], size: int = 1024, repeats: int = 5) -> float:
    """float32 FLOP/s of a matmul split by rows over `devices`, all working at once: on simulated CPU
    devices, which share the machine's cores, one device alone may not reach the machine's peak."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(devices), ("rows",))
    rows = NamedSharding(mesh, PartitionSpec("rows", None))
    a = jax.device_put(jax.random.normal(jax.random.key(0), (len(devices) * size, size), jnp.float32), rows)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), jnp.float32),
                       NamedSharding(mesh, PartitionSpec()))
    matmul = jax.jit(jnp.dot, out_shardings=rows)
    return 2 * len(devices) * size**3 / best_seconds(lambda: matmul(a, b), repeats)


def peak_flops(devices: list[jax.Device]) -> tuple[float, str]:
    """(peak FLOP/s of all `devices` together, where the number comes from)."""
    device = devices[0]
    if device.platform == "cpu":
        peak = measure_matmul_peak()
        if len(devices) > 1:
            peak = max(peak, measure_sharded_matmul_peak(devices))
        return peak, f"CPU float32 matmul peak measured at start-up: {peak / 1e9:.1f} GFLOP/s for the machine"
    kind = device.device_kind.lower()
    for keys, name, per_chip in PEAK_BF16_FLOPS:
        if any(key in kind for key in keys):
            return per_chip * len(devices), f"{name} bf16 peak {per_chip / 1e12:.0f} TFLOP/s x {len(devices)} chips"
    peak = measure_matmul_peak(8192)
    return peak * len(devices), (f"unknown device {device.device_kind!r}: float32 matmul peak measured at start-up, "
                                 f"{peak / 1e12:.1f} TFLOP/s x {len(devices)}")


class MetricsLog:
    """Appends one JSON object per line to `path` (flushed, so a crash loses nothing written). `enabled=False`
    (a process other than 0 of a multi-process run) writes nothing."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self._file = None
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._file = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics file; a step logged twice (a run resumed after a crash) keeps its last record."""
    by_key: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_key[(record.get("kind", "train"), record.get("step"))] = record
    return sorted(by_key.values(), key=lambda r: (r.get("step", 0), r.get("kind", "train")))


def plot_losses(metrics_path: str, out_path: str) -> str:
    """A PNG of training loss (and validation loss, when logged) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
