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
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from model.config import ModelConfig
from model.sharding import DEFAULT_RULES, Rules, named_sharding

CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")  # one layer's k or v


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # n_layers x [batch, kv_heads, cache_length, head_dim]
    v: tuple[jax.Array, ...]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]


def cache_shape(config: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
    """One layer's k (or v) shape."""
    return (batch, config.n_kv_heads, length, config.head_dim)


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache (zeros) in `dtype`: the run's compute dtype (`Execution.compute_jnp_dtype`)."""
    shape = cache_shape(config, batch, length)
    layers = range(config.n_layers)
    return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in layers), v=tuple(jnp.zeros(shape, dtype) for _ in layers))


def cache_bytes(config: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> int:
    dtype = jnp.dtype(dtype)
    return 2 * config.n_layers * math.prod(cache_shape(config, batch, length)) * dtype.itemsize


def cache_sharding(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> KVCache:
    """The cache's NamedShardings on `mesh`, from the rules table."""
    layers = (named_sharding(mesh, CACHE_AXES, rules),) * config.n_layers
    return KVCache(k=layers, v=layers)
