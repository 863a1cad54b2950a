"""TPU topologies on a CPU host, for planning: the chips' numbers, Cloud TPU names -> jax topologies, and what
a program compiled for one costs per chip.

`jax.experimental.topologies` (with `libtpu` installed: `pip install -e ".[tpu]"`) describes a TPU slice, or
several, without the hardware; a jitted step lowered with shardings on a mesh of those devices compiles with
the real TPU compiler. `analyse` reads the compiled program: the compiler's per-chip memory, and the
collectives of its HLO with their bytes, the mesh axes they run over and how often they run per step (a
collective inside the layer scan runs once per layer). `roofline` turns FLOPs, HBM bytes and collective bytes
into a step-time bound. Numbers from the compiler are facts about the program; the roofline is an estimate.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import defaultdict
from typing import Any

import numpy as np

from model.errors import ModelError

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's numbers, per chip. Sources: the Cloud TPU system architecture pages
    (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e), read 2026-11."""

    name: str  # the Cloud TPU name: v4, v5e, v5p, v6e
    jax_name: str  # what jax's topologies call it
    hbm_bytes: int
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float | None  # bidirectional inter-chip interconnect per chip, bytes/s (None: not published)
    dcn_bandwidth: float  # data-center network per chip, bytes/s
    cores_per_chip: int  # the N of "v5p-N" counts TensorCores: N / cores_per_chip chips
    dims: int  # 3: a 3D torus (v4, v5p); 2: a 2D torus (v5e, v6e)
    devices_per_chip: int = 1  # jax devices per chip in a topology (v4's topologies list each TensorCore)


CHIPS: dict[str, Chip] = {
    # v4: 275 TFLOP/s, 32 GiB at 1200 GB/s; ICI per chip not on the page; DCN: 4 chips per host share 100 Gbps
    "v4": Chip("v4", "v4", 32 * GIB, 275e12, 1200 * GB, None, 25e9 / 8, 2, 3, devices_per_chip=2),
    # v5e: 197 TFLOP/s, 16 GiB at 819 GB/s, ICI 400 GB/s; 8 chips per host with 2 x 100 Gbps NICs
    "v5e": Chip("v5e", "v5e", 16 * GIB, 197e12, 819 * GB, 400 * GB, 200e9 / 8 / 8, 1, 2),
    # v5p: 459 TFLOP/s, 95 GiB at 2765 GB/s, ICI 1200 GB/s, DCN 50 Gbps per chip
    "v5p": Chip("v5p", "v5p", 95 * GIB, 459e12, 2765 * GB, 1200 * GB, 50e9 / 8, 2, 3),
    # v6e: 918 TFLOP/s, 32 GiB at 1638 GB/s, ICI 800 GB/s; DCN taken as v5e's per chip (not on the page)
    "v6e": Chip("v6e", "v6e", 32 * GIB, 918e12, 1638 * GB, 800 * GB, 200e9 / 8 / 8, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "trillium": "v6e"}


class PlanError(ModelError):
    """A topology or plan that cannot be made: an unknown TPU name, libtpu missing, a layout that does not
    divide."""


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]  # chips per torus dimension in one slice
    slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.slices

    @property
    def name(self) -> str:
        text = f"{self.chip.name}:{'x'.join(map(str, self.shape))}"
        return text + (f" x {self.slices} slices" if self.slices > 1 else "")


