"""Plan a training run for a TPU topology on this machine: the train step `meshlm train` would run (same
build_steps, same shardings), lowered and compiled by the TPU compiler for the topology (model/tpu.py), then
read back: per-chip memory against HBM, the collectives per step, and a roofline step time.

    plan = plan_train(config, parse_topology("v5p-128"), seq_len=4096)
    print("\\n".join(plan.report()))
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from model.config import flops_per_token, matmul_param_count
from model.sharding import make_mesh
from model.tpu import (
    GIB,
    CompiledCost,
    Roofline,
    Topology,
    collective_table,
    compile_for,
    fits,
    parse_topology,
    roofline,
    seconds,
    shard_bytes,
    size,
)
from model.tpu import topology_devices as _devices
from train.config import TrainConfig, load_config
from train.step import BATCH_KEYS, build_steps

BATCH_DTYPES = {"weights": jnp.float32}  # the rest int32 (data.loader.batch_from_rows)


@dataclasses.dataclass
class TrainPlan:
    config: TrainConfig
    topology: Topology
    mesh_shape: dict[str, int]
    seq_len: int
    cost: CompiledCost | None  # None: the compiler stopped because the step does not fit (`refusal` says why)
    state_bytes: int  # analytic: parameter + optimiser-state shards per chip (what `meshlm plan` computes)
    batch_bytes: int  # analytic: the batch's shards per chip
    padded_bytes: int  # the most state and batch can take once tiled (model.tpu.padded_bytes_bound)
    flops: float  # model FLOPs per chip per step (6N + attention, as the training MFU counts them)
    executed_flops: float  # with remat's recomputed forward
    hbm_bytes: float  # a lower bound of HBM traffic per chip per step
    time: Roofline | None
    compile_seconds: float
    refusal: str | None = None  # the compiler's out-of-memory message

    @property
    def fits(self) -> bool:
        return self.cost is not None and fits(self.cost, self.topology.chip)[0]

    @property
    def mfu(self) -> float:
        """The MFU the roofline bound implies: model FLOPs over what the chip could do in that time."""
        return self.flops / (self.time.bound_s * self.topology.chip.peak_flops)

    @property
    def tokens_per_s_per_chip(self) -> float:
        return self.config.train.batch_size * self.seq_len / self.time.bound_s / self.topology.chips

    def hint(self) -> str:
        """What would free memory, when the plan does not fit."""
        c, mesh = self.cost, self.mesh_shape
        state = self.state_bytes if c is None else c.argument_bytes
        parts = []
        if c is None or c.argument_bytes > c.temp_bytes:
            parts.append(f"shard parameters and optimiser state wider (mesh.fsdp, now {mesh['fsdp']}; they take "
                         f"{state / GIB:.1f} GiB per chip)")
        if self.config.execution.remat != "full":
            temps = "" if c is None else f" (temporaries take {c.temp_bytes / GIB:.1f} GiB per chip)"
            parts.append(f"execution.remat=full{temps}")
        parts.append(f"more train.microbatches (now {self.config.train.microbatches}: activations scale with the "
                     "microbatch)")
        return "to free memory: " + "; ".join(parts) + "; or a larger topology"

    def report(self) -> list[str]:
        chip, c, t = self.topology.chip, self.cost, self.time
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        lines = [
            f"plan: train {self.config.model.n_layers}-layer model ({matmul_param_count(self.config.model) / 1e9:.2f}B "
            f"matmul parameters) on {self.topology.name} ({self.topology.chips} chips), mesh {mesh}",
            f"  batch {self.config.train.batch_size} x {self.seq_len} tokens, {self.config.train.microbatches} "
            f"microbatch(es), compute {self.config.execution.compute_dtype}, remat {self.config.execution.remat}; "
            f"compiled for the TPU in {self.compile_seconds:.1f} s",
        ]
        if c is None:
            return [*lines, "per-chip memory:",
                    f"  parameter + AdamW shards {size(self.state_bytes)} (analytic), batch {size(self.batch_bytes)}",
                    f"  does not fit: the TPU compiler stopped: {self.refusal}", "  " + self.hint()]
        ok, verdict = fits(c, chip)
        analytic = self.state_bytes + self.batch_bytes
        lines += [
            "per-chip memory (the TPU compiler's):",
            f"  arguments {size(c.argument_bytes):>11}   (analytic: parameter + AdamW shards {size(self.state_bytes)}, "
            f"batch {size(self.batch_bytes)}; the compiler's {size(c.argument_bytes - analytic)} more is tile "
            f"padding, at most {size(self.padded_bytes - analytic)})",
            f"  temporaries {size(c.temp_bytes):>9}   output {size(c.output_bytes)} ({size(c.alias_bytes)} reuses "
            f"donated inputs)   code {size(c.code_bytes)}",
            f"  total {size(c.total_bytes):>15}   {verdict}",
        ]
        if not ok:
            lines.append("  " + self.hint())
        lines += ["collectives per step (per chip):", *("  " + row for row in collective_table(c.collectives))]
        ici = "n/a (unpublished ICI bandwidth)" if t.ici_s is None else seconds(t.ici_s)
        lines += [
            "roofline step time (an estimate, not a measurement):",
            f"  compute {seconds(t.compute_s)} ({self.executed_flops / 1e12:.3g} TFLOP per chip at "
            f"{chip.peak_flops / 1e12:.0f} TFLOP/s)   HBM {seconds(t.hbm_s)} (>= {size(self.hbm_bytes)} at "
            f"{chip.hbm_bandwidth / 1e9:.0f} GB/s)   ICI {ici}   DCN {seconds(t.dcn_s)}",
            f"  bound {seconds(t.bound_s)} ({t.limit}-bound): MFU <= {self.mfu:.1%}, "
            f"<= {self.tokens_per_s_per_chip:,.0f} tokens/s per chip",
        ]
        if c.compiler_seconds and c.compiler_seconds > 0:  # (it overflows to negative on big programs)
            lines.append(f"  the compiler's own estimate: {seconds(c.compiler_seconds)} (it counts each loop body "
                         "once)")
        return lines


def plan_mesh_shape(config: TrainConfig, topology: Topology) -> dict[str, int]:
    """The run's mesh shape, with the slices on DCN: `--slices N` and no dcn_* axis given -> dcn_data=N."""
    shape = config.mesh.shape()
    if topology.slices > 1 and not any(k.startswith("dcn_") for k in shape):
        shape["dcn_data"] = topology.slices
    return shape


