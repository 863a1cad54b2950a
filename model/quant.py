"""Quantised weights: int8 and int4 values with scales (and, for llama.cpp's Q4_1, a minimum per block), held
as a pytree that the rules table shards like the float weight it stands for.

Why not Qwix (Google's JAX quantisation library, 0.1.8, checked 2026-11): its NNX post-training quantisation
finds weights by patching jnp/lax matmuls during one module call, which breaks on this model's per-layer weight
lists and `w[...].astype(dtype)` reads; its QArray takes only integer zero-points, so llama.cpp's Q4_1 (a float
minimum per block) does not fit; and it copies a weight's sharding names onto its scales unchanged, where a
per-channel scale's size-1 dimension cannot be sharded. The formats here are a few small functions.

A weight is seen as a matrix [K, N]: K the dimension a matmul contracts (meshlm's weights are [in, out]), N
the rest, after any leading `layers` dimension. Values are quantised in groups of `group` consecutive rows
along K, each with its own scale per column:

    format   bits  group          value            dequantised
    int8       8   K (per chan.)  q in [-127, 127]  q * scale
    int4       4   32/64/128      n in [0, 15]      n * scale + offset       (a minimum per group; like Q4_1)
    q8_0       8   32             q in [-128, 127]  q * scale                (llama.cpp Q8_0)
    q4_0       4   32             n in [0, 15]      (n - 8) * scale          (llama.cpp Q4_0)
    q4_1       4   32             n in [0, 15]      n * scale + offset       (llama.cpp Q4_1)

4-bit values are packed two per byte within each group: the group's first half in the low nibbles, its
second half in the high nibbles (llama.cpp's own order), so a GGUF block moves over byte for byte.

    values  [*lead, K, N] int8, or [*lead, K // 2, N] uint8 for 4 bits
    scale   [*lead, K // group, N] float32
    offset  [*lead, K // group, N] float32, int4 and q4_1 only

Activations: a matmul with a quantised weight quantises its activations too, by default (`activations="int8"`,
llama.cpp's scheme for its quantised dot products): each row of x in blocks of 32 along K, with d = max |x| / 127
and codes round(x / d). On CPU the kernel (model/qkernel.py) then multiplies integers by integers; elsewhere x
is replaced by codes * d before the dot, the same numbers. `activations="float"` keeps x as it is (weight-only
quantisation). A contraction (or group) that is not a multiple of 32 keeps float activations.

Every array keeps the float weight's logical axis names (its first contraction axis for the K dimension, its
first output axis for N; the scales' K dimension counts groups, so a mesh axis that splits K must split whole
groups), so `logical_axes` gives the rules table what it needs.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model.errors import ModelError

FORMATS = {"int8": (8, None), "int4": (4, None), "q8_0": (8, 32), "q4_0": (4, 32), "q4_1": (4, 32)}
INT4_GROUPS = (32, 64, 128)
ACTIVATIONS = ("int8", "float")  # what a matmul does with its activations (above)
ACTIVATION_BLOCK = 32


class QuantError(ModelError):
    """A quantisation that cannot be made: an unknown format, a group that does not divide the contraction
    dimension, values of the wrong shape."""


@flax.struct.dataclass
class QuantizedWeight:
    values: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    format: str = flax.struct.field(pytree_node=False)
    group: int = flax.struct.field(pytree_node=False)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # the float weight's shape [*lead, *K, *N]
    lead: int = flax.struct.field(pytree_node=False)  # leading dimensions kept apart (stacked layers)
    contract: int = flax.struct.field(pytree_node=False)  # how many dimensions after `lead` form K
    activations: str = flax.struct.field(pytree_node=False, default="int8")  # "int8" or "float" (above)

    @property
    def bits(self) -> int:
        return FORMATS[self.format][0]

    @property
    def k(self) -> int:
        return math.prod(self.shape[self.lead:self.lead + self.contract])

    @property
    def nbytes(self) -> int:
        parts = [self.values, self.scale] + ([self.offset] if self.offset is not None else [])
        return sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in parts)


def int8_activations(q: QuantizedWeight) -> bool:
    """Whether a matmul with `q` quantises its activations: asked for, and K and the group in whole blocks."""
    return q.activations == "int8" and q.k % ACTIVATION_BLOCK == 0 and q.group % ACTIVATION_BLOCK == 0


def quantize_activations(x: jax.Array) -> jax.Array:
    """x [..., K] (K a multiple of 32) as the int8 activations of a quantised matmul see it: per row and block
    of 32, codes round(x * (1 / d)) (ties to even) with d = max |x| * (1 / 127), times d. The CPU kernel
    computes the same codes and scales (model/qmatmul.cc)."""
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, ACTIVATION_BLOCK)
    # written as products with reciprocals, which is what XLA makes of divisions anyway, so that every
    # backend and the kernel round the same numbers
    d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) * np.float32(1 / 127)
    inverse = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    codes = jnp.round(blocks * inverse)
    return (codes * d).reshape(x.shape).astype(x.dtype)


def with_activations(params: Any, activations: str) -> Any:
    """`params` with every QuantizedWeight's activations set to "int8" or "float"."""
    if activations not in ACTIVATIONS:
        raise QuantError(f"unknown activations {activations!r}: use int8 (quantised per block of 32, the default) "
                         f"or float (weight-only quantisation)")
    def set(p: Any) -> Any:
        if not isinstance(p, QuantizedWeight) or p.activations == activations:
            return p
        return p.replace(activations=activations)

    return jax.tree.map(set, params, is_leaf=lambda p: isinstance(p, QuantizedWeight))


