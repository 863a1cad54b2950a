"""Run configuration: frozen dataclasses, filled from a YAML file and `key=value` overrides.

    model:      {preset: small, n_layers: 8}     # the architecture: a preset plus any ModelConfig field
    execution:  {compute_dtype: bfloat16, remat: full}   # how it runs (model.config.Execution; not checkpointed)
    mesh:       {data: 2, fsdp: -1}
    data:       {store: runs/data/stdlib}
    optim:      {lr: 3.0e-3, weight_decay: 0.1, clip_norm: 1.0}
    schedule:   {kind: cosine, warmup_steps: 50}
    train:      {steps: 500, batch_size: 16, microbatches: 1}
    checkpoint: {every: 100, keep: 3}
    log:        {every: 10, eval_every: 100}
    run_dir:    runs/train/small

An unknown key anywhere is an error that names it and the closest valid keys. The execution section
starts from the preset's (`model.config.preset_execution`: the `small` preset's layers run unrolled);
`model.compute_dtype`, `model.remat` and `model.scan_unroll`, from configs written before the section,
still set it. The pipeline schedule's two numbers are in `pipeline:`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from model.config import (
    EXECUTION_FIELDS,
    ConfigError,
    Execution,
    ModelConfig,
    get_preset,
    preset_execution,
    unknown_message,
)
from model.pipeline import PipelineError, check_pipeline
from train.errors import TrainError


class TrainConfigError(TrainError, ValueError):
    """A run configuration that names something that does not exist or cannot work."""


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Axis sizes (model.sharding.make_mesh). data/stage/fsdp/tensor are sizes inside a slice; dcn_* spread an
    axis over slices joined by the data-center network (multi-slice pods; a process stands in for a slice where
    devices carry no slice index): mesh axis data = dcn_data x data, and so on. There is no dcn_tensor."""

    data: int = 1
    stage: int = 1
    fsdp: int = -1  # by default every device shards parameters and batch (ZeRO-3)
    tensor: int = 1
    dcn_data: int = 1
    dcn_stage: int = 1
    dcn_fsdp: int = 1

    def shape(self) -> dict[str, int]:
        """The sizes for make_mesh: the four axes, and the dcn_* axes that are not 1."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k.startswith("dcn_") and v == 1)}

    @property
    def stages(self) -> int:
        """Pipeline stages: the stage axis's size over all slices."""
        return self.stage * self.dcn_stage


@dataclasses.dataclass(frozen=True)
class ExecutionSection:
    """How the model runs in this run (model.config.Execution, with the pipeline section's numbers)."""

    compute_dtype: str = "float32"  # the matmuls' dtype; parameters and optimiser state stay in param_dtype
    remat: str = "none"  # none | full | save_dots: what the backward pass recomputes per layer
    scan_unroll: int = 1  # layers per iteration of the layer scan (a YAML config starts from the preset's)


@dataclasses.dataclass(frozen=True)
class PipelineSection:
    """Pipeline parallelism when mesh.stage > 1 (model/pipeline.py): Execution.pipeline_microbatches and
    pipeline_virtual_stages."""

    microbatches: int = 1  # M: each step's batch goes through the stages in M parts (>= mesh.stage)
    virtual_stages: int = 1  # V: layer chunks per stage; > 1 is the circular schedule


@dataclasses.dataclass(frozen=True)
class DataSection:
    store: str = "runs/data/stdlib"
    val_fraction: float = 0.01
    prefetch: int = 2


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False  # False: the mask spares norm scales and the embedding table
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off
    z_loss: float = 0.0  # weight of mean(log Z^2), e.g. 1e-4


