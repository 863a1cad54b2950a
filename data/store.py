"""The token store: packed rows on disk as two zarr v3 arrays written with tensorstore.

A store is a directory (or any tensorstore kvstore URL: gs://, s3://, file://) holding

    tokens/        int32 [rows, seq_len + 1]  token ids, PAD_ID in padding
    segment_ids/   int32 [rows, seq_len + 1]  1, 2, ... per document within a row, 0 for padding
    metadata.json  the caller's description (tokenizer, sources, counts, config) plus rows,
                   seq_len, dtype, format version and creation time — written LAST

Arrays are stored in shards (zarr v3 "sharding_indexed") of `rows_per_shard` rows, each shard a
grid of zstd-compressed inner chunks of `rows_per_chunk` rows, so a random row costs one small
read. `StoreWriter` appends chunks as they come, holding at most one shard (plus the last chunk) in memory.

A store without a complete metadata.json is incomplete and refused by `open_store`. For a local
path the writer builds the store in a temporary sibling directory and renames it into place at the
end, so an interrupted write leaves nothing that looks like a store (and the store it overwrites
stays intact until the new one is complete). For a URL it deletes any old metadata.json first and
writes the new one last.

Tokenizer convention: the caller's metadata names its tokenizer as
`{"tokenizer": {"name": ..., "hash": ...}}`; `open_store(expected_tokenizer_hash=...)` checks it.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid
from typing import Any

import numpy as np
import tensorstore as ts

from data.errors import DataError

FORMAT = "meshlm-token-store"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ARRAYS = ("tokens", "segment_ids")
DTYPE = np.int32
SHARD_BYTES = 32 << 20  # uncompressed bytes of one array's shard (default rows_per_shard)
CHUNK_BYTES = 16 << 10  # uncompressed bytes of one inner chunk (default rows_per_chunk): one small read
CACHE_BYTES = 64 << 20  # tensorstore's cache: keeps shard indexes in memory
# keys the writer sets itself; the caller's metadata may not disagree with them
_WRITER_KEYS = ("format", "format_version", "rows", "seq_len", "dtype", "created", "layout")


# ---------------------------------------------------------------------------------------------- paths


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str | os.PathLike) -> str | None:
    """The local directory of `path`, or None for a remote kvstore URL."""
    path = os.fspath(path)
    if _is_url(path):
        return None
    return os.path.abspath(path[len("file://"):] if path.startswith("file://") else path)


def _kvstore(location: str) -> ts.KvStore.Spec:
    """A kvstore spec for a local directory or a URL, with a trailing slash (a directory)."""
    if _is_url(location):
        spec = ts.KvStore.Spec(location)
        if not spec.path.endswith("/"):
            spec.path += "/"
        return spec
    return ts.KvStore.Spec({"driver": "file", "path": location.rstrip("/") + "/"})


def _array_spec(root: ts.KvStore.Spec, name: str) -> dict:
    return {"driver": "zarr3", "kvstore": (root / f"{name}/").to_json()}


_CONTEXT: ts.Context | None = None


def _context() -> ts.Context:
    """One tensorstore context per process: a shared cache pool (shard indexes) and kvstore connections."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": CACHE_BYTES}})
    return _CONTEXT


def _open_kv(root: ts.KvStore.Spec) -> ts.KvStore:
    return ts.KvStore.open(root, context=_context()).result()


# ---------------------------------------------------------------------------------------------- writer


