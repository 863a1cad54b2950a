"""The CPU kernel for decode attention over a KV cache: model/attention.cc, built by `pip install` into the same
library as the quantised matmul (model/qkernel.py) and called from jitted code as an XLA custom call (jax.ffi).

Why a kernel: in a decode step XLA:CPU runs attention's two small batched dots (a few query heads against each
row's [cache_length, head_dim] keys, then values) at 3-10 GB/s with the softmax as separate passes, and reads
every slot of the cache whether a row has filled it or not; at batch 8 over a 256-slot cache that was a third
of SmolLM2's step (docs/BENCHMARKS.md). The kernel reads each row's keys and values once, only up to the
longest position its queries see.

It is used where it applies: on CPU (`jax.lax.platform_dependent`; GPU and TPU keep the pure-JAX
`model.transformer.cached_attention`, the reference the tests hold it to), float32 queries, a float32 or int8
cache, head_dim a multiple of 16 and at most MAX_QUERIES queries per (row, kv head) -- decode and verification
steps; a long prefill chunk is a matrix product XLA does well. `MESHLM_QKERNEL=off` turns it off with the
matmul kernel. On a mesh it runs under shard_map, each device over its rows and kv heads of the cache.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from model import qkernel
from model.cache import CACHE_AXES, Int8KV
from model.sharding import active_mesh, logical_to_spec, rules_on

MAX_QUERIES = 64  # new positions x query heads per kv head (decode: the group; verification: (k + 1) x group)


def applies(q: jax.Array, k: jax.Array | Int8KV) -> bool:
    """Whether the kernel takes this attention: float32 q [batch, length, heads, head_dim], a float32 or int8
    cache, head_dim a multiple of 16, a decode-sized number of queries, and the library present."""
    values = k.values if isinstance(k, Int8KV) else k
    batch, length, heads, head_dim = q.shape
    kv_heads = values.shape[1]
    return (q.dtype == jnp.float32 and values.dtype in (jnp.float32, jnp.int8) and head_dim % 16 == 0
            and heads % kv_heads == 0 and length * heads // kv_heads <= MAX_QUERIES
            and qkernel.build() is not None)


def attention(q: jax.Array, k: jax.Array | Int8KV, v: jax.Array | Int8KV, positions: jax.Array,
              visible: int) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v over the cache by the kernel (CPU only): q [batch, length, heads,
    head_dim] float32; k, v one layer's whole cache [batch, kv_heads, cache_length, head_dim] (float32 or
    Int8KV); positions [batch, length]: query t of row b sees the keys s <= positions[b, t] with s < visible.
    -> [batch, length, heads, head_dim] float32."""
    if qkernel.build() is None:  # loads and registers the library
        raise RuntimeError("the CPU kernels are not installed or are turned off (MESHLM_QKERNEL)")
    if isinstance(k, Int8KV):
        k_values, v_values, k_scale, v_scale = k.values, v.values, k.scale, v.scale
    else:
        k_values, v_values = k, v
        k_scale = v_scale = jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call(qkernel.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_values, v_values, k_scale, v_scale, positions.astype(jnp.int32),
                scale=np.float32(q.shape[-1] ** -0.5), visible=np.int64(visible))


def cached_attention(q: jax.Array, k: jax.Array | Int8KV, v: jax.Array | Int8KV, positions: jax.Array,
                     visible: int, reference: Any) -> jax.Array:
    """The kernel on CPU, `reference()` (the pure-JAX attention over the same cache) elsewhere; on the active
    mesh, if any, under shard_map: each device attends over its rows and kv heads (the cache's layout by the
    rules table), with the query heads split like the kv heads."""
    def cpu(q, k, v, positions):
        return _on_mesh(q, k, v, positions, visible, reference)

    return jax.lax.platform_dependent(q, k, v, positions, cpu=cpu, default=lambda *_: reference())


def _on_mesh(q: jax.Array, k: Any, v: Any, positions: jax.Array, visible: int, reference: Any) -> jax.Array:
    mesh, rules = active_mesh()
    if mesh is None or mesh.size == 1:
        return attention(q, k, v, positions, visible)
    if dict(mesh.shape).get("stage", 1) > 1:  # inside the pipeline's own shard_map: no nesting
        return reference()
    rules = rules_on(mesh, rules)
    spec = logical_to_spec(CACHE_AXES, rules)
    size = lambda entry: 1 if entry is None else math.prod(  # noqa: E731
        mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry))
    batch, heads = spec[0], spec[1]
    values = k.values if isinstance(k, Int8KV) else k
    if q.shape[0] % size(batch):
        batch = None
    if values.shape[1] % size(heads):
        heads = None
    cache_spec = P(batch, heads, None, None)
    kv_spec = Int8KV(cache_spec, P(batch, heads, None)) if isinstance(k, Int8KV) else cache_spec
    q_spec = P(batch, None, heads, None)

    def local(q, k, v, positions):
        return attention(q, k, v, positions, visible)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)), out_specs=q_spec,
                         check_vma=False)(q, k, v, positions)
