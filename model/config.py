"""Model configuration: what a model is (`ModelConfig`, the architecture), how a run executes it
(`Execution`), named presets, and the two numbers every run plans with — parameter count and FLOPs
per token.

A checkpoint stores the ModelConfig and must match it in full; the Execution is a setting of each run
(train config, command-line flags) and is never stored with the parameters. Both are checked when
they are built, so a bad size fails here with the fields and values named, not later as a shape
error inside a jitted function.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax.numpy as jnp

from model.errors import ModelError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "save_dots")


class ConfigError(ModelError):
    """A configuration value that cannot describe a working model."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency scaling of rotary embeddings (long context)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder-only transformer: what its parameters are.

    init_std, the scale fresh parameters are drawn with, is kept here because it describes the parameters
    a new model starts from; a checkpoint compares it like every other field."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None  # None: d_model // n_heads
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # from YAML / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"ModelConfig: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                    "when head_dim is not given; set head_dim explicitly or change one of them"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(
                f"ModelConfig.head_dim must be a positive even integer (rotary embeddings rotate pairs), "
                f"got {self.head_dim!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ModelConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) "
                "for grouped-query attention"
            )
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.param_dtype not in DTYPES:
            raise ConfigError(f"ModelConfig.param_dtype must be one of {sorted(DTYPES)}, got {self.param_dtype!r}")

    @property
    def param_jnp_dtype(self):
        return DTYPES[self.param_dtype]

    @staticmethod
    def from_dict(values: dict[str, Any]) -> ModelConfig:
        """The architecture stored as a plain dict (a checkpoint's layout, a config file); rope_scaling may be
        a dict. Execution fields that older checkpoints stored (`EXECUTION_FIELDS`) are dropped: how a model
        runs is not part of what it is. Any other unknown key is a ConfigError naming it."""
        if not isinstance(values, dict):
            raise ConfigError(f"a model config must be a mapping of field names to values, got {values!r}")
        known = _field_names()
        for name in values:
            if name not in known and name not in EXECUTION_FIELDS:
                raise ConfigError(unknown_message("ModelConfig field", name, known))
        return ModelConfig(**{name: value for name, value in values.items() if name in known})

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again); unknown fields are an error."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(unknown_message("ModelConfig field", sorted(unknown)[0], _field_names()))
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a run executes a model, apart from what the model is: the same parameters run with any of these.

    compute_dtype: the matmuls' dtype (parameters stay in ModelConfig.param_dtype; norms, softmax and logits
    are float32). remat: what the backward pass recomputes per layer. scan_unroll: layers per iteration of the
    layer scan (n_layers unrolls it fully). pipeline_*: the schedule on a mesh whose `stage` axis S is > 1.
    """

    compute_dtype: str = "float32"
    remat: str = "none"  # one of REMAT_POLICIES
    scan_unroll: int = 1
    pipeline_microbatches: int = 1  # microbatches per step (>= S)
    pipeline_virtual_stages: int = 1  # layer chunks per stage: > 1 is the circular schedule

    def __post_init__(self):
        if isinstance(self.remat, str):  # "save-dots" and "save_dots" both name the policy
            object.__setattr__(self, "remat", self.remat.replace("-", "_"))
        if self.compute_dtype not in DTYPES:
            raise ConfigError(
                f"Execution.compute_dtype must be one of {sorted(DTYPES)}, got {self.compute_dtype!r}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"Execution.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        for name in ("scan_unroll", "pipeline_microbatches", "pipeline_virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Execution.{name} must be a positive integer, got {value!r}")

    @property
    def compute_jnp_dtype(self):
        return DTYPES[self.compute_dtype]

    def replace(self, **changes: Any) -> Execution:
        """A copy with some fields changed (validated again); unknown fields are an error."""
        valid = [f.name for f in dataclasses.fields(self)]
        for name in changes:
            if name not in valid:
                raise ConfigError(unknown_message("Execution field", name, valid))
        return dataclasses.replace(self, **changes)


# How a model is executed, not what it is: checkpoints written before the split stored these with the architecture.
EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(Execution))


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def unknown_message(kind: str, name: str, valid: list[str], where: str = "") -> str:
    """"unknown <kind> <where>'x'; did you mean 'y'? (valid: ...)": the one wording, for model and train
    configs, of a name that does not exist."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(m) for m in close)}?" if close else ""
    return f"unknown {kind} {where}{name!r}{hint} (valid: {', '.join(valid)})"


PRESETS: dict[str, ModelConfig] = {
    # Seconds to compile; every size divides 8 devices on the axes it is sharded over.
    "tiny": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=128
    ),
    # The CPU demo: about 6.8M parameters (its execution: PRESET_EXECUTION).
    "small": ModelConfig(
        vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=768,
        tie_embeddings=True, max_seq_len=512,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536,
        rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192,
    ),
    "llama3.2-1b": ModelConfig(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, d_ff=8192,
        rope_theta=500_000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True,
        max_seq_len=131072,
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336,
        rope_theta=500_000.0, max_seq_len=8192,
    ),
    "llama3-70b": ModelConfig(
        vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, d_ff=28672,
        rope_theta=500_000.0, max_seq_len=8192,
    ),
}


# How a run executes a preset unless it says otherwise (others: Execution()). The demo's six layers run
# unrolled: on XLA:CPU a loop slices the stacked weights per layer (docs/BENCHMARKS.md, training); deep
# models keep scan_unroll=1, whose compile time does not grow with the layers.
PRESET_EXECUTION: dict[str, Execution] = {"small": Execution(scan_unroll=6)}


def preset_execution(name: str) -> Execution:
    """The execution a run of preset `name` starts from (train config, `meshlm demo`)."""
    if name not in PRESETS:
        raise ConfigError(unknown_message("model preset", name, list(PRESETS)))
    return PRESET_EXECUTION.get(name, Execution())


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, optionally with some fields changed."""
    if name not in PRESETS:
        raise ConfigError(unknown_message("model preset", name, list(PRESETS)))
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config


def param_count(config: ModelConfig) -> int:
    """Number of parameters, counted from the shapes the model creates."""
    d, h, kv, hd = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    attention = d * h * hd + 2 * d * kv * hd + h * hd * d  # q, k, v, o
    mlp = 3 * d * config.d_ff  # gate, up, down
    norms = 2 * d
    per_layer = attention + mlp + norms
    embed = config.vocab_size * d
    head = 0 if config.tie_embeddings else d * config.vocab_size
    return config.n_layers * per_layer + embed + head + d  # + final norm


def matmul_param_count(config: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but norms and the
    embedding lookup (a tied table counts once, as the LM head)."""
    lookup_only = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    norms = (2 * config.n_layers + 1) * config.d_model
    return param_count(config) - lookup_only - norms


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the convention used for MFU:
    6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len.

    The second term is attention's two matmuls (scores and weighted values) at
    2 FLOPs per multiply-add, times 3 for forward + backward, counted over the
    whole sequence as in PaLM / nanoGPT (causal masking is not subtracted).
    A forward pass alone is a third of this.
    """
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6 * matmul_param_count(config) + attention
