"""Cleaning, filtering, packing, sources and the whole `prepare` pipeline, end to end."""

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest

from data.clean import FilterConfig, clean_text, quality_reason
from data.errors import DataError
from data.pack import PAD_ID, pack, positions_from_segments
from data.pipeline import PrepareConfig, prepare
from data.sources import load_documents
from data.store import open_store
from data.tokenizer import load_tokenizer, store_tokenizer

datasets.disable_progress_bars()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROSE = "The quick brown fox jumps over the lazy dog. " * 4


def distinct(seed: int, words: int = 60) -> str:
    """Prose-like text that shares few 5-word shingles with any other seed's."""
    rng = np.random.default_rng(seed)
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    return " ".join(rng.choice(vocab, words)) + "."


# ----------------------------------------------------------------------------- clean and filter


def test_clean_normalises_text():
    text, reason = clean_text(("\ufeffcafe\u0301\r\nline\rtwo\x0c\x07\tend\x7f\u0085" + PROSE).encode())
    assert reason == ""
    # NFC, newlines, BOM and control characters (not tab) gone
    assert text == "caf\u00e9\nline\ntwo\tend" + PROSE


def test_clean_drops_bad_input_with_a_reason():
    assert clean_text(b"caf\xe9 latin-1") == ("", "invalid_utf8")
    assert clean_text(b"PK\x03\x04\x00\x00binary") == ("", "binary")
    assert clean_text(bytes(range(1, 32)) * 4) == ("", "binary")  # control characters, no NUL
    assert clean_text(b"") == ("", "")


def test_quality_rules():
    config = FilterConfig(min_chars=10, max_chars=1000, max_line_chars=len(PROSE))
    assert quality_reason(PROSE, config) == ""
    assert quality_reason("short", config) == "too_short"
    assert quality_reason("x" * 1001, config) == "too_long"
    assert quality_reason("{}[]();:,." * 10, config) == "low_alnum_share"
    assert quality_reason(PROSE + "more words", config) == "long_line"
    assert quality_reason("same line\n" * 10 + "other line\n", config) == "repeated_lines"
    with pytest.raises(ValueError, match="min_alnum_share must be within"):
        FilterConfig(min_alnum_share=1.5)


# ----------------------------------------------------------------------------- pack


def test_packing_keeps_every_token_and_marks_documents():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, rng.integers(1, 40)).tolist() for _ in range(50)]
    eos, seq_len = 1000, 16
    chunks = list(pack(iter(docs), seq_len, eos))
    tokens = np.concatenate([c[0] for c in chunks])
    segments = np.concatenate([c[1] for c in chunks])
    assert tokens.shape[1] == segments.shape[1] == seq_len + 1
    stream = np.concatenate([np.append(d, eos) for d in docs])
    real = segments > 0
    np.testing.assert_array_equal(tokens[real], stream)  # nothing dropped, order kept
    assert (tokens[~real] == PAD_ID).all() and (~real).sum() < seq_len + 1  # only the last row is padded
    # a segment ends exactly at each eos (or at the end of a row)
    for row_tokens, row_segments in zip(tokens, segments, strict=True):
        ends = np.flatnonzero(row_tokens[:-1] == eos)
        for end in ends:
            if row_segments[end + 1] > 0:
                assert row_segments[end + 1] == row_segments[end] + 1
    dropped = list(pack(iter(docs), seq_len, eos, drop_tail=True))
    assert sum(len(c[0]) for c in dropped) == len(tokens) - 1


def test_positions_restart_with_each_segment():
    segments = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions_from_segments(segments),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])


