"""The token store: round trips against the numpy arrays written, refusal to overwrite, overwrite,
interrupted writes (an exception, a killed process) that never leave a store that opens, and the
reader's errors (tokenizer mismatch, missing or incomplete store)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data.errors import DataError
from data.store import METADATA_FILE, StoreWriter, open_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 16
TOKENIZER = {"name": "test-bpe", "hash": "sha256:aaaa"}


def random_rows(rng: np.random.Generator, rows: int, seq_len: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment_ids), each int32 [rows, seq_len + 1]."""
    tokens = rng.integers(0, 2**31 - 1, (rows, seq_len + 1), dtype=np.int32)
    segment_ids = np.sort(rng.integers(0, 4, (rows, seq_len + 1), dtype=np.int32), axis=1)
    return tokens, segment_ids


def write(path, tokens, segment_ids, chunk_rows=7, overwrite=False, **layout) -> dict:
    """Write the rows in chunks of `chunk_rows`; returns the store's metadata."""
    metadata = {"tokenizer": TOKENIZER, "sources": ["unit-test"], "counts": {"documents": 3}}
    with StoreWriter(path, tokens.shape[1] - 1, metadata, overwrite=overwrite, **layout) as writer:
        for start in range(0, len(tokens), chunk_rows):
            writer.append(tokens[start:start + chunk_rows], segment_ids[start:start + chunk_rows])
    return open_store(path).metadata


def assert_store_holds(path, tokens, segment_ids) -> None:
    store = open_store(path)
    assert (store.num_rows, store.seq_len) == (len(tokens), tokens.shape[1] - 1)
    got_tokens, got_segments = store.read_rows(np.arange(len(tokens)))
    np.testing.assert_array_equal(got_tokens, tokens)
    np.testing.assert_array_equal(got_segments, segment_ids)


@pytest.mark.parametrize("rows, chunk_rows, layout", [
    (1, 1, {"rows_per_shard": 16, "rows_per_chunk": 4}),
    (53, 7, {"rows_per_shard": 16, "rows_per_chunk": 4}),  # 53 rows: 3 full shards and a partial one
    (53, 100, {"rows_per_shard": 16, "rows_per_chunk": 4}),  # one chunk bigger than a shard
    (70, 16, {"rows_per_shard": 8, "rows_per_chunk": 8}),
    (301, 64, {}),  # the default layout: all rows in one partial shard
])
def test_round_trip(tmp_path, rows, chunk_rows, layout):
    rng = np.random.default_rng(rows)
    tokens, segment_ids = random_rows(rng, rows)
    write(tmp_path / "store", tokens, segment_ids, chunk_rows, **layout)
    assert_store_holds(tmp_path / "store", tokens, segment_ids)
    store = open_store(tmp_path / "store")
    indices = np.concatenate([rng.permutation(rows), rng.integers(0, rows, 9)])  # any order, with repeats
    got_tokens, got_segments = store.read_rows(indices)
    np.testing.assert_array_equal(got_tokens, tokens[indices])
    np.testing.assert_array_equal(got_segments, segment_ids[indices])
    assert got_tokens.dtype == got_segments.dtype == np.int32
    assert os.listdir(tmp_path) == ["store"]  # no temporary directory left behind


def test_metadata_is_written_last_with_the_writers_fields(tmp_path):
    tokens, segment_ids = random_rows(np.random.default_rng(0), 20)
    metadata = write(tmp_path / "store", tokens, segment_ids)
    assert metadata["tokenizer"] == TOKENIZER and metadata["sources"] == ["unit-test"]
    assert metadata["counts"] == {"documents": 3}
    assert (metadata["rows"], metadata["seq_len"], metadata["dtype"]) == (20, SEQ_LEN, "int32")
    assert metadata["format_version"] == 1 and "created" in metadata
    with open(tmp_path / "store" / METADATA_FILE) as f:
        assert json.load(f) == metadata


def test_read_rows_out_of_range(tmp_path):
    tokens, segment_ids = random_rows(np.random.default_rng(0), 10)
    write(tmp_path / "store", tokens, segment_ids)
    with pytest.raises(DataError, match=r"\[0, 10\)"):
        open_store(tmp_path / "store").read_rows([3, 10])


def test_refuses_to_write_over_an_existing_store(tmp_path):
    tokens, segment_ids = random_rows(np.random.default_rng(0), 10)
    write(tmp_path / "store", tokens, segment_ids)
    with pytest.raises(DataError, match=r"store.*already exists.*overwrite=True.*--overwrite"):
        StoreWriter(tmp_path / "store", SEQ_LEN, {})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(DataError, match="other"):
        StoreWriter(tmp_path / "other", SEQ_LEN, {})
    assert_store_holds(tmp_path / "store", tokens, segment_ids)


def test_overwrite_replaces_the_store(tmp_path):
    rng = np.random.default_rng(0)
    write(tmp_path / "store", *random_rows(rng, 30))
    tokens, segment_ids = random_rows(rng, 11)
    write(tmp_path / "store", tokens, segment_ids, overwrite=True)
    assert_store_holds(tmp_path / "store", tokens, segment_ids)
    assert os.listdir(tmp_path) == ["store"]


