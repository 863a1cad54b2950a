"""A model placed on a mesh: parameters created directly in their shards, and a
jitted forward pass whose input and output shardings come from the rules.

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = init_on_mesh(get_preset("tiny"), mesh)
    forward = sharded_forward(model, mesh)
    logits = forward(nnx.state(model), tokens)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from model.config import Execution, ModelConfig
from model.quant import ARRAYS, QuantError, QuantizedWeight, abstract_weight
from model.quant import logical_axes as quant_axes
from model.sharding import DEFAULT_RULES, Rules, activation_sharding, check_divisible, named_sharding, state_shardings
from model.transformer import Transformer


def new_model(config: ModelConfig, seed: int, execution: Execution | None = None) -> Transformer:
    return Transformer(config, execution, rngs=nnx.Rngs(params=seed))


def abstract_model(config: ModelConfig, seed: int = 0, execution: Execution | None = None) -> Transformer:
    """The model's structure, shapes and metadata, with no memory allocated. `execution` (default
    Execution()) is how the model runs: it is part of the graphdef, not of the parameters."""
    return nnx.eval_shape(lambda: new_model(config, seed, execution))


def init_model(config: ModelConfig, seed: int = 0, execution: Execution | None = None) -> Transformer:
    """A model with freshly initialised parameters on the default device."""
    graphdef, _ = nnx.split(abstract_model(config, seed, execution))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(new_model(config, seed)))())


def init_on_mesh(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES, seed: int = 0,
                 execution: Execution | None = None) -> Transformer:
    """Initialise parameters straight into their shards on `mesh`; no device ever
    holds the whole model. The values equal `init_model(config, seed)`'s bit for bit."""
    graphdef, abstract_state = nnx.split(abstract_model(config, seed, execution))
    shardings = state_shardings(abstract_state, mesh, rules)  # checks divisibility first
    state = jax.jit(lambda: nnx.state(new_model(config, seed)), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """A model's parameters as plain nested dicts (what `nnx.to_pure_dict` gives), laid out on a mesh."""

    graphdef: Any  # merge with a params dict: nnx.merge(graphdef, params)
    abstract: dict  # ShapeDtypeStruct per parameter
    logical_axes: dict  # tuple of logical axis names per parameter
    shardings: dict  # NamedSharding per parameter
    target: dict  # ShapeDtypeStruct carrying its sharding: the target of a restore


def param_layout(config: ModelConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                 execution: Execution | None = None, quantization: dict[str, dict] | None = None) -> ParamLayout:
    """Every parameter's shape, logical axes and sharding on `mesh`, from the abstract model (no memory);
    checks that every sharded dimension divides by its mesh axes. The graphdef runs with `execution`.

    quantization: {path: static fields} of quantised weights (model.quant.as_arrays; a checkpoint's layout):
    each such weight is laid out as the dict of its arrays {values, scale[, offset]} a checkpoint holds, sharded
    by the float weight's logical axes. A record that does not fit the model is a QuantError naming it."""
    graphdef, variables = nnx.split(abstract_model(config, execution=execution))
    shardings = nnx.to_pure_dict(state_shardings(variables, mesh, rules))
    abstract = nnx.to_pure_dict(variables)
    logical_axes = nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["logical_axes"], variables,
                                                 is_leaf=lambda x: isinstance(x, nnx.Variable)))
    for path, fields in (quantization or {}).items():
        _quantized_entry(path, fields, (abstract, logical_axes, shardings), mesh, rules)
    target = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          abstract, shardings)
    return ParamLayout(graphdef, abstract, logical_axes, shardings, target)