@dataclasses.dataclass(frozen=True)
class ScheduleSection:
    kind: str = "cosine"  # cosine | linear | constant (each after a linear warmup)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 500
    batch_size: int = 16  # global batch, in rows of seq_len tokens
    microbatches: int = 1  # gradient accumulation: the batch is split into this many parts
    seed: int = 0
    nonfinite: str = "skip"  # skip | stop | rollback: what a non-finite loss or gradient does
    init_from: str | None = None  # a checkpoint (a run, or `meshlm convert` output) whose parameters start
    # a new run: fine-tuning; the optimiser starts fresh. Ignored when the run resumes its own checkpoint.


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 100  # steps between checkpoints (one is always written at the end)
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 10  # steps between metric lines
    eval_every: int = 100  # steps between validation passes (and at the end)
    eval_batches: int = 8
    progress: bool = True
    plot: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=lambda: get_preset("small"))
    execution: ExecutionSection = ExecutionSection()
    mesh: MeshSection = MeshSection()
    pipeline: PipelineSection = PipelineSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    run_dir: str = "runs/train/default"

    def __post_init__(self):
        checks = [
            (self.train.steps > 0, f"train.steps must be positive, got {self.train.steps}"),
            (self.train.batch_size > 0, f"train.batch_size must be positive, got {self.train.batch_size}"),
            (self.train.microbatches > 0 and self.train.batch_size % self.train.microbatches == 0,
             f"train.batch_size ({self.train.batch_size}) must divide into train.microbatches "
             f"({self.train.microbatches})"),
            (self.train.nonfinite in ("skip", "stop", "rollback"),
             f"train.nonfinite must be skip, stop or rollback, got {self.train.nonfinite!r}"),
            (self.schedule.kind in ("cosine", "linear", "constant"),
             f"schedule.kind must be cosine, linear or constant, got {self.schedule.kind!r}"),
            (self.optim.lr > 0, f"optim.lr must be positive, got {self.optim.lr}"),
            (self.checkpoint.every > 0 and self.checkpoint.keep > 0,
             "checkpoint.every and checkpoint.keep must be positive"),
            (self.log.every > 0 and self.log.eval_every > 0, "log.every and log.eval_every must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(message)
        try:
            self.model_execution  # noqa: B018 -- validates the execution settings
        except ConfigError as e:
            raise TrainConfigError(f"execution: {e}") from e
        if self.mesh.stages > 1:
            try:
                check_pipeline(self.model.n_layers, self.mesh.stages, self.pipeline.microbatches,
                               self.pipeline.virtual_stages, self.train.batch_size // self.train.microbatches)
            except PipelineError as e:
                raise TrainConfigError(str(e)) from e

    @property
    def model_execution(self) -> Execution:
        """How the model runs: the execution section plus the pipeline schedule."""
        return Execution(**dataclasses.asdict(self.execution), pipeline_microbatches=self.pipeline.microbatches,
                         pipeline_virtual_stages=self.pipeline.virtual_stages)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for YAML, JSON and checkpoints); `from_dict` inverts it."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building from data


def _unknown(where: str, name: str, valid: list[str]) -> TrainConfigError:
    return TrainConfigError(unknown_message("key", name, valid, where))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """YAML scalars -> the field's type (ints for float fields, numbers for str-typed YAML like 3e-3)."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not isinstance(value, hint if hint is not float else (int, float)):
        raise TrainConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def _section(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise TrainConfigError(f"{where} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown(f"{where}.", key, names)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def _model(values: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """(the architecture, the execution settings: the preset's, then any execution fields of `model:`)."""
    if not isinstance(values, dict):
        raise TrainConfigError(f"model must be a mapping (preset plus fields), got {values!r}")
    values = dict(values)
    preset = values.pop("preset", "small")
    config = get_preset(preset)
    execution = {k: v for k, v in dataclasses.asdict(preset_execution(preset)).items()
                 if k in _section_names(ExecutionSection)}
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in list(values):
        if key in _section_names(ExecutionSection):  # configs written before the execution section
            execution[key] = values.pop(key)
        elif key in EXECUTION_FIELDS:  # the pipeline numbers
            raise TrainConfigError(f"model.{key} is not a model field: the pipeline schedule is "
                                   f"pipeline.{key.removeprefix('pipeline_')}")
        elif key not in fields:
            raise _unknown("model.", key, ["preset", *fields])
    hints = typing.get_type_hints(ModelConfig)
    return config.replace(**{k: _coerce(v, hints[k], f"model.{k}") for k, v in values.items()}), execution


def _section_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


SECTIONS = {"execution": ExecutionSection, "mesh": MeshSection, "pipeline": PipelineSection, "data": DataSection,
            "optim": OptimSection, "schedule": ScheduleSection, "train": TrainSection,
            "checkpoint": CheckpointSection, "log": LogSection}


def from_dict(values: dict[str, Any]) -> TrainConfig:
    valid = ["model", *SECTIONS, "run_dir"]
    for key in values:
        if key not in valid:
            raise _unknown("", key, valid)
    model_values = values.get("model", {})
    model, execution = _model(model_values)
    given = values.get("execution", {})
    if isinstance(given, dict):  # (not a mapping: _section says so)
        twice = sorted(set(given) & set(model_values))
        if twice:
            raise TrainConfigError(f"{twice[0]} is set in both model and execution; set execution.{twice[0]} only")
        values = {**values, "execution": {**execution, **given}}
    kwargs: dict[str, Any] = {name: _section(cls, values[name], name)
                              for name, cls in SECTIONS.items() if name in values}
    kwargs["model"] = model
    if "run_dir" in values:
        kwargs["run_dir"] = str(values["run_dir"])
    return TrainConfig(**kwargs)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings applied onto nested plain data (values parsed as YAML)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TrainConfigError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=1e-3)")
        value = yaml.safe_load(raw) if raw else ""
        parts = key.strip().split(".")
        if len(parts) == 1:
            values[parts[0]] = value
        elif len(parts) == 2:
            section = values.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise TrainConfigError(f"override {item!r}: {parts[0]!r} is not a section")
            section[parts[1]] = value
        else:
            raise TrainConfigError(f"override {item!r}: keys are SECTION.KEY, one level deep")
    return values


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from an optional YAML file plus `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise TrainConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as error:
            raise TrainConfigError(f"config file {path!r} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise TrainConfigError(f"config file {path!r} must hold a mapping of sections")
    return from_dict(apply_overrides(values, overrides or []))
