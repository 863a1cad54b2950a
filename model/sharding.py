"""How tensors are laid out on a device mesh.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, ...) as
metadata, and layers pin their activations with logical names too. One rules
table maps each logical name to mesh axes (`data`, `stage`, `fsdp`, `tensor`).
Shardings for a whole state are derived from its abstract shape, so changing
the parallel layout is a change of mesh shape or rules, never of model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from model.errors import ModelError

# Outermost to innermost: `tensor` last, so it lands on the closest devices.
MESH_AXES = ("data", "stage", "fsdp", "tensor")
# Slices of a multi-slice pod over the slow data-center network (DCN): these axes' sizes multiply the
# in-slice size of their axis, and are laid out outside it. Never tensor: it all-reduces inside every layer.
DCN_AXES = ("dcn_data", "dcn_stage", "dcn_fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: dict[str, MeshAxes] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "cache_length": None,  # KV-cache slots (model/cache.py)
    "act_embed": None,  # the residual stream is replicated across fsdp and tensor
    # parameters (heads, kv_heads, head_dim, mlp, vocab also name activation dimensions)
    "embed": "fsdp",  # ZeRO-3: parameters and optimiser state split over fsdp
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "layers": None,  # on a mesh with a pipeline (stage > 1): "stage", see rules_on
    "stage": "stage",
}


class ShardingError(ModelError):
    """A mesh or rules table that cannot lay out a tensor."""


# ----------------------------------------------------------------------------- mesh


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,fsdp=-1"` -> `{"data": 2, "fsdp": -1}` (for command lines)."""
    shape: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, size = item.partition("=")
        if not sep:
            raise ShardingError(f"mesh entry {item!r} is not AXIS=SIZE (e.g. data=2,fsdp=-1)")
        try:
            shape[name.strip()] = int(size)
        except ValueError:
            raise ShardingError(f"mesh entry {item!r}: size {size!r} is not an integer") from None
    return shape


