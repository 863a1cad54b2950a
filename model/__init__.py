"""meshlm.model: the network (a Flax NNX Llama-family transformer), what it is (ModelConfig) apart from how
it runs (Execution), how it is laid out on a device mesh (the one placement: placement.place_params), and its
weights on disk from any source (checkpoint.py, load.py: the one loader that train and infer share).
Imports nothing from train/, infer/ or data/ (README: Architecture).

The names below load on first use, so `model.runtime` (process settings made
before JAX starts) can be imported without importing JAX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "model.config": ("PRESETS", "ConfigError", "Execution", "ModelConfig", "RopeScaling", "flops_per_token",
                     "get_preset", "param_count"),
    "model.load": ("LoadedModel", "convert_to_checkpoint", "load_model"),
    "model.loss": ("cross_entropy",),
    "model.placement": ("abstract_model", "init_model", "init_on_mesh", "place_params", "put_params",
                        "sharded_forward"),
    "model.sharding": ("DEFAULT_RULES", "MESH_AXES", "ShardingError", "activation_sharding", "constrain",
                       "logical_to_spec", "make_mesh", "parse_mesh", "state_shardings"),
    "model.transformer": ("Transformer",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
