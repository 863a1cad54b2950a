"""Hugging Face Llama weights: a directory of `config.json` + `*.safetensors` <-> meshlm parameters.

The Llama layout (`LlamaForCausalLM`): `model.embed_tokens.weight` [vocab, d_model], per layer
`model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` and `.mlp.{gate,up,down}_proj.weight` as
[out_features, in_features], `input_layernorm` / `post_attention_layernorm` / `model.norm` weights,
and `lm_head.weight` [vocab, d_model] unless the embeddings are tied. Its rotary embedding rotates
the two halves of each head (`rotate_half`), as meshlm's does, so the projections map over as they
are: only transposed, split into heads and stacked over layers. Conversions are exact (no
arithmetic), so import after export gives back the same bits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from model.config import ConfigError, ModelConfig, RopeScaling
from model.errors import ModelError


class WeightsError(ModelError):
    """Weights that cannot be read as a meshlm model: what is wrong, and with which tensor or field."""


# our parameter path -> (HF name with {i} for the layer, how the HF [out, in] matrix becomes ours)
def _layer_names() -> dict[tuple[str, ...], str]:
    return {
        ("attn", "wq"): "model.layers.{i}.self_attn.q_proj.weight",
        ("attn", "wk"): "model.layers.{i}.self_attn.k_proj.weight",
        ("attn", "wv"): "model.layers.{i}.self_attn.v_proj.weight",
        ("attn", "wo"): "model.layers.{i}.self_attn.o_proj.weight",
        ("mlp", "w_gate"): "model.layers.{i}.mlp.gate_proj.weight",
        ("mlp", "w_up"): "model.layers.{i}.mlp.up_proj.weight",
        ("mlp", "w_down"): "model.layers.{i}.mlp.down_proj.weight",
        ("attn_norm", "scale"): "model.layers.{i}.input_layernorm.weight",
        ("mlp_norm", "scale"): "model.layers.{i}.post_attention_layernorm.weight",
    }


LAYER_NAMES = _layer_names()


def hf_names(config: ModelConfig) -> list[str]:
    """Every tensor name a Llama checkpoint of `config` holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [name.format(i=i) for i in range(config.n_layers) for name in LAYER_NAMES.values()]
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    return names


def _hf_shape(config: ModelConfig, key: tuple[str, ...]) -> tuple[int, ...]:
    d, h, kv, hd, ff = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff
    return {("attn", "wq"): (h * hd, d), ("attn", "wk"): (kv * hd, d), ("attn", "wv"): (kv * hd, d),
            ("attn", "wo"): (d, h * hd), ("mlp", "w_gate"): (ff, d), ("mlp", "w_up"): (ff, d),
            ("mlp", "w_down"): (d, ff), ("attn_norm", "scale"): (d,), ("mlp_norm", "scale"): (d,)}[key]


def our_shape(config: ModelConfig, key: tuple[str, ...]) -> tuple[int, ...]:
    """The shape of one layer's parameter `key` in meshlm's layout (what `_to_ours` makes of the HF tensor)."""
    d, h, kv, hd, ff = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff
    return {("attn", "wq"): (d, h, hd), ("attn", "wk"): (d, kv, hd), ("attn", "wv"): (d, kv, hd),
            ("attn", "wo"): (h, hd, d), ("mlp", "w_gate"): (d, ff), ("mlp", "w_up"): (d, ff),
            ("mlp", "w_down"): (ff, d), ("attn_norm", "scale"): (d,), ("mlp_norm", "scale"): (d,),
            ("lm_head",): (d, config.vocab_size)}[key]


def hf_shape(config: ModelConfig, key: tuple[str, ...]) -> tuple[int, ...]:
    """The [out, in] shape of one layer's HF tensor for parameter `key` (("lm_head",): the LM head's)."""
    return (config.vocab_size, config.d_model) if key == ("lm_head",) else _hf_shape(config, key)