def parse_format(text: str) -> tuple[str, int | None]:
    """`int8`, `int4` (group 32), `int4:64`, `q8_0`, `q4_0`, `q4_1` -> (format, group or None)."""
    name, _, group = text.strip().lower().partition(":")
    if name not in FORMATS:
        raise QuantError(f"unknown quantisation {text!r}: use int8, int4[:32|64|128], q8_0, q4_0 or q4_1")
    if group:
        if name != "int4":
            raise QuantError(f"quantisation {text!r}: only int4 takes a group (int4:32, int4:64, int4:128)")
        if not group.isdigit() or int(group) not in INT4_GROUPS:
            raise QuantError(f"quantisation {text!r}: int4 groups are 32, 64 or 128")
        return name, int(group)
    return name, 32 if name == "int4" else FORMATS[name][1]


def _matrix(w: jax.Array, lead: int, contract: int) -> jax.Array:
    shape = w.shape
    k = math.prod(shape[lead:lead + contract])
    return w.reshape(*shape[:lead], k, -1)


def quantize(w: jax.Array, format: str, group: int | None = None, lead: int = 0, contract: int = 1,
             name: str = "weight") -> QuantizedWeight:
    """Quantise a float weight (`lead` leading dimensions kept apart, the next `contract` dimensions
    contracted). int8 is per output channel; 4-bit and llama.cpp formats in groups along K. Scales are chosen
    so that the largest magnitude of a group lands on the format's largest value."""
    if format not in FORMATS:
        raise QuantError(f"{name}: unknown quantisation format {format!r}; one of {', '.join(FORMATS)}")
    bits = FORMATS[format][0]
    m = _matrix(jnp.asarray(w, jnp.float32), lead, contract)
    k = m.shape[-2]
    group = k if format == "int8" else (group or FORMATS[format][1] or 32)
    if k % group or (bits == 4 and group % 2):
        raise QuantError(f"{name}: group {group} does not divide its contraction dimension of size {k} "
                         f"(shape {tuple(w.shape)}); pick a group that divides {k}")
    blocks = m.reshape(*m.shape[:-2], k // group, group, m.shape[-1])  # [*lead, groups, group, N]
    peak = jnp.max(jnp.abs(blocks), axis=-2)  # [*lead, groups, N]
    offset = None
    if format in ("int4", "q4_1"):  # 16 levels from the group's minimum to its maximum
        low, high = jnp.min(blocks, axis=-2), jnp.max(blocks, axis=-2)
        scale = (high - low) / 15
        codes = jnp.round((blocks - low[..., None, :]) / jnp.where(scale == 0, 1, scale)[..., None, :])
        codes, offset = jnp.clip(codes, 0, 15), low
    else:
        top = {"int8": 127, "q8_0": 127, "q4_0": 7}[format]
        scale = peak / top
        codes = jnp.round(blocks / jnp.where(scale == 0, 1, scale)[..., None, :])
        codes = jnp.clip(codes, -128, 127) if bits == 8 else jnp.clip(codes, -8, 7) + 8
    codes = codes.reshape(m.shape)
    values = codes.astype(jnp.int8) if bits == 8 else pack_nibbles(codes.astype(jnp.uint8), group)
    return QuantizedWeight(values=values, scale=scale.astype(jnp.float32), offset=offset, format=format,
                           group=group, shape=tuple(w.shape), lead=lead, contract=contract)


def pack_nibbles(codes: jax.Array, group: int) -> jax.Array:
    """[*lead, K, N] codes in [0, 15] -> [*lead, K // 2, N] bytes: in each group, the first half low, the
    second half high."""
    *lead, k, n = codes.shape
    g = codes.reshape(*lead, k // group, 2, group // 2, n)
    return (g[..., 0, :, :] | (g[..., 1, :, :] << 4)).reshape(*lead, k // 2, n).astype(jnp.uint8)


def unpack_nibbles(values: jax.Array, group: int) -> jax.Array:
    """The inverse of pack_nibbles: [*lead, K // 2, N] bytes -> [*lead, K, N] codes in [0, 15]."""
    *lead, half, n = values.shape
    g = values.reshape(*lead, half * 2 // group, 1, group // 2, n)
    return jnp.concatenate([g & 15, g >> 4], axis=-3).reshape(*lead, half * 2, n)


def dequantize(q: QuantizedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """The float weight a QuantizedWeight stands for, in its original shape (less any leading dimensions a
    scan has already sliced off its arrays)."""
    codes = (q.values.astype(jnp.float32) if q.bits == 8
             else unpack_nibbles(q.values, q.group).astype(jnp.float32))
    *lead, k, n = codes.shape
    blocks = codes.reshape(*lead, k // q.group, q.group, n)
    scale = q.scale[..., None, :]
    if q.offset is not None:
        w = blocks * scale + q.offset[..., None, :]
    elif q.bits == 4:
        w = (blocks - 8) * scale
    else:
        w = blocks * scale
    return w.reshape(*lead, *q.shape[q.lead:]).astype(dtype)


def layer_of(p: Any, layer: int) -> Any:
    """Layer `layer` of a stacked parameter: an array's row, or a QuantizedWeight's (one leading dim less)."""
    if not isinstance(p, QuantizedWeight):
        return p[layer]
    return p.replace(values=p.values[layer], scale=p.scale[layer],
                     offset=None if p.offset is None else p.offset[layer], shape=p.shape[1:], lead=p.lead - 1)


# The matmul weights of meshlm's model (model/transformer.py) and how many of their dimensions (after `layers`)
# a matmul contracts; embedding and norms stay in float.
MATMUL_WEIGHTS = {("attn", "wq"): 1, ("attn", "wk"): 1, ("attn", "wv"): 1, ("attn", "wo"): 2,
                  ("mlp", "w_gate"): 1, ("mlp", "w_up"): 1, ("mlp", "w_down"): 1}


def quantize_params(params: dict, format: str, group: int | None = None, activations: str = "int8") -> dict:
    """A model's parameter dict with every layer's matmul weights (and an untied LM head) quantised; the
    embedding and the norms stay as they are. Errors name the parameter and its contraction dimension.
    activations: what their matmuls do with activations, "int8" or "float" (the module docstring)."""
    layers = params["layers"]
    out_layers = {part: dict(values) for part, values in layers.items()}
    for (part, name), contract in MATMUL_WEIGHTS.items():
        out_layers[part][name] = _requantize(layers[part][name], format, group, lead=1, contract=contract,
                                             name=f"layers/{part}/{name}")
    out = {**params, "layers": out_layers}
    if "lm_head" in params:
        out["lm_head"] = _requantize(params["lm_head"], format, group, lead=0, contract=1, name="lm_head")
    return with_activations(out, activations)


def _requantize(w: Any, format: str, group: int | None, lead: int, contract: int, name: str) -> QuantizedWeight:
    """quantize(), for a weight that may be quantised already (a quantised checkpoint): in the same format and
    group it stays as it is, bit for bit; in another it is dequantised to float32 first, then quantised."""
    if isinstance(w, QuantizedWeight):
        if w.format == format and (format == "int8" or w.group == (group or FORMATS[format][1] or 32)):
            return w
        w = dequantize(w)
    return quantize(w, format, group, lead=lead, contract=contract, name=name)


def dequantize_params(params: Any) -> Any:
    """A parameter dict with every QuantizedWeight replaced by its float32 values (what the model computes
    with)."""
    return jax.tree.map(lambda p: dequantize(p) if isinstance(p, QuantizedWeight) else p, params,
                        is_leaf=lambda p: isinstance(p, QuantizedWeight))


def describe_quantization(params: Any) -> str:
    """'q4_1: 210 weights' / 'int4:32: 211 weights' / 'float': the formats of a parameter dict."""
    counts: dict[str, int] = {}
    for leaf in jax.tree.leaves(params, is_leaf=lambda p: isinstance(p, QuantizedWeight)):
        if isinstance(leaf, QuantizedWeight):
            label = f"int4:{leaf.group}" if leaf.format == "int4" else leaf.format
            counts[label] = counts.get(label, 0) + math.prod(leaf.shape[:leaf.lead])
    return ", ".join(f"{label}: {n} weights" for label, n in sorted(counts.items())) or "float"


# ----------------------------------------------------------------------------- in checkpoints
#
# A checkpoint holds plain arrays: each QuantizedWeight is saved as a dict of its arrays {values, scale[, offset]}
# under the weight's own path ("layers/attn/wq/values", ...), and its static fields (format, group, the float
# weight's shape, lead, contract) go into the layout metadata, from which the restore target is rebuilt.

ARRAYS = ("values", "scale", "offset")


def _path(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def static_fields(q: QuantizedWeight) -> dict:
    """A QuantizedWeight's static fields as JSON: what a checkpoint's layout records for it."""
    return {"format": q.format, "group": q.group, "shape": list(q.shape), "lead": q.lead, "contract": q.contract,
            "activations": q.activations}


def as_arrays(params: Any) -> tuple[Any, dict[str, dict]]:
    """(the parameter dict with each QuantizedWeight replaced by a dict of its arrays, {path: static_fields}
    of those weights; empty for float parameters)."""
    fields: dict[str, dict] = {}

    def arrays(path: tuple[Any, ...], p: Any) -> Any:
        if not isinstance(p, QuantizedWeight):
            return p
        fields[_path(path)] = static_fields(p)
        return {name: getattr(p, name) for name in ARRAYS if getattr(p, name) is not None}

    tree = jax.tree_util.tree_map_with_path(arrays, params, is_leaf=lambda p: isinstance(p, QuantizedWeight))
    return tree, fields


def from_arrays(params: Any, quantization: dict[str, dict] | None) -> Any:
    """The inverse of as_arrays: the dicts of arrays at the paths `quantization` names become QuantizedWeights
    with those static fields."""
    if not quantization:
        return params

    def walk(node: Any, prefix: str) -> Any:
        if not isinstance(node, dict):
            return node
        if prefix in quantization:
            meta = quantization[prefix]
            return QuantizedWeight(values=node["values"], scale=node["scale"], offset=node.get("offset"),
                                   format=meta["format"], group=meta["group"], shape=tuple(meta["shape"]),
                                   lead=meta["lead"], contract=meta["contract"],
                                   activations=meta.get("activations", "int8"))
        return {key: walk(value, f"{prefix}/{key}" if prefix else key) for key, value in node.items()}

    return walk(params, "")


def matmul_dims(path: str) -> tuple[int, int] | None:
    """(lead, contract) of the matmul weight at a parameter path ("layers/attn/wq", "lm_head"); None for a
    parameter that stays float (embedding, norms)."""
    if path == "lm_head":
        return 0, 1
    parts = tuple(path.split("/"))
    if parts[:1] == ("layers",) and parts[1:] in MATMUL_WEIGHTS:
        return 1, MATMUL_WEIGHTS[parts[1:]]
    return None


def abstract_weight(float_shape: tuple[int, ...], fields: Any, name: str) -> QuantizedWeight:
    """The QuantizedWeight (ShapeDtypeStruct arrays) that a checkpoint's static `fields` describe for the
    matmul weight `name` of float shape `float_shape`; a QuantError naming the weight when the fields do not
    fit it (another model, an unknown format, a group that does not divide the contraction)."""
    dims = matmul_dims(name)
    if dims is None:
        raise QuantError(f"{name} is recorded as quantised, but only the layers' matmul weights and an untied "
                         "lm_head are")
    keys = {"format", "group", "shape", "lead", "contract"}  # and "activations" (checkpoints written since)
    if not isinstance(fields, dict) or set(fields) - {"activations"} != keys:
        raise QuantError(f"{name}: the quantisation record {fields!r} is not one of {{{', '.join(sorted(keys))}}} "
                         "(and activations)")
    activations = fields.get("activations", "int8")
    if activations not in ACTIVATIONS:
        raise QuantError(f"{name}: activations {activations!r} are not one of {', '.join(ACTIVATIONS)}")
    format, group, shape = fields["format"], fields["group"], tuple(fields["shape"])
    if format not in FORMATS:
        raise QuantError(f"{name}: unknown quantisation format {format!r}; one of {', '.join(FORMATS)}")
    if shape != tuple(float_shape) or (fields["lead"], fields["contract"]) != dims:
        raise QuantError(f"{name}: quantised as a weight of shape {list(shape)} (lead {fields['lead']}, contract "
                         f"{fields['contract']}); the model's is {list(float_shape)} (lead {dims[0]}, contract "
                         f"{dims[1]})")
    lead_shape, k = shape[:dims[0]], math.prod(shape[dims[0]:dims[0] + dims[1]])
    n = math.prod(shape[dims[0] + dims[1]:])
    allowed = {"int8": (k,), "int4": INT4_GROUPS}.get(format, (FORMATS[format][1],))
    if not isinstance(group, int) or group not in allowed or k % group:
        raise QuantError(f"{name}: {format} with group {group!r} does not fit its contraction dimension of size {k}")
    bits = FORMATS[format][0]
    values = jax.ShapeDtypeStruct((*lead_shape, k if bits == 8 else k // 2, n), jnp.int8 if bits == 8 else jnp.uint8)
    scale = jax.ShapeDtypeStruct((*lead_shape, k // group, n), jnp.float32)
    return QuantizedWeight(values=values, scale=scale, offset=scale if format in ("int4", "q4_1") else None,
                           format=format, group=group, shape=shape, lead=dims[0], contract=dims[1],
                           activations=activations)


def error_bound(q: QuantizedWeight) -> jax.Array:
    """The most any element may differ from the weight it was quantised from: half a step of its group."""
    return jnp.max(q.scale) / 2


def matmul(x: jax.Array, q: QuantizedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """x [..., K] @ the quantised weight [K, N] (no lead): the reference, dequantise then dot."""
    if q.lead:
        raise QuantError("matmul takes one layer's weight (lead 0); index the stacked layers first")
    w = dequantize(q, dtype).reshape(q.k, -1)
    out = jnp.dot(x.astype(dtype).reshape(*x.shape[:x.ndim - q.contract], q.k), w)
    return out.reshape(*out.shape[:-1], *q.shape[q.contract:])


def logical_axes(q: QuantizedWeight, axes: tuple[str | None, ...]) -> QuantizedWeight:
    """The logical axes of each array of `q`, given the float weight's `axes`: the leading ones, then the first
    contraction axis's name for K (and its groups), then the first output axis's name for N. A tree shaped
    like `q` with tuples where its arrays are (for model.sharding's rules)."""
    lead = tuple(axes[:q.lead])
    k_name, n_name = axes[q.lead], axes[q.lead + q.contract]
    names = (*lead, k_name, n_name)
    # one group along K (int8 per channel): the scales' K dimension has size 1 and is not sharded
    groups = (*lead, k_name if q.k // q.group > 1 else None, n_name)
    return q.replace(values=names, scale=groups, offset=None if q.offset is None else groups)


# ----------------------------------------------------------------------------- llama.cpp blocks

_GGUF_BLOCK = {"q8_0": (34, 32), "q4_0": (18, 32), "q4_1": (20, 32)}  # bytes and values per block


def gguf_block_arrays(raw: np.ndarray, format: str, shape: tuple[int, int],
                      name: str = "tensor") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A GGUF tensor's raw blocks (uint8 [rows, bytes per row], as gguf.GGUFReader gives them; rows are the
    output channels of an [out, in] weight) -> numpy (values, scale, offset or None) of meshlm's [in, out]
    weight, laid out as a QuantizedWeight holds them: the bytes move over, no float copy. `shape`: (out, in)."""
    if format not in _GGUF_BLOCK:
        raise QuantError(f"{name}: GGUF type {format!r} does not load as blocks; one of {', '.join(_GGUF_BLOCK)}")
    size, per = _GGUF_BLOCK[format]
    out, k = shape
    raw = np.ascontiguousarray(raw, np.uint8)
    if k % per or raw.size != out * (k // per) * size:
        raise QuantError(f"{name}: {raw.size} bytes do not hold a {format} tensor of shape {list(shape)} "
                         f"({k // per if per else 0} blocks of {size} bytes per row; truncated file?)")
    blocks = raw.reshape(out, k // per, size)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32).T  # [groups, N]
    offset = None
    if format == "q4_1":
        offset = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32).T
        body = blocks[..., 4:]
    else:
        body = blocks[..., 2:]
    if format == "q8_0":
        values = body.view(np.int8).reshape(out, k).T  # [K, N]
    else:
        values = body.reshape(out, k // 2).T  # [K // 2, N]: per group, bytes 0..15 (low: 0..15, high: 16..31)
    return (np.ascontiguousarray(values), np.ascontiguousarray(scale),
            None if offset is None else np.ascontiguousarray(offset))


def from_gguf_blocks(raw: np.ndarray, format: str, shape: tuple[int, int], name: str = "tensor") -> QuantizedWeight:
    """A GGUF tensor's raw blocks -> a QuantizedWeight of meshlm's [in, out] weight, moved byte for byte
    (`gguf_block_arrays`): no float copy. `shape`: (out, in)."""
    values, scale, offset = gguf_block_arrays(raw, format, shape, name)
    return QuantizedWeight(values=jnp.asarray(values), scale=jnp.asarray(scale),
                           offset=None if offset is None else jnp.asarray(offset), format=format,
                           group=_GGUF_BLOCK[format][1], shape=(shape[1], shape[0]), lead=0, contract=1)
