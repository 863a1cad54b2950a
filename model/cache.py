"""The KV cache: every layer's keys and values of the tokens seen so far, one row per sequence.

k, v: [layers, batch, cache_length, kv_heads, head_dim]. Slot j of a row holds the token at
position j of that row, so a row's length is also where its next token goes, and "key j is
visible from query position p" is simply j <= p: slots past a row's length hold stale values
(from padding, or rejected speculative tokens) that no query sees before they are overwritten.
The logical axes put `batch` on data/fsdp and `kv_heads` on tensor, like the activations.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from model.config import ModelConfig
from model.sharding import DEFAULT_RULES, Rules, named_sharding

CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # [layers, batch, cache_length, kv_heads, head_dim]
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[2]


def cache_shape(config: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
    return (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    """An empty cache (zeros) in the compute dtype."""
    shape = cache_shape(config, batch, length)
    dtype = dtype or config.compute_jnp_dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def cache_bytes(config: ModelConfig, batch: int, length: int, dtype=None) -> int:
    dtype = jnp.dtype(dtype or config.compute_jnp_dtype)
    return 2 * math.prod(cache_shape(config, batch, length)) * dtype.itemsize


def cache_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> KVCache:
    """The cache's NamedShardings on `mesh`, from the rules table."""
    sharding = named_sharding(mesh, CACHE_AXES, rules)
    return KVCache(k=sharding, v=sharding)
