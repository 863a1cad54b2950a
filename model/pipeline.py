"""Pipeline parallelism: the stacked layers split into stages over the `stage` mesh axis.

The parameters keep their layout, [layers, ...]; on a mesh whose `stage` axis is > 1 the rules map
`layers -> stage` (`model.sharding.rules_on`), so stage s holds a contiguous block of layers: a
checkpoint is the same whether a run was pipelined or not, and restores onto any mesh. A run turns
pipelining on with a mesh whose `stage` axis is S > 1 and two numbers of its `Execution`:
M microbatches and V virtual stages per device.

The schedule runs inside the jitted step. The batch is cut into M microbatches; a buffer holds one
microbatch's activations per stage, [stage, microbatch_rows, length, embed], sharded over `stage`.
Each iteration every stage runs its layers on what it holds (all stages at once: a vmap over the
stage dimension, which the partitioner turns into each device running its own stage), then the
buffer rotates by one stage -- a roll along the sharded dimension, which XLA lowers to a
collective-permute. Stage 0 takes in microbatch t at iteration t.

- GPipe (V = 1): stage s holds layers [s L/S, (s+1) L/S); microbatch m is at stage s at iteration
  m + s; M + S - 1 iterations, of which S - 1 leave each stage idle: bubble (S-1) / (M+S-1).
- Circular (V > 1): the layers are V*S chunks, chunk v*S + s on stage s; a microbatch goes round the
  ring V times, re-entering stage 0 M iterations after it first did (so M >= S). V*M + S - 1
  iterations: bubble (S-1) / (V*M + S - 1). The stored [layers] order puts contiguous blocks on each
  stage, so the step regathers the chunks into the circular order (an all-to-all of the layer
  weights each step); storing them in circular order is a possible improvement.

Backward is autodiff through the schedule (a lax.scan over the iterations); remat applies per layer
as without pipelining. Idle stages compute on zeros and their results are never used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from model.errors import ModelError
from model.sharding import constrain


class PipelineError(ModelError):
    """A pipeline that cannot be scheduled: layers that do not split into stages, too few microbatches."""


def check_pipeline(n_layers: int, stages: int, microbatches: int, virtual_stages: int,
                   batch: int | None = None) -> None:
    if stages <= 1:
        return
    if virtual_stages < 1:
        raise PipelineError(f"pipeline.virtual_stages must be >= 1, got {virtual_stages}")
    if n_layers % (stages * virtual_stages):
        raise PipelineError(
            f"n_layers = {n_layers} does not split into {stages} stages x {virtual_stages} virtual stages "
            f"({stages * virtual_stages} chunks); pick mesh.stage and pipeline.virtual_stages whose product "
            f"divides {n_layers}")
    if microbatches < stages:
        raise PipelineError(
            f"pipeline.microbatches = {microbatches} is fewer than the {stages} stages: every stage would "
            f"idle; use at least {stages} (more shrink the bubble, (S-1)/(V*M+S-1))")
    if batch is not None and batch % microbatches:
        raise PipelineError(f"a batch of {batch} rows does not split into pipeline.microbatches = {microbatches}")


def bubble_fraction(stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """The share of stage-iterations that idle: (S-1) / (V*M + S - 1); 0 without pipelining."""
    if stages <= 1:
        return 0.0
    return (stages - 1) / (virtual_stages * microbatches + stages - 1)


def _to_microbatches(x: jax.Array, m: int) -> jax.Array:
    """[batch, ...] -> [m, batch/m, ...], row b in microbatch b % m: each microbatch keeps rows from
    every `batch` shard, so it is split over the data axes like the batch itself."""
    return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def _from_microbatches(x: jax.Array) -> jax.Array:
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def pipelined(stage_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array], stacked: Any,
              x: jax.Array, positions: jax.Array, mask: jax.Array, stages: int, microbatches: int,
              virtual_stages: int = 1) -> jax.Array:
    """Run the stacked layers as a pipeline.

    stage_fn(params, x, positions, mask) -> x: a chunk of layers (params with a leading layer axis)
    on one microbatch, x [rows, length, act_embed]. stacked: every layer's parameters, [layers, ...].
    x [batch, length, act_embed], positions [batch, length], mask [batch, length, length].
    """
    s, m, v = stages, microbatches, virtual_stages
    check_pipeline(jax.tree.leaves(stacked)[0].shape[0], s, m, v, x.shape[0])
    # [layers, ...] -> [S, V, layers per chunk, ...]: chunk v*S + s (layers in stored order) on stage s
    chunks = jax.tree.map(lambda p: p.reshape(v, s, p.shape[0] // (v * s), *p.shape[1:]).swapaxes(0, 1), stacked)
    chunks = jax.tree.map(lambda p: constrain(p, ("stage", *(None,) * (p.ndim - 1))), chunks)
    xs = _to_microbatches(x, m)  # [M, rows, length, act_embed]
    pos, masks = _to_microbatches(positions, m), _to_microbatches(mask, m)
    buffer_axes = ("stage", "batch", "length", "act_embed")
    state = constrain(jnp.zeros((s, *xs.shape[1:]), xs.dtype), buffer_axes)
    done = jnp.zeros_like(xs)  # the last stage's outputs, by microbatch (inputs to the next round)
    stage_index = jnp.arange(s)

    def run_stages(params, state, pos, mask, repeat):
        # each stage: its chunk for this round (V > 1) applied to what it holds
        chunk = jax.tree.map(lambda p: p[repeat] if v > 1 else p[0], params)
        return stage_fn(chunk, state, pos, mask)

    def iteration(carry, t):
        state, done = carry
        first = t % m
        fresh = jnp.where(t < m, xs[first], done[first])  # round 0 takes the input, later rounds their own output
        state = constrain(state.at[0].set(fresh), buffer_axes)
        k = t - stage_index  # [S]: how many microbatch-rounds each stage is into the schedule
        valid = (k >= 0) & (k < v * m)
        k = jnp.clip(k, 0, v * m - 1)
        micro, repeat = k % m, k // m
        out = jax.vmap(run_stages, spmd_axis_name="stage")(chunks, state, pos[micro], masks[micro], repeat)
        out = constrain(out, buffer_axes)
        last = out[s - 1]
        done = jnp.where(valid[s - 1], done.at[micro[s - 1]].set(last), done)
        state = jnp.roll(out, 1, axis=0)  # stage s's output to stage s+1: a collective-permute
        return (state, done), None

    (_, done), _ = jax.lax.scan(iteration, (state, done), jnp.arange(v * m + s - 1))
    return _from_microbatches(done)