def default_layout(seq_len: int) -> tuple[int, int]:
    """(rows_per_shard, rows_per_chunk) for rows of seq_len + 1 int32 tokens."""
    row_bytes = (seq_len + 1) * np.dtype(DTYPE).itemsize
    rows_per_chunk = 1 << max(0, (CHUNK_BYTES // row_bytes).bit_length() - 1)  # a power of two
    rows_per_shard = rows_per_chunk * max(1, SHARD_BYTES // row_bytes // rows_per_chunk)
    return rows_per_shard, rows_per_chunk


def _create_spec(root: ts.KvStore.Spec, name: str, row_len: int, rows_per_shard: int, rows_per_chunk: int) -> dict:
    """A new, empty zarr v3 array [0, row_len] of sharded, zstd-compressed int32; grows by resize."""
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "zstd", "configuration": {"level": 3}}]
    index = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    sharding = {"name": "sharding_indexed",
                "configuration": {"chunk_shape": [rows_per_chunk, row_len], "codecs": inner, "index_codecs": index}}
    metadata = {"shape": [0, row_len], "data_type": np.dtype(DTYPE).name,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows_per_shard, row_len]}},
                "chunk_key_encoding": {"name": "default"}, "fill_value": 0, "codecs": [sharding],
                "dimension_names": ["rows", "length"]}
    return {**_array_spec(root, name), "metadata": metadata, "create": True, "delete_existing": True}


