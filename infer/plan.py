"""Plan serving for a TPU topology on this machine: the decode step every decoder in infer/ runs
(`infer.step.decode_step`: one token for each of `batch` rows over a KV cache of `context` positions), with
the weights and the cache laid out by the rules table on the topology's mesh, compiled by the TPU compiler
(model/tpu.py), then read back: per-chip memory (weights + KV cache) against HBM, the collectives of a step,
and the bandwidth-bound tokens/s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from infer.step import decode_step, step_weights
from model.cache import CACHE_AXES, KVCache, cache_shape
from model.config import Execution, ModelConfig, matmul_param_count
from model.placement import param_layout
from model.sharding import DEFAULT_RULES, activation_sharding, make_mesh, named_sharding
from model.tpu import (
    CompiledCost,
    Roofline,
    Topology,
    collective_table,
    compile_for,
    fits,
    roofline,
    seconds,
    shard_bytes,
    size,
    topology_devices,
)


@dataclasses.dataclass
class DecodePlan:
    config: ModelConfig
    execution: Execution
    topology: Topology
    mesh_shape: dict[str, int]
    batch: int
    context: int
    cost: CompiledCost | None
    weight_bytes: int  # analytic: one chip's weight shards
    cache_bytes: int  # analytic: one chip's KV cache shards
    time: Roofline | None
    compile_seconds: float
    refusal: str | None = None

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second over the whole slice: `batch` tokens every bound step time."""
        return self.batch / self.time.bound_s

    def report(self) -> list[str]:
        chip, c, t = self.topology.chip, self.cost, self.time
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        lines = [
            f"plan: decode {self.config.n_layers}-layer model ({matmul_param_count(self.config) / 1e9:.2f}B matmul "
            f"parameters, {self.config.param_dtype} weights) on {self.topology.name} ({self.topology.chips} chips), "
            f"mesh {mesh}",
            f"  batch {self.batch} rows x {self.context} positions of KV cache ({self.execution.compute_dtype}); "
            f"compiled for the TPU in {self.compile_seconds:.1f} s",
        ]
        if c is None:
            return [*lines, f"  weights {size(self.weight_bytes)} + KV cache {size(self.cache_bytes)} per chip "
                    f"(analytic); does not fit: the TPU compiler stopped: {self.refusal}"]
        ok, verdict = fits(c, chip)
        lines += [
            "per-chip memory (the TPU compiler's):",
            f"  arguments {size(c.argument_bytes):>11}   (analytic: weights {size(self.weight_bytes)}, KV cache "
            f"{size(self.cache_bytes)})",
            f"  temporaries {size(c.temp_bytes):>9}   total {size(c.total_bytes)}   {verdict}",
            "collectives per decode step (per chip):", *("  " + row for row in collective_table(c.collectives)),
            "roofline per decode step (an estimate, not a measurement):",
            f"  HBM {seconds(t.hbm_s)} (weights and KV cache read once)   compute {seconds(t.compute_s)}   ICI "
            + ("n/a" if t.ici_s is None else seconds(t.ici_s)) + f"   DCN {seconds(t.dcn_s)}",
            f"  bound {seconds(t.bound_s)} ({t.limit}-bound): <= {self.tokens_per_s:,.0f} tokens/s for the slice, "
            f"{self.tokens_per_s / self.batch:,.1f} per row",
        ]
        return lines


def plan_decode(config: ModelConfig, execution: Execution, mesh_shape: dict[str, int], topology: Topology,
                batch: int, context: int) -> DecodePlan:
    """Compile one decode step (`batch` rows, one new token each, over `context` cache positions) for
    `topology` and read its costs."""
    mesh = make_mesh(mesh_shape, devices=topology_devices(topology))
    rules = DEFAULT_RULES
    layout = param_layout(config, mesh, rules, execution)
    row = named_sharding(mesh, ("batch", "length"), rules)
    cache_sharding = named_sharding(mesh, CACHE_AXES, rules)
    dtype = execution.compute_jnp_dtype
    shape = cache_shape(config, batch, context)
    one = jax.ShapeDtypeStruct(shape, dtype, sharding=cache_sharding)
    cache = KVCache(k=(one,) * config.n_layers, v=(one,) * config.n_layers)
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=row)
    graphdef = layout.graphdef

    def step(params, tokens, positions, cache):
        with activation_sharding(mesh, rules):
            model = nnx.merge(graphdef, params)
            return decode_step(model, step_weights(model), tokens, positions, cache)

    cache_shardings = KVCache(k=(cache_sharding,) * config.n_layers, v=(cache_sharding,) * config.n_layers)
    jitted = jax.jit(step, in_shardings=(layout.shardings, row, row, cache_shardings),
                     out_shardings=(named_sharding(mesh, ("batch", "length", "vocab"), rules), cache_shardings),
                     donate_argnums=3)
    cost, refusal, seconds_taken = compile_for(jitted.lower(layout.target, tokens, tokens, cache), mesh,
                                               "decode step", topology)
    weights, kv = shard_bytes(layout.target), shard_bytes(cache)
    flops = 2 * matmul_param_count(config) * batch / topology.chips
    return DecodePlan(config=config, execution=execution, topology=topology, mesh_shape=dict(mesh.shape),
                      batch=batch, context=context, cost=cost, weight_bytes=weights, cache_bytes=kv,
                      time=None if cost is None else roofline(flops, weights + kv, cost.collectives, topology.chip),
                      compile_seconds=seconds_taken, refusal=refusal)