def _default_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's shape for a slice of `chips` chips: 3D from 2x2x1 (v4, v5p: 8 -> 2x2x2, 16 -> 2x2x4, 32 ->
    2x4x4, 64 -> 4x4x4, ...), 2D from 1x1 (v5e, v6e: 4 -> 2x2, 8 -> 2x4, 16 -> 4x4, ...): double the smallest
    dimension, the last of equals."""
    if chips < 1 or chips & (chips - 1):
        raise PlanError(f"{chips} chips: give a power of two, or the shape itself (e.g. v5p:4x4x8)")
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    if math.prod(shape) > chips:
        raise PlanError(f"{chips} chips: the smallest {dims}D slice has {math.prod(shape)}")
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, size in enumerate(shape) if size == smallest)
        shape[last] *= 2
    return tuple(shape)


def parse_topology(text: str, slices: int = 1) -> Topology:
    """`v5p-128` (Cloud TPU's accelerator type: v4 and v5p count TensorCores, v5e and v6e chips), `v5e-16`,
    `v5litepod-16`, or an explicit shape `v5p:4x4x8` / `v6e:16x16`."""
    text = text.strip().lower()
    if slices < 1:
        raise PlanError(f"--slices must be >= 1, got {slices}")
    match = re.fullmatch(r"([a-z0-9]+?)(?:[-:])(.+)", text)
    if not match:
        raise PlanError(f"topology {text!r}: expected NAME-N (v5p-128, v5e-16) or NAME:AxBxC (v5p:4x4x8)")
    name, rest = ALIASES.get(match.group(1), match.group(1)), match.group(2)
    if name not in CHIPS:
        raise PlanError(f"unknown TPU {match.group(1)!r}; known: {', '.join(CHIPS)} (and v5litepod)")
    chip = CHIPS[name]
    if "x" in rest:
        try:
            shape = tuple(int(size) for size in rest.split("x"))
        except ValueError:
            raise PlanError(f"topology {text!r}: the shape must be sizes joined by x, e.g. 4x4x8") from None
        if len(shape) != chip.dims or min(shape) < 1:
            raise PlanError(f"topology {text!r}: {chip.name} slices have {chip.dims} dimensions")
        return Topology(chip, shape, slices)
    if not rest.isdigit() or int(rest) % chip.cores_per_chip:
        counts = f"TensorCores, a multiple of {chip.cores_per_chip}" if chip.cores_per_chip > 1 else "chips"
        raise PlanError(f"topology {text!r}: {chip.name}-N counts {counts}")
    return Topology(chip, _default_shape(int(rest) // chip.cores_per_chip, chip.dims), slices)


def quiet_libtpu() -> None:
    """On a host without TPU chips, give libtpu the settings it otherwise looks up (and warns about) when it
    loads: nothing is probed, nothing is printed. Set before JAX loads libtpu; a TPU host is left alone."""
    on_tpu = any(os.path.exists(path) for path in ("/dev/accel0", "/dev/vfio/0"))
    if not on_tpu:
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # planning processes side by side (no chips to share)


def topology_devices(topology: Topology) -> list:
    """The jax devices of `topology` (no hardware needed): what make_mesh lays a planned mesh over."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("planning for a TPU topology needs the TPU compiler, libtpu: pip install -e \".[tpu]\" "
                        "(jax[tpu] for the installed jax)")
    from jax.experimental import topologies

    shape = "x".join(map(str, topology.shape))
    kwargs = {"num_slices": topology.slices} if topology.slices > 1 else {}
    try:
        description = topologies.get_topology_desc(f"{topology.chip.jax_name}:{shape}", "tpu", **kwargs)
    except Exception as e:  # libtpu's refusals come as RuntimeError / JaxRuntimeError
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"cannot describe TPU topology {topology.name}: {text}") from None
    return list(description.devices)