class StoreWriter:
    """Appends packed chunks to a new token store; the store exists only once `close()` succeeds.

        with StoreWriter(path, seq_len, {"tokenizer": {"name": ..., "hash": ...}, ...}) as writer:
            for tokens, segment_ids in pack(documents, seq_len, eos_id):   # each [rows, seq_len + 1]
                writer.append(tokens, segment_ids)

    An exception inside the `with` block discards everything written. Rows are buffered up to one
    shard (`rows_per_shard`) and written whole shards at a time.
    """

    def __init__(self, path: str | os.PathLike, seq_len: int, metadata: dict[str, Any], overwrite: bool = False,
                 rows_per_shard: int | None = None, rows_per_chunk: int | None = None):
        self.path, self.seq_len, self.overwrite = os.fspath(path), int(seq_len), overwrite
        self.metadata = _check_caller_metadata(metadata, self.seq_len)
        self.rows_per_shard, self.rows_per_chunk = _check_layout(self.seq_len, rows_per_shard, rows_per_chunk)
        self.rows = 0  # rows appended so far
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._closed = False
        self._target = _local(self.path)
        if self._target is not None:  # build in a temporary sibling; rename into place at the end
            self._refuse_existing_local()
            parent, name = os.path.split(self._target)
            os.makedirs(parent, exist_ok=True)
            self._location = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        else:  # remote: write in place; without metadata.json it reads as incomplete
            self._location = self.path
            self._prepare_remote()
        root = _kvstore(self._location)
        row_len = self.seq_len + 1
        specs = [_create_spec(root, name, row_len, self.rows_per_shard, self.rows_per_chunk) for name in ARRAYS]
        self._arrays = [ts.open(spec, context=_context()).result() for spec in specs]

    # -- public

    def append(self, tokens: np.ndarray, segment_ids: np.ndarray) -> None:
        """Add rows: tokens and segment_ids, each [rows, seq_len + 1] integers."""
        if self._closed:
            raise DataError(f"store writer for {self.path} is closed; open a new StoreWriter to write more rows")
        tokens, segment_ids = _check_chunk(tokens, segment_ids, self.seq_len)
        if len(tokens) == 0:
            return
        self._buffer.append((tokens, segment_ids))
        self._buffered += len(tokens)
        self.rows += len(tokens)
        while self._buffered >= self.rows_per_shard:
            self._write_buffered(self.rows_per_shard)

    def add_file(self, name: str, data: bytes) -> None:
        """Store a small extra file (e.g. the trained tokenizer) in the store, written before metadata.json."""
        if self._closed:
            raise DataError(f"store writer for {self.path} is closed")
        if name == METADATA_FILE or name.split("/")[0] in ARRAYS:
            raise DataError(f"{name!r} is reserved in a token store; choose another file name")
        _open_kv(_kvstore(self._location)).write(name, data).result()

    def close(self) -> dict[str, Any]:
        """Write the last rows and metadata.json, then move the store into place; returns the metadata."""
        if self._closed:
            raise DataError(f"store writer for {self.path} is already closed")
        try:
            if self.rows == 0:
                raise DataError(f"no rows were appended to the store {self.path}; is the source empty? "
                                "nothing was written")
            if self._buffered:
                self._write_buffered(self._buffered)
            metadata = self._full_metadata()
            self._write_metadata(metadata)
            if self._target is not None:
                _move_into_place(self._location, self._target, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return metadata

    def abort(self) -> None:
        """Discard the write: remove the temporary directory (local); a remote store stays incomplete."""
        self._closed = True
        self._arrays = []
        if self._target is not None:
            shutil.rmtree(self._location, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self.abort()

    # -- internals

    def _refuse_existing_local(self) -> None:
        target = self._target
        exists = os.path.isfile(target) or (os.path.isdir(target) and os.listdir(target))
        if exists and not self.overwrite:
            raise DataError(f"{self.path} already exists; refusing to write a token store over it. "
                            "Pass overwrite=True (prepare --overwrite) to replace it, or choose another path")

    def _prepare_remote(self) -> None:
        kv = _open_kv(_kvstore(self.path))
        if kv.list().result():
            if not self.overwrite:
                raise DataError(f"{self.path} already holds data; refusing to write a token store over it. "
                                "Pass overwrite=True (prepare --overwrite) to replace it, or choose another path")
            kv.delete_range(ts.KvStore.KeyRange(METADATA_FILE, METADATA_FILE + "\0")).result()

    def _write_buffered(self, rows: int) -> None:
        """Write the first `rows` buffered rows at the end of both arrays, growing them by resize."""
        tokens, segments = (np.concatenate(parts) for parts in zip(*self._buffer, strict=True))
        start = self.rows - self._buffered
        stop = start + rows
        futures = []
        for i, (array, values) in enumerate(zip(self._arrays, (tokens, segments), strict=True)):
            self._arrays[i] = array = array.resize(exclusive_max=[stop, None], expand_only=True).result()
            futures.append(array[start:stop].write(values[:rows]))
        for future in futures:
            future.result()
        self._buffered -= rows
        self._buffer = [(tokens[rows:], segments[rows:])] if self._buffered else []

    def _full_metadata(self) -> dict[str, Any]:
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        layout = {"rows_per_shard": self.rows_per_shard, "rows_per_chunk": self.rows_per_chunk,
                  "codec": "zarr3 sharding_indexed + zstd", "arrays": list(ARRAYS)}
        return {**self.metadata, "format": FORMAT, "format_version": FORMAT_VERSION, "rows": self.rows,
                "seq_len": self.seq_len, "dtype": np.dtype(DTYPE).name, "created": created, "layout": layout}

    def _write_metadata(self, metadata: dict[str, Any]) -> None:
        data = json.dumps(metadata, indent=2, sort_keys=True).encode()
        if self._target is None:
            _open_kv(_kvstore(self._location)).write(METADATA_FILE, data).result()
            return
        path = os.path.join(self._location, METADATA_FILE)
        with open(path + ".part", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".part", path)


def _check_caller_metadata(metadata: dict[str, Any], seq_len: int) -> dict[str, Any]:
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    if not isinstance(metadata, dict):
        raise DataError(f"store metadata must be a dict, got {type(metadata).__name__}")
    try:
        metadata = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as e:
        raise DataError(f"store metadata must be JSON-serialisable (str/int/float/bool/list/dict): {e}") from e
    if metadata.get("seq_len", seq_len) != seq_len:
        raise DataError(f"metadata says seq_len={metadata['seq_len']} but the writer was given seq_len={seq_len}")
    return {k: v for k, v in metadata.items() if k not in _WRITER_KEYS}


def _check_layout(seq_len: int, rows_per_shard: int | None, rows_per_chunk: int | None) -> tuple[int, int]:
    default_shard, default_chunk = default_layout(seq_len)
    chunk = default_chunk if rows_per_chunk is None else int(rows_per_chunk)
    shard = (chunk * max(1, default_shard // chunk)) if rows_per_shard is None else int(rows_per_shard)
    if chunk < 1 or shard < 1 or shard % chunk:
        raise DataError(f"rows_per_shard ({shard}) must be a positive multiple of rows_per_chunk ({chunk})")
    return shard, chunk


def _check_chunk(tokens: np.ndarray, segment_ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate one appended chunk; returns both as int32 [rows, seq_len + 1]."""
    tokens, segment_ids = np.asarray(tokens), np.asarray(segment_ids)
    row_len = seq_len + 1
    for name, a in (("tokens", tokens), ("segment_ids", segment_ids)):
        if a.ndim != 2 or a.shape[1] != row_len:
            raise DataError(f"{name} must be [rows, seq_len + 1] = [rows, {row_len}], got shape {a.shape}; "
                            "was the data packed with another seq_len?")
        if not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{name} must be integers, got dtype {a.dtype}")
        info = np.iinfo(DTYPE)
        if a.size and (a.min() < 0 or a.max() > info.max):
            raise DataError(f"{name} must lie in [0, {info.max}], got values in [{a.min()}, {a.max()}]")
    if tokens.shape != segment_ids.shape:
        raise DataError(f"tokens {tokens.shape} and segment_ids {segment_ids.shape} must have the same shape")
    return tokens.astype(DTYPE, copy=False), segment_ids.astype(DTYPE, copy=False)


def _move_into_place(location: str, target: str, overwrite: bool) -> None:
    """Rename the finished temporary directory to `target`; an old store is removed only afterwards."""
    parent, name = os.path.split(target)
    old = None
    if os.path.lexists(target):
        if not (overwrite or (os.path.isdir(target) and not os.listdir(target))):
            raise DataError(f"{target} appeared while the store was being written; refusing to replace it. "
                            "Pass overwrite=True (prepare --overwrite) to replace it")
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    os.rename(location, target)
    _fsync_dir(parent)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- reader


class TokenStore:
    """A complete token store opened for reading. Use `open_store`."""

    def __init__(self, path: str, metadata: dict[str, Any], tokens: ts.TensorStore, segment_ids: ts.TensorStore):
        self.path, self.metadata = path, metadata
        self._tokens, self._segment_ids = tokens, segment_ids

    @property
    def num_rows(self) -> int:
        return int(self.metadata["rows"])

    @property
    def seq_len(self) -> int:
        return int(self.metadata["seq_len"])

    def read_rows(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Rows at `indices` (any order, repeats allowed) -> (tokens, segment_ids), each int32 [n, seq_len + 1]."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise DataError(f"row indices must lie in [0, {self.num_rows}) for the store {self.path}, "
                            f"got [{indices.min()}, {indices.max()}]")
        unique, inverse = np.unique(indices, return_inverse=True)  # sorted: reads walk each shard in order
        futures = [array[unique].read() for array in (self._tokens, self._segment_ids)]
        tokens, segment_ids = (future.result() for future in futures)
        if len(unique) == len(indices) and np.array_equal(unique, indices):
            return tokens, segment_ids
        return tokens[inverse], segment_ids[inverse]

    def read_file(self, name: str) -> bytes:
        """An extra file stored with `StoreWriter.add_file`."""
        value = _open_kv(_kvstore(self.path)).read(name).result()
        if value.state != "value":
            raise DataError(f"token store {self.path} has no file {name!r}")
        return bytes(value.value)

    def __repr__(self) -> str:
        return f"TokenStore({self.path!r}, rows={self.num_rows}, seq_len={self.seq_len})"


def open_store(path: str | os.PathLike, expected_tokenizer_hash: str | None = None,
               expected_tokenizer_name: str | None = None) -> TokenStore:
    """Open a complete token store; with `expected_tokenizer_hash`, refuse one written with another tokenizer."""
    path = os.fspath(path)
    local = _local(path)
    if local is not None and not os.path.isdir(local):
        raise DataError(_missing_message(path, local))
    root = _kvstore(local if local is not None else path)
    metadata = _read_metadata(path, root)
    if expected_tokenizer_hash is not None:
        _check_tokenizer(path, metadata, expected_tokenizer_hash, expected_tokenizer_name)
    arrays = [ts.open(_array_spec(root, name), read=True, write=False, open=True, context=_context(),
                      recheck_cached_data="open", recheck_cached_metadata="open") for name in ARRAYS]
    try:
        tokens, segment_ids = (future.result() for future in arrays)
    except ValueError as e:
        raise DataError(f"the token store {path} has metadata.json but its arrays cannot be opened ({e}); "
                        "re-run prepare with --overwrite") from e
    expected = (metadata["rows"], metadata["seq_len"] + 1)
    for name, array in (("tokens", tokens), ("segment_ids", segment_ids)):
        if tuple(array.shape) != expected or array.dtype.numpy_dtype != DTYPE:
            raise DataError(f"the token store {path} is inconsistent: {name} is {array.dtype} {tuple(array.shape)}, "
                            f"metadata.json says int32 {expected}; re-run prepare with --overwrite")
    return TokenStore(path, metadata, tokens, segment_ids)


def _missing_message(path: str, local: str) -> str:
    if os.path.exists(local):
        return f"{path} is not a directory, so not a token store; pass the directory written by prepare"
    parent, name = os.path.split(local)
    leftovers = [f for f in os.listdir(parent) if f.startswith(f".{name}.tmp-")] if os.path.isdir(parent) else []
    if leftovers:
        return (f"no token store at {path}, only an unfinished write ({os.path.join(parent, leftovers[0])}): "
                "incomplete store; was the write interrupted? re-run prepare with --overwrite "
                "(and delete the leftover directory)")
    return f"no token store at {path}; run prepare to write one, or check the path"


def _read_metadata(path: str, root: ts.KvStore.Spec) -> dict[str, Any]:
    incomplete = (f"incomplete store at {path}: {{}}; was the write interrupted? "
                  "re-run prepare with --overwrite")
    try:
        result = _open_kv(root).read(METADATA_FILE).result()
    except ValueError as e:
        raise DataError(f"cannot read {METADATA_FILE} of the token store {path}: {e}") from e
    if result.state != "value":
        raise DataError(incomplete.format(f"no {METADATA_FILE}"))
    try:
        metadata = json.loads(bytes(result.value))
    except ValueError as e:
        raise DataError(incomplete.format(f"{METADATA_FILE} is not valid JSON ({e})")) from e
    missing = [k for k in ("format", "format_version", "rows", "seq_len") if k not in metadata]
    if missing or metadata.get("format") != FORMAT:
        raise DataError(incomplete.format(f"{METADATA_FILE} lacks {missing or ['format=' + FORMAT]}"))
    if metadata["format_version"] > FORMAT_VERSION:
        raise DataError(f"the token store {path} has format version {metadata['format_version']}, this code reads "
                        f"up to {FORMAT_VERSION}; update meshlm or re-run prepare with --overwrite")
    return metadata


def tokenizer_of(metadata: dict[str, Any]) -> tuple[str | None, str | None]:
    """(name, hash) of the tokenizer a store's metadata records, None where absent."""
    tokenizer = metadata.get("tokenizer")
    if not isinstance(tokenizer, dict):
        return None, None
    return tokenizer.get("name"), tokenizer.get("hash")


def _check_tokenizer(path: str, metadata: dict[str, Any], expected_hash: str, expected_name: str | None) -> None:
    name, digest = tokenizer_of(metadata)
    if digest == expected_hash:
        return
    asked = f"{expected_name or 'tokenizer'} (hash {expected_hash})"
    if digest is None:
        raise DataError(f"the token store {path} records no tokenizer hash (metadata['tokenizer']['hash']), "
                        f"so it cannot be checked against {asked}; re-run prepare with --overwrite")
    raise DataError(f"the token store {path} was written with another tokenizer than the one asked for: "
                    f"store has {name} (hash {digest}), asked for {asked}. Re-run prepare with this tokenizer "
                    "(--overwrite) or use the tokenizer the store was written with")