def test_an_exception_in_the_with_block_leaves_no_store(tmp_path):
    rng = np.random.default_rng(0)
    tokens, segment_ids = random_rows(rng, 40)
    with pytest.raises(RuntimeError, match="source broke"):
        with StoreWriter(tmp_path / "new", SEQ_LEN, {}, rows_per_shard=8, rows_per_chunk=4) as writer:
            writer.append(tokens, segment_ids)  # five full shards are on disk
            raise RuntimeError("source broke")
    with pytest.raises(DataError, match="no token store"):
        open_store(tmp_path / "new")
    write(tmp_path / "old", tokens, segment_ids)
    with pytest.raises(RuntimeError, match="source broke"):
        with StoreWriter(tmp_path / "old", SEQ_LEN, {}, overwrite=True) as writer:
            writer.append(*random_rows(rng, 5))
            raise RuntimeError("source broke")
    assert_store_holds(tmp_path / "old", tokens, segment_ids)
    assert sorted(os.listdir(tmp_path)) == ["old"]


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from data.store import StoreWriter
    writer = StoreWriter(sys.argv[1], 16, {}, overwrite=True, rows_per_shard=8, rows_per_chunk=4)
    rng = np.random.default_rng(1)
    for _ in range(4):
        writer.append(rng.integers(0, 100, (8, 17)), np.ones((8, 17), np.int32))
    print("wrote 4 shards", flush=True)
    time.sleep(60)
""")


def kill_mid_write(path) -> None:
    """Run a writer in another process and SIGKILL it after it has written shards, before close()."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "wrote 4 shards"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_write_leaves_no_store_that_opens(tmp_path):
    kill_mid_write(tmp_path / "new")
    assert any(name.startswith(".new.tmp-") for name in os.listdir(tmp_path))  # the partial write is there ...
    with pytest.raises(DataError, match=r"incomplete store.*interrupted.*--overwrite"):
        open_store(tmp_path / "new")  # ... and refused


def test_a_killed_overwrite_leaves_the_old_store_intact(tmp_path):
    tokens, segment_ids = random_rows(np.random.default_rng(0), 25)
    write(tmp_path / "store", tokens, segment_ids)
    kill_mid_write(tmp_path / "store")
    assert_store_holds(tmp_path / "store", tokens, segment_ids)


def test_a_store_without_metadata_is_incomplete(tmp_path):
    tokens, segment_ids = random_rows(np.random.default_rng(0), 10)
    write(tmp_path / "store", tokens, segment_ids)
    metadata = tmp_path / "store" / METADATA_FILE
    metadata.write_text(metadata.read_text()[:40])  # cut short
    with pytest.raises(DataError, match=r"incomplete store.*not valid JSON.*interrupted.*--overwrite"):
        open_store(tmp_path / "store")
    metadata.unlink()
    with pytest.raises(DataError, match=r"incomplete store.*no metadata.json.*interrupted.*--overwrite"):
        open_store(tmp_path / "store")


def test_tokenizer_mismatch_names_both_tokenizers(tmp_path):
    tokens, segment_ids = random_rows(np.random.default_rng(0), 10)
    write(tmp_path / "store", tokens, segment_ids)
    assert open_store(tmp_path / "store", expected_tokenizer_hash="sha256:aaaa").num_rows == 10
    with pytest.raises(DataError, match=r"another tokenizer than the one asked for.*test-bpe \(hash sha256:aaaa\).*"
                                        r"gpt2 \(hash sha256:bbbb\)"):
        open_store(tmp_path / "store", expected_tokenizer_hash="sha256:bbbb", expected_tokenizer_name="gpt2")


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"no token store at .*nowhere.*run prepare"):
        open_store(tmp_path / "nowhere")


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(DataError, match="JSON"):
        StoreWriter(tmp_path / "a", SEQ_LEN, {"config": object()})
    with pytest.raises(DataError, match=r"seq_len=8.*seq_len=16"):
        StoreWriter(tmp_path / "a", SEQ_LEN, {"seq_len": 8})
    with StoreWriter(tmp_path / "a", SEQ_LEN, {}) as writer:
        writer.append(*random_rows(np.random.default_rng(0), 2))
        with pytest.raises(DataError, match=r"\[rows, 17\].*\(2, 9\)"):
            writer.append(np.zeros((2, 9), np.int32), np.zeros((2, 9), np.int32))
        with pytest.raises(DataError, match="integers"):
            writer.append(np.zeros((2, 17), np.float32), np.zeros((2, 17), np.int32))
    with pytest.raises(DataError, match="no rows were appended"):
        with StoreWriter(tmp_path / "empty", SEQ_LEN, {}):
            pass
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_kvstore_url(tmp_path):
    """A URL goes to tensorstore as a kvstore spec (memory:// here; gs:// and s3:// the same way)."""
    rng = np.random.default_rng(0)
    url = f"memory://{tmp_path.name}/store"
    write(url, *random_rows(rng, 12), chunk_rows=5)
    with pytest.raises(DataError, match="overwrite=True"):
        StoreWriter(url, SEQ_LEN, {})
    writer = StoreWriter(url, SEQ_LEN, {}, overwrite=True)
    with pytest.raises(DataError, match="incomplete store"):  # an unfinished overwrite reads as incomplete
        open_store(url)
    tokens, segment_ids = random_rows(rng, 9)
    writer.append(tokens, segment_ids)
    writer.close()
    assert_store_holds(url, tokens, segment_ids)