def plan_train(config: TrainConfig, topology: Topology, seq_len: int) -> TrainPlan:
    """Compile `config`'s train step for `topology` and read its costs. A layout that does not divide is a
    PlanError naming the parameter (from the same checks `meshlm train` makes)."""
    mesh = make_mesh(plan_mesh_shape(config, topology), devices=_devices(topology))
    batch_size, execution = config.train.batch_size, config.model_execution
    steps = build_steps(config.model, config.optim, config.schedule, config.train.steps, mesh, batch_size,
                        config.train.microbatches, execution=execution)
    batch = {key: jax.ShapeDtypeStruct((batch_size, seq_len), BATCH_DTYPES.get(key, jnp.int32),
                                       sharding=steps.batch_shardings[key]) for key in BATCH_KEYS}
    cost, refusal, compile_s = compile_for(steps.train_step.lower(steps.abstract_state, batch), mesh, "train step",
                                           topology)
    chips = topology.chips
    tokens = batch_size * seq_len
    flops = flops_per_token(config.model, seq_len) * tokens / chips
    executed = flops * (4 / 3 if config.execution.remat == "full" else 1.0)
    state_bytes = shard_bytes(steps.abstract_state)
    # HBM lower bound: the state is read and written once, the gradients written and read once, and every
    # microbatch reads the weights it computes with (its tensor and stage shards, gathered over fsdp) in the
    # compute dtype in the forward and the backward pass (once more with full remat); activations not counted
    params = steps.abstract_state.params
    param_elements = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    shard_elements = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) for leaf in jax.tree.leaves(params))
    compute_bytes = jnp.dtype(config.execution.compute_dtype).itemsize
    passes = 3 if config.execution.remat == "full" else 2
    gathered = param_elements / (mesh.shape["tensor"] * mesh.shape["stage"]) * compute_bytes
    hbm = 2 * state_bytes + 2 * 4 * shard_elements + config.train.microbatches * passes * gathered
    return TrainPlan(config=config, topology=topology, mesh_shape=dict(mesh.shape), seq_len=seq_len, cost=cost,
                     state_bytes=state_bytes, batch_bytes=shard_bytes(batch),
                     padded_bytes=shard_bytes(steps.abstract_state, padded=True) + shard_bytes(batch, padded=True),
                     flops=flops, executed_flops=executed,
                     hbm_bytes=hbm, compile_seconds=compile_s, refusal=refusal,
                     time=None if cost is None else roofline(executed, hbm, cost.collectives, topology.chip))


# ----------------------------------------------------------------------------- searching layouts


