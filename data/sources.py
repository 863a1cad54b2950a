"""Where documents come from: local files (`.txt`, `.jsonl`, `.parquet`, a
directory or a glob), a Hugging Face hub dataset when the network is there, and
an embedded corpus that every machine has — the running interpreter's standard
library (`.py` files) plus the English help texts in `pydoc_data.topics`.

Every source becomes a `datasets.Dataset` with two columns: `id` (where the
document came from) and `raw` (its bytes, undecoded: cleaning decides what is
valid text, so a bad file is counted, never a crash).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
from collections.abc import Iterator

import datasets
import pyarrow

from data.errors import DataError

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HUB_PREFIX = "hf:"


def stdlib_files() -> list[str]:
    """The `.py` files of the running interpreter's standard library, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if "site-packages" not in f and "dist-packages" not in f)


PYDOC = "pydoc:"


def _read(item: str, root: str | None) -> dict:
    """One document: a file's bytes, or a `pydoc:TOPIC` help text."""
    if item.startswith(PYDOC):
        import pydoc_data.topics

        text = pydoc_data.topics.topics[item[len(PYDOC):]]
        return {"id": item, "raw": text.encode("utf-8", "surrogatepass")}
    with open(item, "rb") as f:
        return {"id": "stdlib:" + os.path.relpath(item, root) if root else item, "raw": f.read()}


def _generate(items: list[str], stamps: list, root: str | None) -> Iterator[dict]:
    # datasets shards list arguments across workers; `stamps` only keys the cache
    for item in items:
        yield _read(item, root)


def _features() -> datasets.Features:
    return datasets.Features({"id": datasets.Value("string"), "raw": datasets.Value("binary")})


def _from_items(items: list[str], root: str | None = None) -> datasets.Dataset:
    """Dataset of files / pydoc topics; the cached copy is reused only while sizes and mtimes are unchanged."""
    stamps = [None if i.startswith(PYDOC) else (os.path.getsize(i), os.path.getmtime(i)) for i in items]
    return datasets.Dataset.from_generator(
        _generate, features=_features(), gen_kwargs={"items": items, "stamps": stamps, "root": root}
    )


def _records(files: list[str], builder: str, text_field: str) -> datasets.Dataset:
    # the builder logs its own account of a bad file; the DataError below names the file (and line) instead
    quiet = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        table = datasets.load_dataset(builder, data_files=files, split="train")
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as error:
        raise DataError(_unreadable(files, builder, error)) from error
    finally:
        quiet.setLevel(level)
    name = os.path.basename(files[0]) if len(files) == 1 else f"{len(files)} {builder} files"
    return _records_from_table(table, name, text_field)


def _unreadable(files: list[str], builder: str, error: Exception) -> str:
    """Why `datasets` could not read record files: the file, line and problem of the first bad JSON line
    found (`datasets` reports only pyarrow's row within a block), else what pyarrow said."""
    if builder == "json":
        for path in files:
            problem = _first_bad_json_line(path)
            if problem:
                return f"{path}: {problem}"
    cause = error.__cause__ or error
    return f"{', '.join(files) if len(files) <= 3 else f'{len(files)} {builder} files'}: not readable as " \
           f"{builder} records ({cause})"


def _first_bad_json_line(path: str) -> str | None:
    """'line N: ...' for the first line of a JSON-lines file that is not a JSON object (blank lines are
    allowed), or for a whole-file JSON document that does not parse; None when every line reads."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        json.loads(data)
        return None  # one JSON document (a .json file): its shape is pyarrow's complaint
    except ValueError:
        pass
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError as e:
            return f"line {number}: not UTF-8 text ({e.reason} at byte {e.start})"
        except json.JSONDecodeError as e:
            return f"line {number}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
        if not isinstance(record, dict):
            return f"line {number}: a JSON {type(record).__name__}, not an object; each line must be one JSON object"
    return None


def _expand(spec: str) -> list[str]:
    """A file, a directory (searched recursively) or a glob -> the files it names."""
    known = TEXT_SUFFIXES + tuple(RECORD_SUFFIXES)
    if os.path.isdir(spec):
        candidates = glob.glob(os.path.join(spec, "**", "*"), recursive=True)
    elif os.path.isfile(spec):
        if not spec.endswith(known):
            raise DataError(f"{spec}: the sources read {', '.join(known)} files (and a directory or glob of them)")
        return [spec]
    else:
        candidates = glob.glob(spec, recursive=True)
        if not candidates:
            raise DataError(f"no such file, directory or glob match: {spec!r}")
    return sorted(f for f in candidates if os.path.isfile(f) and f.endswith(known))


def load_documents(source: str = STDLIB, text_field: str = "text", limit: int | None = None) -> datasets.Dataset:
    """All documents of `source` as a Dataset with columns `id` and `raw`.

    source: "stdlib" (the embedded corpus), a path / directory / glob of `.txt`
    (one document per file), `.jsonl` or `.parquet` (one document per record,
    text in `text_field`), or "hf:NAME" / "hf:NAME:SPLIT" for a hub dataset
    (needs the network; never a default). `limit` keeps the first N documents.
    """
    if source == STDLIB:
        import pydoc_data.topics

        topics = [PYDOC + topic for topic in sorted(pydoc_data.topics.topics)]
        dataset = _from_items(stdlib_files() + topics, root=sysconfig.get_paths()["stdlib"])
    elif source.startswith(HUB_PREFIX):
        name, _, split = source[len(HUB_PREFIX):].partition(":")
        table = datasets.load_dataset(name, split=split or "train")
        dataset = _records_from_table(table, name, text_field)
    else:
        files = _expand(source)
        if not files:
            raise DataError(
                f"{source!r} holds no {', '.join(TEXT_SUFFIXES + tuple(RECORD_SUFFIXES))} files"
            )
        parts = []
        texts = [f for f in files if f.endswith(TEXT_SUFFIXES)]
        if texts:
            parts.append(_from_items(texts))
        for suffix, builder in RECORD_SUFFIXES.items():
            chosen = [f for f in files if f.endswith(suffix)]
            if chosen:
                parts.append(_records(chosen, builder, text_field))
        dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise DataError(f"source {source!r} has no documents")
    return dataset


def _records_from_table(table: datasets.Dataset, name: str, text_field: str) -> datasets.Dataset:
    if text_field not in table.column_names:
        raise DataError(
            f"{name}: records have no field {text_field!r} (fields: {', '.join(table.column_names)}); "
            "name the right one with --text-field"
        )

    def to_raw(batch, indices):
        return {"id": [f"{name}#{i}" for i in indices],
                "raw": [(t or "").encode("utf-8", "surrogatepass") for t in batch[text_field]]}

    return table.map(to_raw, batched=True, with_indices=True, remove_columns=table.column_names,
                     features=_features())
