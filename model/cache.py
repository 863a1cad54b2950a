"""The KV cache: every layer's keys and values of the tokens seen so far, one row per sequence.

k[i], v[i]: layer i's keys and values, [batch, kv_heads, cache_length, head_dim] -- a tuple of
n_layers arrays rather than one stacked [layers, ...] array, in the layout the attention reads:
- per layer: a decode step reads one layer's cache at a time; a slice of a stacked array is a
  copy of that layer's whole cache on a backend whose dots need a whole buffer (XLA:CPU copies
  it, every layer, every step), while a separate array is read as it is and updated in place;
- kv_heads before cache_length: each (row, kv head) is one contiguous [cache_length, head_dim]
  matrix, so the two attention dots batch over (row, kv head) without transposing the cache
  (with cache_length first, XLA transposes every layer's cache every step).
Both save a copy of every layer's cache at every decode step (measured in docs/BENCHMARKS.md, Inference).

Slot j of a row holds the token at position j of that row, so a row's length is also where its
next token goes, and "key j is visible from query position p" is simply j <= p: slots past a row's
length hold stale values (from padding, or rejected speculative tokens) that no query sees before
they are overwritten. The logical axes put `batch` on data/fsdp and `kv_heads` on tensor, like the
activations.

A cache is held in the run's compute dtype, or as int8 (`--kv-cache int8`): each layer's k and v are then
an `Int8KV`, int8 values of the same shape plus a float32 scale per (row, kv head, position), symmetric over
head_dim. Every array of a cache, the scales too, has the axes (batch, kv_heads, cache_length[, head_dim]),
so code that copies rows or positions (the engine's insert, extract and resize) maps over its leaves.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from model.config import ModelConfig
from model.errors import ModelError
from model.sharding import DEFAULT_RULES, Rules, constrain, named_sharding

CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")  # one layer's k or v; an int8 scale: the first 3
KV_CACHE_FORMATS = ("auto", "int8")  # auto: the run's compute dtype


@flax.struct.dataclass
class Int8KV:
    """One layer's keys (or values) in int8: x ~= values * scale[..., None], scale = max|x| / 127 over head_dim,
    so each dequantised entry is within half a step (scale / 2) of x."""

    values: jax.Array  # int8 [batch, kv_heads, cache_length, head_dim]
    scale: jax.Array  # float32 [batch, kv_heads, cache_length]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array | Int8KV, ...]  # n_layers x [batch, kv_heads, cache_length, head_dim]
    v: tuple[jax.Array | Int8KV, ...]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]


def quantize_kv(x: jax.Array) -> Int8KV:
    """Keys or values [..., head_dim] -> int8 values [..., head_dim] and float32 scales [...] (a zero vector: scale
    0, values 0)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    return Int8KV(jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8), scale)


def dequantize_kv(entry: Int8KV, dtype: Any = jnp.float32) -> jax.Array:
    return (entry.values.astype(jnp.float32) * entry.scale[..., None]).astype(dtype)


def kv_cache_dtype(kv_cache: str, compute_dtype: Any) -> Any:
    """A --kv-cache choice -> the dtype `init_cache` takes: the compute dtype ("auto") or int8."""
    if kv_cache not in KV_CACHE_FORMATS:
        raise ModelError(f"kv_cache: {kv_cache!r} is not a KV-cache format; choose {' or '.join(KV_CACHE_FORMATS)}")
    return jnp.int8 if kv_cache == "int8" else compute_dtype


def cache_shape(config: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
    """One layer's k (or v) shape."""
    return (batch, config.n_kv_heads, length, config.head_dim)


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache (zeros) in `dtype`: the run's compute dtype (`Execution.compute_jnp_dtype`), or int8 (each
    layer's k and v an Int8KV with float32 scales)."""
    shape = cache_shape(config, batch, length)

    def empty() -> jax.Array | Int8KV:
        if jnp.dtype(dtype) == jnp.int8:
            return Int8KV(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:3], jnp.float32))
        return jnp.zeros(shape, dtype)

    layers = range(config.n_layers)
    return KVCache(k=tuple(empty() for _ in layers), v=tuple(empty() for _ in layers))


def cache_bytes(config: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> int:
    """Device bytes of a cache of `batch` rows and `length` positions in `dtype` (int8: values and scales)."""
    dtype = jnp.dtype(dtype)
    entries = math.prod(cache_shape(config, batch, length))
    per_layer = entries * dtype.itemsize
    if dtype == jnp.int8:
        per_layer += entries // config.head_dim * 4  # a float32 scale per (row, kv head, position)
    return 2 * config.n_layers * per_layer


def constrain_cache(cache: Any) -> Any:
    """Pin every array of a cache, or of any tree of its entries (scales too), to its logical axes inside a
    traced function."""
    return jax.tree.map(lambda x: constrain(x, CACHE_AXES[:x.ndim]), cache)


def cache_sharding(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                   dtype: Any = jnp.float32) -> KVCache:
    """The NamedShardings of a cache in `dtype` on `mesh`, from the rules table."""
    values = named_sharding(mesh, CACHE_AXES, rules)
    if jnp.dtype(dtype) == jnp.int8:
        values = Int8KV(values, named_sharding(mesh, CACHE_AXES[:3], rules))
    layers = (values,) * config.n_layers
    return KVCache(k=layers, v=layers)
