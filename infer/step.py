"""The decode step, and what every decoder in infer/ shares.

    decode_step(model, weights, tokens, positions, cache)   one step for a batch of rows over a KV cache
    prefill(model, tokens, starts, lengths, cache, chunk, weights)   whole prompts into a cache, in chunks
    StepWeights / step_weights(model)                        each layer's weights and the LM head, made once
    OnMesh                                                   a model on an optional mesh: placement, context

`decode_step` feeds each row's new tokens at their positions, writes their keys and values into the cache and
returns the logits there; `infer.sampling.draw` then picks the next tokens. The decode loop (decode.py), the
serving engine's generate (engine.py), and both the draft's steps and the target's verification of a
speculative round (speculative.py) are this one function. A per-row feature of a step (a token mask, a
quantised weight) enters here or in `draw`, once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from infer.sampling import InferenceError, RowSampling
from model.cache import KVCache, cache_sharding, constrain_cache, init_cache, kv_cache_dtype
from model.config import ModelConfig
from model.placement import place_params, put_params
from model.sharding import Rules, activation_sharding, default_mesh, named_sharding


@flax.struct.dataclass
class StepWeights:
    """What a decode step reads besides the embedding and norms, split out of the stacked parameters once:
    slicing stacked weights inside a step would copy every layer's weights at every step."""

    layers: list  # n_layers x one layer's parameters
    head: jax.Array  # [embed, vocab] in the compute dtype


def step_weights(model: Any) -> StepWeights:
    return StepWeights(model.layer_params(), model.head())


def decode_step(model: Any, weights: StepWeights, tokens: jax.Array, positions: jax.Array, cache: KVCache,
                visible: int | None = None) -> tuple[jax.Array, KVCache]:
    """One step for a batch of rows over a KV cache.

    tokens, positions [batch, new]: row b's new tokens and their positions (consecutive; their keys and values
    go to those cache slots). visible: attend over the cache's first `visible` slots only (a batch of short
    rows need not read a long cache). -> (logits [batch, new, vocab] float32, the updated cache)."""
    hidden, cache = model.with_cache(tokens, positions, cache, layer_params=weights.layers, visible=visible)
    return model.logits(hidden, weights.head), cache


def prefill(model: Any, tokens: jax.Array, starts: jax.Array, lengths: jax.Array, cache: KVCache, chunk: int,
            weights: StepWeights | None = None) -> tuple[jax.Array, KVCache]:
    """Write new tokens into a cache, `chunk` at a time; each row's last new token's logits.

    tokens [batch, new] (right-padded): row b's tokens go to slots starts[b] .. starts[b] + lengths[b] - 1
    (slots before starts[b] already hold that row's earlier tokens). Only the last token's hidden state goes
    through the LM head. weights: `step_weights(model)`, made once (default: from the model's parameters).
    -> (logits [batch, vocab], cache)."""
    batch, total = tokens.shape
    last = None
    for start in range(0, total, chunk):  # chunked prefill: a static loop over chunks
        size = min(chunk, total - start)
        positions = starts[:, None] + start + jnp.arange(size, dtype=jnp.int32)[None, :]
        hidden, cache = model.with_cache(tokens[:, start:start + size], positions, cache,
                                         layer_params=weights.layers if weights is not None else None)
        index = lengths - 1 - start
        here = (index >= 0) & (index < size)
        picked = jnp.take_along_axis(hidden, jnp.clip(index, 0, size - 1)[:, None, None], axis=1)[:, 0]
        last = picked if last is None else jnp.where(here[:, None], picked, last)
    return model.logits(last[:, None], weights.head if weights is not None else None)[:, 0], cache


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    return 1 << max(0, math.ceil(math.log2(max(n, minimum))))


