"""meshlm.model: the network (a Flax NNX Llama-family transformer) and how it is
laid out on a device mesh. Imports nothing from train/, infer/ or data/."""

from model.config import PRESETS, ConfigError, ModelConfig, RopeScaling, flops_per_token, get_preset, param_count
from model.loss import cross_entropy
from model.placement import abstract_model, init_model, init_on_mesh, place_on_mesh, sharded_forward
from model.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    ShardingError,
    activation_sharding,
    constrain,
    logical_to_spec,
    make_mesh,
    parse_mesh,
    state_shardings,
)
from model.transformer import Transformer

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "PRESETS", "ConfigError", "ModelConfig", "RopeScaling", "ShardingError",
    "Transformer", "abstract_model", "activation_sharding", "constrain", "cross_entropy", "flops_per_token",
    "get_preset", "init_model", "init_on_mesh", "logical_to_spec", "make_mesh", "param_count", "parse_mesh",
    "place_on_mesh", "sharded_forward", "state_shardings",
]