# ----------------------------------------------------------------------------- sources


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(distinct(1))
    (d / "sub" / "b.txt").write_text(distinct(2))
    (d / "latin1.txt").write_bytes(("Caf\xe9 au lait. " + distinct(3)).encode("latin-1"))
    (d / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 20)
    (d / "ignored.bin").write_bytes(b"not listed")
    with open(d / "records.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"body": distinct(10 + i), "n": i}) + "\n")
    datasets.Dataset.from_dict({"body": [distinct(20)]}).to_parquet(str(d / "table.parquet"))
    return d


def test_sources_read_text_jsonl_and_parquet(corpus_dir):
    docs = load_documents(str(corpus_dir), text_field="body")
    assert len(docs) == 4 + 3 + 1
    ids = list(docs["id"])
    assert any(i.endswith("b.txt") for i in ids) and "records.jsonl#2" in ids and "table.parquet#0" in ids
    assert len(load_documents(str(corpus_dir / "*.txt"))) == 3  # a glob


def test_source_errors(tmp_path, corpus_dir):
    with pytest.raises(DataError, match="no such file, directory or glob match"):
        load_documents(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        load_documents(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"no field 'text' \(fields: body, n\)"):
        load_documents(str(corpus_dir / "records.jsonl"))


def test_embedded_corpus_is_the_stdlib_and_pydoc():
    docs = load_documents("stdlib")
    ids = list(docs["id"])
    assert "stdlib:os.py" in ids and "pydoc:assert" in ids
    assert len(docs) > 500


# ----------------------------------------------------------------------------- prepare


def test_prepare_end_to_end(tmp_path, corpus_dir):
    out = str(tmp_path / "store")
    report = prepare(PrepareConfig(out=out, source=str(corpus_dir), text_field="body", seq_len=32, num_proc=1),
                     verbose=False)
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["clean"]["dropped"] == {"invalid_utf8": 1, "binary": 1}
    assert stages["clean"]["docs_in"] == 8 and stages["pack_store"]["docs_out"] == 6
    assert stages["near_dedup"]["dropped"] == {}
    assert os.path.exists(os.path.join(out, "report.json"))

    store = open_store(out)
    tokenizer = store_tokenizer(store)
    assert store.metadata["tokenizer"]["hash"] == load_tokenizer("cl100k_base").file_hash
    assert [s["stage"] for s in store.metadata["stages"]][-1] == "pack_store"
    tokens, segments = store.read_rows(range(store.num_rows))
    text = tokenizer.decode(tokens[segments > 0].tolist())
    documents = text.split("<|endoftext|>")
    assert documents[-1] == ""  # every document ends with eos
    assert sorted(documents[:-1]) == sorted(distinct(seed) for seed in (1, 2, 10, 11, 12, 20))


def test_prepare_trains_bpe_on_the_embedded_corpus(tmp_path):
    out = str(tmp_path / "store")
    prepare(PrepareConfig(out=out, limit=150, tokenizer="bpe:1024", seq_len=64, num_proc=1), verbose=False)
    store = open_store(out)
    tokenizer = store_tokenizer(store)
    assert tokenizer.vocab_size == 1024 and store.metadata["tokenizer"]["file"].startswith("tokenizer/")
    tokens, segments = store.read_rows([0])
    assert tokens.max() < 1024 and segments[0, 0] == 1
    # a store written with one tokenizer refuses to be read as another's
    with pytest.raises(DataError, match="cl100k"):
        open_store(out, expected_tokenizer_hash=load_tokenizer("cl100k_base").file_hash,
                   expected_tokenizer_name="cl100k_base")


def test_prepare_bad_input(tmp_path, corpus_dir):
    with pytest.raises(DataError, match="seq_len must be a positive number of tokens, got 0"):
        PrepareConfig(out=str(tmp_path / "x"), seq_len=0)
    with pytest.raises(DataError, match="unknown tokenizer 'gpt5'"):
        PrepareConfig(out=str(tmp_path / "x"), tokenizer="gpt5")
    with pytest.raises(DataError, match="bpe:VOCAB_SIZE"):
        PrepareConfig(out=str(tmp_path / "x"), tokenizer="bpe:lots")
    empty = tmp_path / "shorts"
    empty.mkdir()
    (empty / "a.txt").write_text("tiny")
    with pytest.raises(DataError, match="no documents left after the filter stage"):
        prepare(PrepareConfig(out=str(tmp_path / "y"), source=str(empty), num_proc=1), verbose=False)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="already exists; refusing"):
        prepare(PrepareConfig(out=str(existing), source=str(corpus_dir), text_field="body", num_proc=1),
                verbose=False)
    assert (existing / "keep.txt").read_text() == "precious"


def test_cli_prepare_and_show(tmp_path):
    out = str(tmp_path / "store")
    cmd = [sys.executable, "-m", "meshlm", "data", "prepare", "--out", out, "--limit", "60", "--seq-len", "64",
           "--no-progress", "--num-proc", "2"]  # a fresh process without JAX: safe to fork workers
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "near_dedup" in result.stdout and "token store:" in result.stdout
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "already exists" in result.stderr
    shown = subprocess.run([sys.executable, "-m", "meshlm", "data", "show", out], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "tokenizer cl100k_base" in shown.stdout and "--- row 0" in shown.stdout
    missing = subprocess.run([sys.executable, "-m", "meshlm", "data", "prepare", "--out", out + "2", "--source",
                              str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no such file, directory or glob match" in missing.stderr


def test_unreadable_source_files_name_the_file_and_the_problem(tmp_path):
    """A record file that datasets/pyarrow cannot read, or a file of an extension no source reads, is a
    DataError naming the file (and for JSON lines, the line); the CLI prints it as one line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: not valid JSON \(Expecting value at column 10\)"):
        load_documents(str(bad))
    not_objects = tmp_path / "list.jsonl"
    not_objects.write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(DataError, match="list.jsonl: line 2: a JSON list, not an object"):
        load_documents(str(not_objects))
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: not readable as parquet records"):
        load_documents(str(parquet))
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"table.csv: the sources read .txt, .jsonl, .json, .parquet files"):
        load_documents(str(csv))


def test_filter_settings_are_data_errors():
    with pytest.raises(DataError, match="min_chars"):
        FilterConfig(min_chars=10, max_chars=5)