def _split_dcn(shape: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(in-slice sizes as given, slice counts per axis) of a shape that may name DCN_AXES."""
    if "dcn_tensor" in shape:
        raise ShardingError("there is no dcn_tensor: tensor parallelism all-reduces inside every layer and must stay "
                            "on the fast links inside a slice; put dcn_data or dcn_fsdp on the data-center network")
    unknown = set(shape) - set(MESH_AXES) - set(DCN_AXES)
    if unknown:
        raise ShardingError(f"unknown mesh axis {sorted(unknown)[0]!r}; the mesh axes are {MESH_AXES}, and "
                            f"{DCN_AXES} between slices")
    dcn = {axis: int(shape.get(f"dcn_{axis}", 1)) for axis in MESH_AXES}
    if any(size < 1 for size in dcn.values()):
        raise ShardingError(f"dcn_* sizes are slice counts and must be positive (no -1); got {dict(shape)}")
    return {axis: size for axis, size in shape.items() if axis in MESH_AXES}, dcn


def _resolve(shape: Mapping[str, int], n_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(sizes inside one slice, slice counts) of every axis. Without dcn_* axes the whole mesh is one slice."""
    in_slice, dcn = _split_dcn(shape)
    sizes = {axis: int(in_slice.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    bad = [axis for axis, size in sizes.items() if size < 1 and size != -1]
    if bad or len(free) > 1:
        raise ShardingError(f"mesh sizes must be positive, with at most one -1; got {dict(shape)}")
    slices = math.prod(dcn.values())
    if n_devices % slices:
        raise ShardingError(f"mesh {dict(shape)}: {slices} slices (the dcn_* sizes' product) do not divide the "
                            f"{n_devices} devices")
    per_slice = n_devices // slices
    where = f"{per_slice} devices per slice" if slices > 1 else f"{n_devices} devices"
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if per_slice % fixed:
            raise ShardingError(f"mesh {dict(shape)}: {where} do not divide by the fixed axes' product {fixed}")
        sizes[free[0]] = per_slice // fixed
    elif fixed != per_slice:
        raise ShardingError(
            f"mesh {dict(shape)} needs {fixed * slices} devices but {n_devices} are available"
            + (f" ({slices} slices of {fixed})" if slices > 1 else "") + "; change the sizes or give one axis -1"
        )
    return sizes, dcn


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Every axis's size on `n_devices`: a single -1 becomes whatever the devices leave (in each slice when the
    shape has dcn_* axes), and an axis spread over slices is its size in a slice times its slice count."""
    sizes, dcn = _resolve(shape, n_devices)
    return {axis: sizes[axis] * dcn[axis] for axis in MESH_AXES}


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes `data, stage, fsdp, tensor`.

    Axes left out have size 1; one size may be -1 ("the rest"). `dcn_data`, `dcn_stage` and `dcn_fsdp` spread
    an axis over slices (a multi-slice pod's slices, joined by the data-center network): `{"dcn_data": 2,
    "fsdp": -1}` on 2 slices of 256 chips is `data` 2 between the slices and `fsdp` 256 inside each. The
    devices are grouped into slices by their `slice_index` (TPU), else by process (a process stands in for a
    slice: a GPU host, or a local CPU process), and laid out with jax's hybrid mesh helper. Inside a slice, TPU
    chips follow jax's topology-aware order (`create_device_mesh`), other devices jax's device order.
    """
    grid = device_grid(shape, list(jax.devices() if devices is None else devices))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(shape: Mapping[str, int], devices: Sequence[Any]) -> np.ndarray:
    """make_mesh's array of devices, [data, stage, fsdp, tensor]."""
    sizes, dcn = _resolve(shape, len(devices))
    in_slice = [sizes[axis] for axis in MESH_AXES]
    slices = math.prod(dcn.values())
    if slices == 1:
        grid = np.asarray(devices, dtype=object).reshape(in_slice)
        if devices[0].platform == "tpu":  # the chips' physical torus decides which neighbours an axis links
            try:
                grid = mesh_utils.create_device_mesh(in_slice, devices, allow_split_physical_axes=True)
            except (ValueError, AssertionError, NotImplementedError):  # a subset of a slice: jax's order
                pass
    else:
        slice_ids = {getattr(d, "slice_index", 0) for d in devices}
        processes = {d.process_index for d in devices}
        by_slice = len(slice_ids) == slices  # a multi-slice TPU pod; elsewhere a process stands in for a slice
        if not by_slice and len(processes) != slices:
            raise ShardingError(f"mesh {dict(shape)} spreads over {slices} slices (the product of its dcn_* sizes), "
                                f"but the {len(devices)} devices form {len(slice_ids)} slice(s) and come from "
                                f"{len(processes)} process(es) (a process stands in for a slice where there is one "
                                f"slice); make the dcn_* sizes multiply to the number of slices or processes")
        grid = mesh_utils.create_hybrid_device_mesh(in_slice, [dcn[axis] for axis in MESH_AXES], devices,
                                                    process_is_granule=not by_slice,
                                                    allow_split_physical_axes=True)
    return grid


def default_mesh() -> Mesh:
    """Where a model loaded for decoding goes when no mesh is given: one device; in a multi-process run the
    first device of every process (a `data` axis across them: every process must hold a part of what it
    computes with)."""
    if jax.process_count() == 1:
        return make_mesh({"data": 1}, devices=jax.devices()[:1])
    firsts = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
              for p in range(jax.process_count())]
    return make_mesh({"data": len(firsts)}, devices=firsts)


def make_abstract_mesh(shape: Mapping[str, int], n_devices: int) -> AbstractMesh:
    """A mesh of the given shape with no devices behind it, for planning big layouts."""
    sizes = resolve_mesh_shape(shape, n_devices)
    return AbstractMesh(
        tuple(sizes[axis] for axis in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


# ----------------------------------------------------------------------------- logical -> mesh


def rules_on(mesh: Mesh | AbstractMesh, rules: Rules) -> Rules:
    """The rules as they apply on `mesh`: when its `stage` axis pipelines (size > 1) and the rules leave
    `layers` unmapped, the stacked layers are split over `stage`, each stage holding a contiguous block
    (model/pipeline.py). Without a pipeline `layers` stays unmapped: naming the size-1 stage axis in every
    layer parameter's spec slows XLA:CPU's train step (docs/BENCHMARKS.md, Training)."""
    if rules.get("layers") is None and dict(mesh.shape).get("stage", 1) > 1:
        return {**rules, "layers": "stage"}
    return rules


def logical_to_spec(names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """Logical axis names of one tensor -> its PartitionSpec under `rules`."""
    entries: list[MeshAxes] = []
    used: set[str] = set()
    for name in names:
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no rule; rules cover {sorted(rules)}")
        axes = rules[name]
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if used & set(axes_tuple):
            raise ShardingError(
                f"logical axes {tuple(names)} map mesh axis {sorted(used & set(axes_tuple))[0]!r} "
                "twice; fix the rules table"
            )
        used |= set(axes_tuple)
        entries.append(axes_tuple[0] if len(axes_tuple) == 1 else (axes_tuple or None))
    return PartitionSpec(*entries)


def _axes_size(mesh: Mesh | AbstractMesh, entry: MeshAxes) -> int:
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(mesh.shape[axis] for axis in axes)


def check_divisible(
    what: str, shape: Sequence[int], names: Sequence[str | None], mesh: Mesh | AbstractMesh, rules: Rules
) -> None:
    """Raise a ShardingError naming `what` if a dimension does not split evenly."""
    spec = logical_to_spec(names, rules_on(mesh, rules))
    if len(names) != len(shape):
        raise ShardingError(f"{what}: shape {tuple(shape)} has {len(shape)} dims but logical axes {tuple(names)}")
    for dim, (size, name, entry) in enumerate(zip(shape, names, spec, strict=False)):
        parts = _axes_size(mesh, entry)
        if size % parts:
            raise ShardingError(
                f"{what} with shape {tuple(shape)}: dimension {dim} ({name!r}, size {size}) does not divide "
                f"by mesh axes {entry!r} (together {parts} devices). Pick a mesh whose {entry!r} size "
                f"divides {size}, or map {name!r} elsewhere in the rules."
            )


def _variables_with_paths(state: Any) -> list[tuple[str, nnx.Variable]]:
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), var) for path, var in flat]


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a parameter was created with (replicated if none)."""
    return tuple(variable.get_metadata().get("logical_axes", (None,) * len(variable.shape)))


def state_shardings(abstract_state: Any, mesh: Mesh | AbstractMesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for every variable of a (possibly abstract) state, from its metadata.

    Checks first that every sharded dimension divides by its mesh axes.
    """
    for path, var in _variables_with_paths(abstract_state):
        check_divisible(f"parameter {path!r}", var.shape, logical_axes_of(var), mesh, rules)
    return jax.tree.map(
        lambda var: NamedSharding(mesh, logical_to_spec(logical_axes_of(var), rules_on(mesh, rules))),
        abstract_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def describe_layout(abstract_state: Any, mesh: Mesh | AbstractMesh, rules: Rules = DEFAULT_RULES) -> list[dict]:
    """One row per parameter: path, shape, logical axes, spec and per-device shard shape."""
    rows = []
    for path, var in _variables_with_paths(abstract_state):
        names = logical_axes_of(var)
        check_divisible(f"parameter {path!r}", var.shape, names, mesh, rules)
        spec = logical_to_spec(names, rules_on(mesh, rules))
        shard = tuple(size // _axes_size(mesh, entry) for size, entry in zip(var.shape, spec, strict=True))
        rows.append(
            {"path": path, "shape": tuple(var.shape), "dtype": str(var.dtype), "logical_axes": names,
             "spec": spec, "shard_shape": shard}
        )
    return rows


# ----------------------------------------------------------------------------- activations

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("meshlm_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Make `constrain` pin activations on `mesh` while tracing inside this block."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout by logical names. Without an active mesh there is
    nothing to lay out and `x` is returned as it is."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, rules))


def active_mesh() -> tuple[Mesh | None, Rules]:
    """The mesh and rules of the enclosing `activation_sharding` block; (None, DEFAULT_RULES) outside one."""
    active = _ACTIVE.get()
    return (None, DEFAULT_RULES) if active is None else active


def mesh_axis_size(axis: str) -> int:
    """The size of a mesh axis of the active mesh (`activation_sharding`); 1 without one."""
    active = _ACTIVE.get()
    return 1 if active is None else int(active[0].shape.get(axis, 1))


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules_on(mesh, rules)))