def _to_ours(config: ModelConfig, key: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    d, h, kv, hd = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    if key == ("attn", "wq"):
        return w.T.reshape(d, h, hd)
    if key in (("attn", "wk"), ("attn", "wv")):
        return w.T.reshape(d, kv, hd)
    if key == ("attn", "wo"):
        return w.T.reshape(h, hd, d)
    return w.T if w.ndim == 2 else w


def _to_hf(key: tuple[str, ...], w: np.ndarray) -> np.ndarray:
    if key == ("attn", "wo"):
        return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)
    if w.ndim == 3:  # wq, wk, wv: [d, heads, head_dim]
        return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
    return np.ascontiguousarray(w.T) if w.ndim == 2 else w


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray], where: str = "weights",
                   kept: Mapping[tuple[str, ...], Any] | None = None) -> dict:
    """HF-named tensors -> meshlm's parameter dict (numpy, the config's param dtype). Every tensor
    must be there with its shape; extra tensors are an error (another architecture).

    kept: parameters already in meshlm's layout, stacked over layers (quantised GGUF blocks, model.gguf), by
    key (("attn", "wq"), ..., ("lm_head",)); they are used as they are and their HF tensors are not needed."""
    kept = dict(kept or {})
    excused = {name.format(i=i) for key, name in LAYER_NAMES.items() if key in kept for i in range(config.n_layers)}
    excused |= {"lm_head.weight"} if ("lm_head",) in kept else set()
    names = [n for n in hf_names(config) if n not in excused]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise WeightsError(f"{where}: {len(missing)} tensor(s) missing for {config.n_layers} Llama layers, "
                           f"e.g. {', '.join(missing[:4])}")
    extra = sorted(set(tensors) - set(names) - {"lm_head.weight"})
    extra = [n for n in extra if not n.endswith("rotary_emb.inv_freq")]  # a buffer older exports include
    if extra:
        raise WeightsError(f"{where}: tensor(s) the Llama layout does not have: {', '.join(extra[:4])}"
                           f"{' ...' if len(extra) > 4 else ''}: not a LlamaForCausalLM checkpoint?")
    dtype = config.param_jnp_dtype

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        w = np.asarray(tensors[name])
        if w.shape != shape:
            raise WeightsError(f"{where}: {name} has shape {list(w.shape)}, the config needs {list(shape)}")
        return w

    layers: dict = {}
    for key, name in LAYER_NAMES.items():
        if key in kept:
            layers.setdefault(key[0], {})[key[1]] = kept[key]
            continue
        shape = _hf_shape(config, key)
        stacked = np.stack([_to_ours(config, key, get(name.format(i=i), shape)) for i in range(config.n_layers)])
        layers.setdefault(key[0], {})[key[1]] = stacked.astype(dtype)
    vocab, d = config.vocab_size, config.d_model
    params = {"embedding": get("model.embed_tokens.weight", (vocab, d)).astype(dtype),
              "final_norm": {"scale": get("model.norm.weight", (d,)).astype(dtype)}, "layers": layers}
    if not config.tie_embeddings:
        params["lm_head"] = kept.get(("lm_head",))
        if params["lm_head"] is None:
            params["lm_head"] = get("lm_head.weight", (vocab, d)).T.astype(dtype)
    return params


def params_to_hf(config: ModelConfig, params: Mapping) -> dict[str, np.ndarray]:
    """meshlm's parameter dict -> HF-named numpy tensors."""
    out = {"model.embed_tokens.weight": np.asarray(params["embedding"]),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
    for key, name in LAYER_NAMES.items():
        stacked = np.asarray(params["layers"][key[0]][key[1]])
        for i in range(config.n_layers):
            out[name.format(i=i)] = _to_hf(key, stacked[i])
    if not config.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
    return out


# ---- config.json -----------------------------------------------------------------------------------------

def config_from_hf(hf: Mapping, where: str = "config.json", **overrides) -> ModelConfig:
    """A `LlamaConfig` dict -> ModelConfig. Fields meshlm does not implement (biases, another
    activation or rope type) are errors rather than silently different numbers."""
    arch = hf.get("model_type")
    if arch != "llama" and "LlamaForCausalLM" not in (hf.get("architectures") or []):
        raise WeightsError(f"{where}: model_type {arch!r} / architectures {hf.get('architectures')}: "
                           "only the Llama architecture (LlamaForCausalLM) is supported")
    for field, want in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(field, want) != want:
            raise WeightsError(f"{where}: {field} = {hf[field]!r} is not supported (meshlm's Llama has {want!r})")
    scaling = hf.get("rope_scaling")
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise WeightsError(f"{where}: rope_scaling type {kind!r} is not supported (only 'llama3')")
        rope_scaling = RopeScaling(scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"],
                                   scaling["original_max_position_embeddings"])
    try:
        fields = dict(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            d_ff=hf["intermediate_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            rope_theta=float(hf.get("rope_theta", 10_000.0)), rope_scaling=rope_scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=hf.get("max_position_embeddings", 2048))
    except KeyError as e:
        raise WeightsError(f"{where}: the field {e.args[0]!r} is missing") from e
    try:
        return ModelConfig(**{**fields, **overrides})
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from e


def config_to_hf(config: ModelConfig) -> dict:
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
          "hidden_size": config.d_model, "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
          "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
          "head_dim": config.head_dim, "rope_theta": config.rope_theta, "rms_norm_eps": config.norm_eps,
          "tie_word_embeddings": config.tie_embeddings, "max_position_embeddings": config.max_seq_len,
          "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": config.param_dtype}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_seq_len}
    return hf


# ---- directories -------------------------------------------------------------------------------------------

def load_hf(directory: str, **overrides) -> tuple[ModelConfig, dict]:
    """(config, parameters) from a Hugging Face Llama directory: config.json + one or more *.safetensors."""
    from safetensors import SafetensorError, safe_open

    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise WeightsError(f"{directory}: no config.json (a Hugging Face model directory has config.json "
                           "and *.safetensors)")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{config_path}: unreadable ({e})") from e
    config = config_from_hf(hf, config_path, **overrides)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise WeightsError(f"{directory}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(directory, name)
        try:
            with safe_open(path, framework="numpy") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)  # bfloat16 comes as ml_dtypes.bfloat16
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: unreadable safetensors file ({e})") from e
    return config, params_from_hf(config, tensors, where=directory)


def save_hf(directory: str, config: ModelConfig, params: Mapping, max_shard_bytes: int = 2 << 30) -> list[str]:
    """Write config.json + model*.safetensors (shards of at most max_shard_bytes, with an index file when
    there is more than one). Returns the files written."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = params_to_hf(config, params)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, w in tensors.items():
        if shards[-1] and size + w.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = []
    for shard, name in zip(shards, names, strict=True):
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        written.append(name)
    if n > 1:
        index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
                 "weight_map": {t: name for shard, name in zip(shards, names, strict=True) for t in shard}}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        written.append("model.safetensors.index.json")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    written.append("config.json")
    return written