def _quantized_entry(path: str, fields: dict, trees: tuple[dict, dict, dict], mesh: Mesh, rules: Rules) -> None:
    """Replace the float weight at `path` in (abstract, logical axes, shardings) by the dicts of its quantised
    arrays."""
    *parents, leaf = path.split("/")
    nodes = []
    for tree in trees:
        for key in parents:
            tree = tree.get(key) if isinstance(tree, dict) else None
        if not isinstance(tree, dict) or leaf not in tree:
            raise QuantError(f"{path} is recorded as quantised, but the model has no such parameter")
        nodes.append(tree)
    abstract, axes, shardings = nodes
    q = abstract_weight(abstract[leaf].shape, fields, path)
    names = quant_axes(q, axes[leaf])
    arrays = {name: getattr(q, name) for name in ARRAYS if getattr(q, name) is not None}
    for name, value in arrays.items():
        check_divisible(f"parameter '{path}/{name}'", value.shape, getattr(names, name), mesh, rules)
    abstract[leaf] = arrays
    axes[leaf] = {name: getattr(names, name) for name in arrays}
    shardings[leaf] = {name: named_sharding(mesh, getattr(names, name), rules) for name in arrays}


def place_params(params: Any, config: ModelConfig, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> dict:
    """The one way parameters are put on devices: a parameter dict (or an nnx.State, e.g. `nnx.split(model)[1]`)
    laid out on `mesh` shard by shard by the rules table (arrays already there are not moved), or without a
    mesh on the default device (host numpy weights are copied once, not at every call)."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if mesh is None:
        return jax.device_put(params)
    layout = param_layout(config, mesh, rules)
    return put_params(params, _shardings_for(params, layout, mesh, rules))


def _shardings_for(params: Any, layout: ParamLayout, mesh: Mesh, rules: Rules) -> Any:
    """The layout's shardings, with a quantised weight's arrays (model/quant.py) laid out by the logical axes
    of the float weight it stands for."""
    def walk(value: Any, sharding: Any, axes: Any) -> Any:
        if isinstance(value, QuantizedWeight):
            names = quant_axes(value, axes)
            return jax.tree.map(lambda n: named_sharding(mesh, n, rules), names, is_leaf=lambda n: isinstance(n, tuple))
        if isinstance(value, dict):
            return {key: walk(value[key], sharding[key], axes[key]) for key in value}
        return sharding

    return walk(params, layout.shardings, layout.logical_axes)


def put_params(params: Any, shardings: Any) -> Any:
    """Parameters onto given shardings (a tree like `params`; ShapeDtypeStructs carrying `sharding=` will do).
    Host (numpy) arrays are cut on the host, so each device, and in a multi-process run each process, receives
    only its own shards; device arrays are resharded."""

    def put(value: Any, target: Any) -> jax.Array:
        sharding = getattr(target, "sharding", target)
        if isinstance(value, jax.Array):
            return jax.device_put(value, sharding)
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, params, shardings)


def sharded_forward(model: Transformer, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Callable[..., jax.Array]:
    """forward(state, tokens, positions=None, segment_ids=None) -> logits, jitted on `mesh`.

    `model` may be abstract: only its structure and metadata are used. Tokens are
    split over the `batch` rule, logits come back laid out as
    [batch, length, vocab]. The model's state is an argument, so one compiled
    function serves any parameter values of the same shapes.
    """
    graphdef, abstract_state = nnx.split(model)
    param_shardings = state_shardings(abstract_state, mesh, rules)
    row_sharding = named_sharding(mesh, ("batch", "length"), rules)

    def forward(state, tokens, positions, segment_ids):
        with activation_sharding(mesh, rules):
            return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

    jitted = jax.jit(
        forward,
        in_shardings=(param_shardings, row_sharding, row_sharding, row_sharding),
        out_shardings=named_sharding(mesh, ("batch", "length", "vocab"), rules),
    )

    def call(state, tokens, positions=None, segment_ids=None):
        check_divisible("input tokens", tokens.shape, ("batch", "length"), mesh, rules)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        return jitted(state, tokens, positions, segment_ids)

    call.jitted = jitted  # for lowering / HLO inspection
    return call