def summary(plan: TrainPlan) -> dict:
    """A plan's numbers as plain data (one row of a search)."""
    c, t = plan.cost, plan.time
    row = {"mesh": plan.mesh_shape, "remat": plan.config.execution.remat,
           "microbatches": plan.config.train.microbatches, "fits": plan.fits,
           "state_bytes": plan.state_bytes, "compile_seconds": plan.compile_seconds}
    if c is None:
        return {**row, "error": f"does not fit: {plan.refusal}"}
    return {**row, "total_bytes": c.total_bytes, "argument_bytes": c.argument_bytes, "temp_bytes": c.temp_bytes,
            "ici_bytes": sum(x.bytes * x.count for x in c.collectives if not x.dcn),
            "dcn_bytes": sum(x.bytes * x.count for x in c.collectives if x.dcn),
            "bound_s": t.bound_s, "limit": t.limit, "mfu": plan.mfu,
            "tokens_per_s_per_chip": plan.tokens_per_s_per_chip}


def candidates(config: TrainConfig, topology: Topology, microbatches: tuple[int, ...] = ()) -> list[list[str]]:
    """The layouts `--search` tries, as overrides of the run's config: tensor 1, 2, 4, 8 (dividing a slice's
    chips) with fsdp over the rest of the slice; with several slices, the slices on DCN as data and as fsdp;
    each with the run's remat policy and with full remat, and each of `microbatches` (default: the run's)."""
    per_slice = topology.chips // topology.slices
    remats = dict.fromkeys([config.execution.remat, "full"])
    dcn = [("dcn_data", topology.slices)] + ([("dcn_fsdp", topology.slices)] if topology.slices > 1 else [])
    out = []
    for tensor in (1, 2, 4, 8):
        if tensor > per_slice or per_slice % tensor:
            continue
        for axis, slices in dcn:
            sizes = {"data": 1, "stage": 1, "tensor": tensor, "fsdp": -1, "dcn_data": 1, "dcn_stage": 1,
                     "dcn_fsdp": 1, axis: slices}
            mesh = [f"mesh.{name}={size}" for name, size in sizes.items()]
            for remat in remats:
                for count in microbatches or (config.train.microbatches,):
                    out.append([*mesh, f"execution.remat={remat}", f"train.microbatches={count}"])
    return out


def search(config_path: str, topology_text: str, slices: int, seq_len: int, timeout: float,
           log=print, microbatches: tuple[int, ...] = ()) -> list[dict]:
    """Plan each candidate layout in a process of its own (`meshlm plan --json`), `timeout` seconds each: a
    compile that fails or runs out of time is a row with its error, not the end of the search. Rows that fit
    come first, best estimated MFU first, then fewest collective bytes."""
    import json
    import subprocess
    import sys

    config = load_config(config_path)
    rows = []
    for overrides in candidates(config, parse_topology(topology_text, slices), microbatches):
        command = [sys.executable, "-m", "meshlm", "plan", "--topology", topology_text, "--slices", str(slices),
                   "--config", config_path, "--seq-len", str(seq_len), "--json", *overrides]
        label = " ".join(o.split(".", 1)[1].replace("microbatches", "micro") for o in overrides
                         if not o.endswith("=1") or "tensor" in o or "microbatches" in o)
        log(f"  trying {label} ...")
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"layout": label, "fits": False, "error": f"compile did not finish within {timeout:g} s"})
            continue
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            rows.append({"layout": label, "fits": False, "error": lines[-1] if lines else f"exit {result.returncode}"})
            continue
        rows.append({"layout": label, **json.loads(result.stdout.strip().splitlines()[-1])})
    # best bound first; among equal bounds the one that moves fewer bytes between chips, then the smaller
    return sorted(rows, key=lambda r: (not r.get("fits"), -round(r.get("mfu", 0.0), 4), r.get("ici_bytes", 0.0)
                                       + r.get("dcn_bytes", 0.0), r.get("total_bytes", 0)))


def search_table(rows: list[dict]) -> list[str]:
    lines = [f"{'layout':<34}{'memory/chip':>12}{'ICI/step':>11}{'DCN/step':>11}{'bound':>11}{'MFU':>7}  verdict"]
    for r in rows:
        if "bound_s" in r:
            verdict = "fits" if r["fits"] else "does not fit"
            lines.append(f"{r['layout']:<34}{size(r['total_bytes']):>12}{size(r['ici_bytes']):>11}"
                         f"{size(r['dcn_bytes']):>11}{seconds(r['bound_s']):>11}{r['mfu']:>7.1%}  {verdict}")
        else:
            lines.append(f"{r['layout']:<34}{'':>52}  {r['error'][:150]}")
    return lines
