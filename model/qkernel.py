"""The CPU kernel for quantised matmuls: model/qmatmul.cc, built by `pip install` into model/_qmatmul*.so and
called from jitted code as an XLA custom call (jax.ffi).

Why a kernel: XLA:CPU turns an int8 or 4-bit weight into a float32 copy before each dot (or, at some shapes,
converts it inside a slow loop), so a quantised decode step reads and writes more bytes than a float32 one
(docs/BENCHMARKS.md, the matmul micro-benchmark). The kernel reads the quantised bytes once. With int8
activations (the default) it quantises x per block of 32 and multiplies integers by integers; with float
activations it turns the codes into floats in registers.

It is used where it applies: on CPU (`jax.lax.platform_dependent`; GPU and TPU keep the pure-JAX path, where
XLA fuses the dequantisation into the dot), for float32 compute, at most MAX_ROWS rows of activations (decode
and verification steps and short prefill chunks; longer ones, and whole-sequence forwards as in training or
perplexity, take the pure-JAX path), and output widths that are a multiple of 16. The pure-JAX path
(`model.quant.dequantize` then a dot) is the reference the tests hold it to. `MESHLM_QKERNEL=off` turns it
off; without a compiler at install time the library is missing and everything runs the reference path.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from model.quant import ACTIVATION_BLOCK, QuantizedWeight, dequantize, int8_activations, quantize_activations
from model.sharding import active_mesh, logical_to_spec, rules_on

TARGET = "meshlm_qmatmul"
ATTENTION_TARGET = "meshlm_attention"  # model/attention.cc, in the same library (model/attention_kernel.py)
# Rows up to which the kernel runs: decode and verification steps, and prefill chunks up to 128 rows (the
# serving engine's prompt buckets), where it beat dequantise-then-dot in the model (an engine prefill of 100
# tokens: 245 -> 220 ms, int4). At 512 rows XLA's dot of the dequantised weight was faster in the model (a
# 512-token prefill, int8: 451 tokens/s against 393 with the kernel), though not in the matmul
# micro-benchmark, whose weights stay in this machine's L3 (docs/BENCHMARKS.md).
MAX_ROWS = 128
KINDS = {"int8": 0, "q8_0": 0, "int4": 1, "q4_1": 1, "q4_0": 2}  # model/qmatmul.cc's Kind


def _library_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_qmatmul" + suffix)
        if os.path.exists(path):
            return path
    return None


@functools.cache
def _load() -> str | None:
    """Load and register the kernel once; its build name ('avx512', 'avx2', 'baseline'), or None."""
    if os.environ.get("MESHLM_QKERNEL", "on").lower() in ("off", "0", "false", "no"):
        return None
    path = _library_path()
    if path is None:
        return None
    library = ctypes.CDLL(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.MeshlmQMatmul), platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(library.MeshlmAttention), platform="cpu")
    library.MeshlmQMatmulBuild.restype = ctypes.c_char_p
    return library.MeshlmQMatmulBuild().decode()


def build() -> str | None:
    """Which build of the kernel this CPU runs ('avx512', 'avx2' or 'baseline'); None when it is not
    installed or turned off."""
    return _load()


def applies(q: QuantizedWeight, rows: int, dtype: Any) -> bool:
    """Whether the kernel takes this matmul: one layer's weight (a matrix once its K and N dimensions are
    merged), float32 compute, a decode-sized number of rows, an output width that is a multiple of 16, and
    the library present."""
    return (q.values.ndim == 2 and q.format in KINDS and jnp.dtype(dtype) == jnp.float32 and rows <= MAX_ROWS
            and q.scale.shape[-1] % 16 == 0 and build() is not None)


def qmatmul(x: jax.Array, q: QuantizedWeight) -> jax.Array:
    """x [M, K] float32 @ the quantised weight as [K, N] -> [M, N] float32, by the kernel (CPU only)."""
    n = q.scale.shape[-1]
    codes = q.values.reshape(-1, n)
    scale = q.scale.reshape(-1, n)
    offset = q.offset.reshape(-1, n) if q.offset is not None else jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x.astype(jnp.float32), codes, scale, offset, group=np.int64(q.group),
                kind=np.int64(KINDS[q.format]), int8_activations=np.int64(int8_activations(q)))


def project(x: jax.Array, q: QuantizedWeight, dtype: Any, equation: str,
            axes: tuple[str | None, ...] | None = None) -> jax.Array:
    """`jnp.einsum(equation, x, W)` for the float weight W that `q` stands for (x's last `q.contract`
    dimensions contract with W's first ones): by the kernel on CPU where it applies, else (and on GPU/TPU)
    by dequantising W and the einsum. `axes`: W's logical axis names, which lay the kernel out on the active
    mesh (`model.sharding.activation_sharding`) by the rules table."""
    def reference(x: jax.Array, q: QuantizedWeight) -> jax.Array:
        if int8_activations(q):  # x's last q.contract dimensions are K
            x = quantize_activations(x.reshape(*x.shape[:x.ndim - q.contract], -1)).reshape(x.shape)
        return jnp.einsum(equation, x, dequantize(q, dtype))

    dims = q.shape[q.lead:]  # the float weight's dimensions, less the stacked layers (also inside a scan)
    out_dims = dims[q.contract:]
    batch = x.shape[:x.ndim - q.contract]
    rows = math.prod(batch)
    if not applies(q, rows, dtype):
        return reference(x, q)

    def cpu(x: jax.Array, q: QuantizedWeight) -> jax.Array:
        y = _on_mesh(x.reshape(rows, -1), q, axes[len(axes) - len(dims):] if axes else None)
        return y.reshape(*batch, *out_dims).astype(dtype)

    return jax.lax.platform_dependent(x, q, cpu=cpu, default=reference)


def _on_mesh(x: jax.Array, q: QuantizedWeight, axes: tuple[str | None, ...] | None) -> jax.Array:
    """The kernel on the active mesh, if any: under shard_map, each device multiplies its rows of x (split like
    the batch) by its block of the weight (split as the rules split W's output dimension and, where it is a
    model-parallel axis, its contraction dimension: then the partial products are summed across it). Mesh axes
    that also split the batch (data, fsdp) are gathered from the weight first, as XLA does for a float weight."""
    mesh, rules = active_mesh()
    if mesh is None or mesh.size == 1 or axes is None:
        return qmatmul(x, q)
    rules = rules_on(mesh, rules)
    if dict(mesh.shape).get("stage", 1) > 1:  # inside the pipeline's own shard_map: no nesting
        return qmatmul_reference(x, q)
    batch_axes = _axes(logical_to_spec(("batch",), rules)[0])
    k_name, n_name = axes[0], axes[q.contract]
    k_axes = tuple(a for a in _axes(logical_to_spec((k_name,), rules)[0]) if a not in batch_axes)
    n_axes = tuple(a for a in _axes(logical_to_spec((n_name,), rules)[0]) if a not in batch_axes + k_axes)
    size = lambda names: math.prod(mesh.shape[a] for a in names)  # noqa: E731
    groups = q.scale.shape[0]
    if x.shape[0] % size(batch_axes):
        batch_axes = ()
    if groups % size(k_axes) or (q.bits == 4 and q.values.shape[0] % size(k_axes)):
        k_axes = ()
    if int8_activations(q) and (x.shape[1] // size(k_axes)) % ACTIVATION_BLOCK:  # each shard: whole blocks
        k_axes = ()
    if q.scale.shape[1] % size(n_axes):
        n_axes = ()
    if (q.scale.shape[1] // size(n_axes)) % 16:  # a shard narrower than the kernel takes
        return qmatmul_reference(x, q)
    spec = lambda names: (names if len(names) > 1 else names[0]) if names else None  # noqa: E731
    kspec, nspec, bspec = spec(k_axes), spec(n_axes), spec(batch_axes)
    gspec = kspec if groups > 1 else None  # one group (int8 per channel): every shard has the whole scale
    wspec = q.replace(values=P(kspec, nspec), scale=P(gspec, nspec),
                      offset=None if q.offset is None else P(gspec, nspec))

    def local(x: jax.Array, q: QuantizedWeight) -> jax.Array:
        if groups == 1:  # the group is this shard's part of K (the products are linear in the scale)
            q = q.replace(group=x.shape[1])
        y = qmatmul(x, q)
        return jax.lax.psum(y, k_axes) if k_axes else y

    return jax.shard_map(local, mesh=mesh, in_specs=(P(bspec, kspec), wspec), out_specs=P(bspec, nspec),
                         check_vma=False)(x, q)


def _axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def qmatmul_reference(x: jax.Array, q: QuantizedWeight) -> jax.Array:
    """What qmatmul computes, by dequantising (and quantising the activations where q asks): x [M, K] @ q as
    [K, N]."""
    if int8_activations(q):
        x = quantize_activations(x)
    return x @ dequantize(q).reshape(-1, q.scale.shape[-1])