# ----------------------------------------------------------------------------- the compiled program


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn|f8e5m2)\[([0-9,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
# between slices the TPU compiler compiles one slice's program and sends what crosses the data-center network to
# the megascale runtime: `send(...)` ops tagged with the collective they are part of
_DCN_SEND = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = \((.*?)\) send\(.*_xla_megascale_transfer_type=\"([A-Z_]+)\"")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_CALLED = re.compile(r"\b(body|condition|to_apply|calls|branch_computations)=\{?%?([\w.\-]+(?:, %[\w.\-]+)*)\}?")


@dataclasses.dataclass
class Collective:
    kind: str
    axes: tuple[str, ...]  # the mesh axes its groups span ("?" when they cannot be told)
    count: int  # executions per step (loop trip counts included)
    bytes: float  # per execution, per chip: the larger of its input and output arrays (sum for all-reduce tuples)
    group: int  # devices per group
    dcn: bool = False  # its groups span slices: it runs over the data-center network

    @property
    def traffic(self) -> float:
        """Bytes one chip sends per execution, by the usual ring algorithms: (n-1)/n of the array for gathers,
        scatters and all-to-all, twice that for all-reduce, the whole array for a permute."""
        n = max(self.group, 1)
        share = (n - 1) / n
        return self.bytes * {"all-reduce": 2 * share, "collective-permute": 1.0}.get(self.kind, share)


def _array_bytes(type_text: str) -> list[float]:
    return [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
            for dtype, dims in _ARRAY.findall(type_text)]


def _groups(line: str) -> np.ndarray | None:
    """The replica groups of an HLO collective as [groups, size] partition ids, or None. Three spellings: the
    compiler's mesh (`mesh['axis_0'=4,'axis_1'=2] {'axis_0'}`: ids in row-major order over those axes, a group
    per combination of the others), iota (`[2,4]<=[8]` or `[2,4]<=[4,2]T(1,0)`) and explicit lists."""
    match = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
    if match:
        axes = re.findall(r"'([^']+)'=(\d+)", match.group(1))
        names, dims = [name for name, _ in axes], [int(size) for _, size in axes]
        chosen = [names.index(name) for name in re.findall(r"'([^']+)'", match.group(2)) if name in names]
        ids = np.arange(math.prod(dims)).reshape(dims)
        rest = [i for i in range(len(dims)) if i not in chosen]
        return ids.transpose(rest + chosen).reshape(-1, math.prod(dims[i] for i in chosen) if chosen else 1)
    match = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
    if match:
        groups = [int(x) for x in match.group(1).split(",")]
        dims = [int(x) for x in match.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if match.group(3):
            ids = ids.transpose([int(x) for x in match.group(3).split(",")])
        return ids.reshape(groups[0], -1) if len(groups) >= 1 else None
    match = re.search(r"replica_groups=\{(\{[0-9,{} ]*\})\}", line)
    if match:
        rows = [[int(x) for x in row.split(",") if x.strip()] for row in re.findall(r"\{([0-9, ]*)\}", match.group(1))]
        if rows and all(len(row) == len(rows[0]) for row in rows) and rows[0]:
            return np.asarray(rows)
    match = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    if match:
        return np.asarray([[int(x) for x in pair.split(",")] for pair in re.findall(r"\{([0-9]+,[0-9]+)", line)])
    return None


def _axes(groups: np.ndarray | None, mesh_shape: dict[str, int],
          slice_ids: np.ndarray) -> tuple[tuple[str, ...], int, bool]:
    """The mesh axes along which the members of each group differ, the group size, and whether a group spans
    slices. Partition i is the mesh's i-th device in row-major order."""
    if groups is None or groups.size == 0:
        return ("?",), 0, False
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    if groups.max() >= math.prod(sizes):
        return ("?",), groups.shape[1], False
    coords = np.stack(np.unravel_index(groups, sizes), axis=-1)  # [groups, size, axes]
    varying = [names[i] for i in range(len(names)) if (coords[:, :, i] != coords[:, :1, i]).any()]
    spans = bool((slice_ids[groups] != slice_ids[groups][:, :1]).any())
    return tuple(varying) or ("-",), groups.shape[1], spans


def collectives(hlo: str, mesh: Any) -> list[Collective]:
    """Every collective of an optimised HLO module compiled for `mesh`, counted per step: an op inside a while
    loop counts once per trip (the trip count read from the loop condition's `i < N`; 1 when it cannot be
    read)."""
    mesh_shape = dict(mesh.shape)
    slice_ids = np.asarray([getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat])
    slices = len(set(slice_ids.tolist()))
    grid = slice_ids.reshape(list(mesh_shape.values()))
    across = tuple(name for i, name in enumerate(mesh_shape) if (np.diff(grid, axis=i) != 0).any())
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and line.rstrip().endswith("{"):
                current = match.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    computations["__entry__"] = [current]
        elif line.startswith("}"):
            current = None
        else:
            computations[current].append(line)
    entry = computations.pop("__entry__", [None])[0]
    multiplier: dict[str, float] = defaultdict(float)

    def trips(condition: str) -> int:
        body = "\n".join(computations.get(condition, []))
        constants = dict(re.findall(r"%([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)", body))
        compare = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", body)
        return int(constants[compare.group(1)]) if compare and compare.group(1) in constants else 1

    def visit(name: str, times: float, depth: int = 0) -> None:
        if name not in computations or depth > 64:
            return
        multiplier[name] += times
        for line in computations[name]:
            called = dict((kind, targets) for kind, targets in _CALLED.findall(line))
            if "body" in called:
                visit(called["body"].lstrip("%"), times * trips(called.get("condition", "").lstrip("%")), depth + 1)
            for kind in ("calls", "branch_computations"):  # (reducers, `to_apply`, hold no collectives)
                for target in called.get(kind, "").split(","):
                    if target.strip():
                        visit(target.strip().lstrip("%"), times, depth + 1)

    if entry is not None:
        visit(entry, 1.0)
    found: dict[tuple, Collective] = {}
    for name, lines in computations.items():
        times = multiplier.get(name, 0.0)
        if not times:
            continue
        # the TPU compiler writes a reduce-scatter as a fusion `all-reduce-scatter` around an all-reduce of the
        # whole input (its result is the shard)
        scatter = name.startswith("all-reduce-scatter")
        for line in lines:
            match = _OP.match(line)
            dcn_send = None if match else _DCN_SEND.match(line)
            if dcn_send:  # a slice's part of a collective between slices
                sizes = _array_bytes(dcn_send.group(1))
                kind, size = dcn_send.group(2).lower().replace("_", "-"), sizes[0] if sizes else 0
                axes, group, dcn = across or ("?",), slices, True
            elif match and _array_bytes(match.group(1)):
                kind, sizes = match.group(2), _array_bytes(match.group(1))
                if scatter and kind == "all-reduce":
                    kind = "reduce-scatter"
                size = sum(sizes) if kind == "all-reduce" and not match.group(3) else max(sizes)
                axes, group, dcn = _axes(_groups(line), mesh_shape, slice_ids)
            else:
                continue
            key = (kind, axes, group, size, dcn)
            if key in found:
                found[key].count += int(times)
            else:
                found[key] = Collective(kind, axes, int(times), size, group, dcn)
    order = {kind: i for i, kind in enumerate(COLLECTIVES)}
    return sorted(found.values(), key=lambda c: (order.get(c.kind, len(order)), c.dcn, c.axes, -c.bytes))


@dataclasses.dataclass
class CompiledCost:
    """What one compiled step costs per chip, from the TPU compiler."""

    argument_bytes: int  # inputs: parameter, optimiser-state and batch shards (or weights and KV cache)
    output_bytes: int
    alias_bytes: int  # outputs that reuse their input's buffer (donated state)
    temp_bytes: int  # the compiler's scratch: activations, gathered weights, gradients
    code_bytes: int
    compiler_flops: float | None  # the compiler's own count (a loop body counted once)
    compiler_seconds: float | None  # the compiler's own time estimate ("optimal_seconds"), when it gives one
    collectives: list[Collective]

    @property
    def total_bytes(self) -> int:
        """Peak HBM the program needs per chip: inputs, outputs that do not reuse an input, and scratch."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def analyse(compiled: Any, mesh: Any) -> CompiledCost:
    """Per-chip memory and collectives of a jax `Compiled` for a TPU topology, laid out on `mesh`."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else (cost or {})
    return CompiledCost(
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        compiler_flops=cost.get("flops"), compiler_seconds=cost.get("optimal_seconds"),
        collectives=collectives(compiled.as_text(), mesh),
    )


def padded_bytes_bound(shape: tuple[int, ...], itemsize: int) -> int:
    """The most bytes a TPU buffer of `shape` can take once tiled: its two minor dimensions (whichever the
    compiler makes minor) padded to a (8 x 4 / itemsize, 128) tile, vectors to 1024 elements, scalars to 4 KiB.
    The analytic size of an array is exact; the compiler's may lie anywhere up to this."""
    if not shape:
        return 4096
    if len(shape) == 1:
        return -(-shape[0] // 1024) * 1024 * itemsize
    sublanes = 8 * max(1, 4 // itemsize)
    best = 0
    for minor in range(len(shape)):
        for second in range(len(shape)):
            if second == minor:
                continue
            rest = math.prod(n for i, n in enumerate(shape) if i not in (minor, second))
            padded = -(-shape[minor] // 128) * 128 * -(-shape[second] // sublanes) * sublanes
            best = max(best, rest * padded)
    return best * itemsize


def shard_bytes(tree: Any, padded: bool = False) -> int:
    """Bytes of one device's shards of a tree of ShapeDtypeStructs carrying shardings (evenly divided arrays
    have equal shards); `padded`: the most they can take once tiled on a TPU (padded_bytes_bound)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.sharding.shard_shape(leaf.shape)) if leaf.sharding is not None else tuple(leaf.shape)
        itemsize = np.dtype(leaf.dtype).itemsize
        total += padded_bytes_bound(shape, itemsize) if padded else math.prod(shape) * itemsize
    return total


def compile_for(lowered: Any, mesh: Any, what: str, topology: Topology) -> tuple[CompiledCost | None, str | None,
                                                                                  float]:
    """Compile a lowered step for a TPU topology: (its costs, None, seconds), or (None, the compiler's message,
    seconds) when it stops because the step does not fit in HBM. Any other refusal is a PlanError."""
    import time

    start = time.perf_counter()
    try:
        return analyse(lowered.compile(), mesh), None, time.perf_counter() - start
    except Exception as e:  # out of HBM is a result (does not fit); anything else is an error
        first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
        if "RESOURCE_EXHAUSTED" not in first:
            raise PlanError(f"the TPU compiler refused the {what} on {topology.name}: {first}") from None
        return None, first.split("RESOURCE_EXHAUSTED:", 1)[-1].strip(), time.perf_counter() - start


def fits(cost: CompiledCost, chip: Chip) -> tuple[bool, str]:
    """(fits, verdict) against the chip's HBM."""
    need = cost.total_bytes
    if need <= chip.hbm_bytes:
        return True, f"fits ({need / chip.hbm_bytes:.0%} of {chip.hbm_bytes / GIB:.0f} GiB HBM)"
    return False, f"does not fit: needs {need / GIB:.1f} GiB of {chip.hbm_bytes / GIB:.0f} GiB HBM"


@dataclasses.dataclass
class Roofline:
    compute_s: float  # FLOPs / peak
    hbm_s: float  # HBM bytes / bandwidth
    ici_s: float | None  # collective bytes inside a slice / ICI bandwidth (None: the chip's ICI is unpublished)
    dcn_s: float  # collective bytes between slices / DCN bandwidth

    @property
    def bound_s(self) -> float:
        """The step can be no faster than its slowest part (perfect overlap of the others)."""
        return max(self.compute_s, self.hbm_s, self.ici_s or 0.0, self.dcn_s)

    @property
    def limit(self) -> str:
        parts = {"compute": self.compute_s, "HBM": self.hbm_s, "ICI": self.ici_s or 0.0, "DCN": self.dcn_s}
        return max(parts, key=parts.get)


def roofline(flops: float, hbm_bytes: float, found: list[Collective], chip: Chip) -> Roofline:
    """Per-chip FLOPs, HBM bytes and the compiled collectives -> the time each resource needs per step. A
    collective whose groups span slices is charged to the data-center network, the rest to ICI at half its
    bidirectional bandwidth (what one chip can send)."""
    ici = sum(c.traffic * c.count for c in found if not c.dcn)
    dcn = sum(c.traffic * c.count for c in found if c.dcn)
    return Roofline(compute_s=flops / chip.peak_flops, hbm_s=hbm_bytes / chip.hbm_bandwidth,
                    ici_s=None if chip.ici_bandwidth is None else ici / (chip.ici_bandwidth / 2),
                    dcn_s=dcn / chip.dcn_bandwidth)


def collective_table(found: list[Collective]) -> list[str]:
    """Rows for printing: kind, axes, per step, per call, total per step."""
    rows = [f"{'collective':<20}{'mesh axes':<18}{'link':<5}{'per step':>9}{'bytes/call':>13}{'bytes/step':>13}"]
    for c in found:
        rows.append(f"{c.kind:<20}{','.join(c.axes):<18}{'DCN' if c.dcn else 'ICI':<5}{c.count:>9}"
                    f"{size(c.bytes):>13}{size(c.bytes * c.count):>13}")
    if len(rows) == 1:
        rows.append("(none: every chip computes alone)")
    return rows


def seconds(t: float) -> str:
    return f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.2f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