class OnMesh:
    """A model's parameters on one device or laid out on a mesh by a rules table (as `weights`, what the steps
    read, and `outer`, the embedding and norms), and what every decoder (Decoder, Engine, SpeculativeDecoder)
    needs around that: batch shards, host arrays placed like the
    batch, the activation-sharding context, new caches, and which token ids may be drawn.

    kv_cache: "auto" (keys and values in the model's compute dtype) or "int8" (model/cache.py's Int8KV)."""

    def __init__(self, config: ModelConfig, graphdef: Any, params: Any, mesh: Mesh | None, rules: Rules,
                 allowed: np.ndarray | None, kv_cache: str = "auto"):
        kv_cache_dtype(kv_cache, None)  # a bad name fails before the parameters are placed
        if mesh is None and jax.process_count() > 1:  # one process of several: each holds a part
            mesh = default_mesh()
        self.config, self.graphdef, self.mesh, self.rules = config, graphdef, mesh, rules
        placed = place_params(params, config, mesh, rules)
        self.execution = self.model(placed).execution  # how the model runs (kept in its graph): compute dtype
        self.kv_cache = kv_cache
        self.cache_dtype = kv_cache_dtype(kv_cache, self.execution.compute_jnp_dtype)  # checks the name
        # each layer's weights as their own arrays and the LM head, made once (see StepWeights); the stacked
        # arrays are dropped, so the weights are held once: `weights` and the rest (`outer`)
        self.weights, self.outer = self.split(placed)
        self.allowed = None if allowed is None else self.put(_allowed_mask(allowed, config.vocab_size), ("vocab",))

    @property
    def params(self):
        raise InferenceError(f"a {type(self).__name__} does not keep the stacked parameters a full forward pass "
                             "needs (it holds each layer's weights separately, in .weights, and the rest in "
                             ".outer); build the model from the parameters you gave it instead")

    def split(self, placed: Any) -> tuple[StepWeights, Any]:
        """(StepWeights, the parameters with the stacked layers replaced by empty placeholders): the weights are
        held once, and the steps and prefills read `StepWeights`. A quantised model's tied head is quantised
        here, once, not in every compiled call."""
        # each layer's arrays laid out as the stacked ones are, less the `layers` dimension
        specs = [P(*a.sharding.spec[1:]) if isinstance(a.sharding, NamedSharding) else None
                 for a in jax.tree.leaves(placed["layers"])]

        def make(p: Any) -> StepWeights:
            weights = step_weights(self.model(p))
            if self.mesh is None:
                return weights
            layers = [jax.tree.unflatten(jax.tree.structure(layer), [
                a if s is None else jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, s))
                for a, s in zip(jax.tree.leaves(layer), specs, strict=True)]) for layer in weights.layers]
            return weights.replace(layers=layers)

        with self.context():
            weights = jax.jit(make)(placed)

        def placeholder(x: jax.Array) -> jax.Array:
            empty = np.zeros((0,), x.dtype)
            return jax.device_put(empty) if self.mesh is None else jax.device_put(empty, named_sharding(self.mesh, ()))

        return weights, dict(placed, layers=jax.tree.map(placeholder, placed["layers"]))

    @property
    def batch_shards(self) -> int:
        """Devices the batch is split over (data x fsdp); 1 without a mesh."""
        if self.mesh is None:
            return 1
        return math.prod(self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape)

    def model(self, params: Any) -> Any:
        """The model with these parameters (inside a compiled function)."""
        return nnx.merge(self.graphdef, params)

    def context(self):
        """Activation-sharding constraints for code traced inside it (nothing without a mesh)."""
        return activation_sharding(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def put(self, x: np.ndarray | jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """A host array (the same on every process) on the device(s), laid out by the logical `axes` on the
        mesh; in a multi-process run each process places only its own shards."""
        if self.mesh is None:
            return jnp.asarray(x)
        return put_params(np.asarray(x), named_sharding(self.mesh, axes, self.rules))

    def sampling(self, params: list, batch: int) -> RowSampling:
        """The rows' sampling options (padding rows greedy), laid out like the batch."""
        return RowSampling.build(*(self.put(a, ("batch",)) for a in RowSampling.host_arrays(params, batch)))

    def fetch(self, tree: Any) -> Any:
        """Device arrays as host numpy arrays, every row of them: in a multi-process run each process gathers
        the rows the others hold."""
        if self.mesh is None or jax.process_count() == 1:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)

    def new_cache(self, batch: int, length: int, inside: bool = False) -> KVCache:
        """A zero cache of `length` positions for `batch` rows, laid out like the batch. inside: built inside
        a function being traced (constrained there) rather than by its own compiled call."""
        if inside:
            return constrain_cache(init_cache(self.config, batch, length, self.cache_dtype))
        make = jax.jit(lambda: init_cache(self.config, batch, length, self.cache_dtype),
                       out_shardings=None if self.mesh is None else self.cache_sharding())
        return make()

    def cache_sharding(self) -> KVCache:
        return cache_sharding(self.config, self.mesh, self.rules, self.cache_dtype)


def _allowed_mask(allowed: np.ndarray, vocab_size: int) -> np.ndarray:
    """A bool [vocab_size] mask from a bool mask of any length (ids past its end are not allowed)."""
    allowed = np.asarray(allowed, bool)
    mask = np.zeros(vocab_size, bool)
    mask[:min(len(allowed), vocab_size)] = allowed[:vocab_size]
    if not mask.any():
        raise ValueError("allowed: no token id of the model's vocabulary may be drawn")
    return mask
