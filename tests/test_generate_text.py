"""Text-level generation: stop strings cut the text (and are not returned), streamed text equals the
whole text, with a BPE tokenizer trained on the embedded corpus and a model of its vocabulary."""

import pytest
from flax import nnx

from data.tokenizer import train_bpe
from infer.decode import Decoder
from infer.generate import generate, stream_text
from infer.sampling import SamplingParams
from model import get_preset, init_model


@pytest.fixture(scope="module")
def tokenizer(stdlib_texts, tmp_path_factory):
    return train_bpe(stdlib_texts[:30], 400, str(tmp_path_factory.mktemp("bpe") / "small.tiktoken"))


@pytest.fixture(scope="module")
def decoder(tokenizer):
    config = get_preset("tiny").replace(vocab_size=tokenizer.vocab_size, init_std=0.2)
    return Decoder(config, *nnx.split(init_model(config, seed=0)))


def test_stop_strings_cut_generate_and_stream_alike(decoder, tokenizer):
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    [free] = generate(decoder, ["def main():\n"], tokenizer, params)
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    text = free.text
    stop = text[len(text) // 2:len(text) // 2 + 2]  # two characters from the middle of the free text
    assert stop and stop in text
    cut = text[:text.find(stop)]
    stopped = SamplingParams(max_new_tokens=40, temperature=0.0, stop=(stop,))
    [result] = generate(decoder, ["def main():\n"], tokenizer, stopped)
    assert result.text == cut and result.finish_reason == "stop"
    assert tokenizer.decode(result.token_ids) == cut[:len(tokenizer.decode(result.token_ids))]
    for chunk in (1, 3, 16):
        pieces = list(stream_text(decoder, "def main():\n", tokenizer, stopped, chunk=chunk))
        assert "".join(pieces) == cut and all(pieces)
    assert "".join(stream_text(decoder, "def main():\n", tokenizer, params, chunk=5)) == text
