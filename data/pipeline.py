"""`prepare`: raw documents -> clean -> filter -> exact dedup -> near dedup ->
tokenize -> pack -> token store, with a report of every stage.

    from data.pipeline import PrepareConfig, prepare
    report = prepare(PrepareConfig(out="runs/data/stdlib", tokenizer="bpe:8192", seq_len=256))

The same from the shell: `meshlm data prepare --out runs/data/stdlib --tokenizer bpe:8192`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections import Counter
from typing import Any

import datasets

from data.clean import FilterConfig, clean_text, quality_reason
from data.dedup import exact_dedup, near_dedup
from data.errors import DataError
from data.pack import Packer
from data.report import StageStats, format_table, timed
from data.sources import STDLIB, load_documents
from data.store import StoreWriter
from data.tokenizer import OFFICIAL, STORE_TOKENIZER_DIR, Tokenizer, load_tokenizer, sidecar_path, train_bpe

BPE_PREFIX = "bpe:"
REPORT_FILE = "report.json"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Everything that decides what a token store holds."""

    out: str
    source: str = STDLIB
    text_field: str = "text"
    limit: int | None = None  # keep the first N documents of the source
    tokenizer: str = "cl100k_base"  # cl100k_base | o200k_base | bpe:VOCAB (trained here) | path/to/file.tiktoken
    bpe_train_bytes: int = 20_000_000  # at most this much text trains a bpe:VOCAB tokenizer
    seq_len: int = 256
    drop_tail: bool = False  # drop the last, padded row instead of keeping it
    filter: FilterConfig = FilterConfig()
    near_dedup: bool = True
    dedup_threshold: float = 0.8
    num_proc: int = max(1, min(os.cpu_count() or 1, 8))
    overwrite: bool = False
    seed: int = 0

    @property
    def workers(self) -> int | None:
        """num_proc for datasets.map: None runs in this process (datasets forks a pool even for 1)."""
        return self.num_proc if self.num_proc > 1 else None

    def __post_init__(self):
        if isinstance(self.filter, dict):
            object.__setattr__(self, "filter", FilterConfig(**self.filter))
        if self.seq_len <= 0:
            raise DataError(f"seq_len must be a positive number of tokens, got {self.seq_len}")
        if self.limit is not None and self.limit <= 0:
            raise DataError(f"limit must be positive (or None for all documents), got {self.limit}")
        if not 0.0 < self.dedup_threshold < 1.0:
            raise DataError(f"dedup_threshold is a Jaccard similarity in (0, 1) (exact duplicates are always "
                            f"removed), got {self.dedup_threshold}")
        if self.tokenizer.startswith(BPE_PREFIX):
            _bpe_vocab(self.tokenizer)
        elif self.tokenizer not in OFFICIAL and not os.path.isfile(self.tokenizer):
            raise DataError(
                f"unknown tokenizer {self.tokenizer!r}: use one of {', '.join(OFFICIAL)}, bpe:VOCAB_SIZE "
                "(trained on the corpus, e.g. bpe:8192) or the path of a .tiktoken file"
            )


def _bpe_vocab(spec: str) -> int:
    try:
        vocab = int(spec[len(BPE_PREFIX):])
    except ValueError:
        vocab = 0
    if vocab <= 256:
        raise DataError(f"{spec!r}: write bpe:VOCAB_SIZE with a vocabulary above 256 bytes, e.g. bpe:8192")
    return vocab


# ----------------------------------------------------------------------------- stages


def _clean_batch(batch: dict) -> dict:
    texts, reasons = [], []
    for raw in batch["raw"]:
        text, reason = clean_text(raw)
        texts.append(text)
        reasons.append(reason or "")
    return {"text": texts, "reason": reasons, "nbytes": [len(t.encode("utf-8")) for t in texts]}


def _filter_batch(batch: dict, filter_config: FilterConfig) -> dict:
    return {"reason": [quality_reason(t, filter_config) for t in batch["text"]]}


def _keep_batch(batch: dict) -> list[bool]:
    return [not reason for reason in batch["reason"]]


def _raw_bytes(docs: datasets.Dataset) -> int:
    return sum(len(r) for r in docs.with_format("arrow")["raw"].to_pylist())


def _stage_clean(docs: datasets.Dataset, config: PrepareConfig) -> tuple[datasets.Dataset, StageStats]:
    stats = StageStats("clean", docs_in=len(docs), bytes_in=_raw_bytes(docs))
    with timed(stats):
        cleaned = docs.map(_clean_batch, batched=True, num_proc=config.workers, remove_columns=["raw"],
                           load_from_cache_file=False, desc="clean")
        stats.dropped = {k: v for k, v in Counter(cleaned["reason"]).items() if k}
        cleaned = cleaned.filter(_keep_batch, batched=True, load_from_cache_file=False).remove_columns("reason")
        stats.docs_out, stats.bytes_out = len(cleaned), sum(cleaned["nbytes"])
    return cleaned, stats


def _stage_filter(docs: datasets.Dataset, config: PrepareConfig) -> tuple[datasets.Dataset, StageStats]:
    stats = StageStats("filter", docs_in=len(docs), bytes_in=sum(docs["nbytes"]))
    with timed(stats):
        judged = docs.map(_filter_batch, batched=True, num_proc=config.workers, fn_kwargs={"filter_config":
                          config.filter}, load_from_cache_file=False, desc="filter")
        stats.dropped = {k: v for k, v in Counter(judged["reason"]).items() if k}
        kept = judged.filter(_keep_batch, batched=True, load_from_cache_file=False).remove_columns("reason")
        stats.docs_out, stats.bytes_out = len(kept), sum(kept["nbytes"])
    return kept, stats


def _stage_dedup(docs: datasets.Dataset, config: PrepareConfig, near: bool) -> tuple[datasets.Dataset, StageStats]:
    stats = StageStats("near_dedup" if near else "exact_dedup", docs_in=len(docs), bytes_in=sum(docs["nbytes"]))
    with timed(stats):
        if near:
            kept, info = near_dedup(docs, threshold=config.dedup_threshold, seed=config.seed,
                                    num_proc=config.workers)
            stats.extra = {"threshold": config.dedup_threshold, "clusters": info["clusters"]}
        else:
            kept, info = exact_dedup(docs, num_proc=config.workers)
        stats.dropped = {"duplicate": info["removed"]} if info["removed"] else {}
        stats.docs_out, stats.bytes_out = len(kept), sum(kept["nbytes"])
    return kept, stats


def _stage_tokenizer(docs: datasets.Dataset, config: PrepareConfig, workdir: str
                     ) -> tuple[Tokenizer, StageStats | None]:
    if not config.tokenizer.startswith(BPE_PREFIX):
        return load_tokenizer(config.tokenizer), None
    vocab = _bpe_vocab(config.tokenizer)
    texts, used = [], 0
    for text in docs["text"]:
        if used >= config.bpe_train_bytes:
            break
        texts.append(text)
        used += len(text.encode("utf-8"))
    stats = StageStats("train_bpe", docs_in=len(texts), bytes_in=used)
    with timed(stats):
        tokenizer = train_bpe(texts, vocab, os.path.join(workdir, f"bpe{vocab}.tiktoken"),
                              name=f"bpe{vocab}")
    stats.docs_out, stats.bytes_out = stats.docs_in, stats.bytes_in  # reads the text, changes nothing
    stats.extra = {"vocab_size": tokenizer.vocab_size}
    return tokenizer, stats


def _tokenize_batch(batch: dict, tokenizer: Tokenizer) -> dict:
    return {"ids": tokenizer.encode_batch(batch["text"], num_threads=1)}


def _stage_tokenize(docs: datasets.Dataset, tokenizer: Tokenizer, config: PrepareConfig
                    ) -> tuple[datasets.Dataset, StageStats]:
    stats = StageStats("tokenize", docs_in=len(docs), bytes_in=sum(docs["nbytes"]))
    with timed(stats):
        tokenized = docs.map(_tokenize_batch, batched=True, batch_size=64, num_proc=config.workers,
                             remove_columns=["text"], fn_kwargs={"tokenizer": tokenizer},
                             features=datasets.Features({"id": datasets.Value("string"),
                                                         "nbytes": datasets.Value("int64"),
                                                         "ids": datasets.Sequence(datasets.Value("int32"))}),
                             load_from_cache_file=False, desc="tokenize")
        tokens = sum(len(ids) for ids in tokenized.with_format("arrow")["ids"].to_pylist())
    stats.docs_out, stats.bytes_out = len(tokenized), stats.bytes_in
    stats.extra = {"tokens": tokens, "tokens_per_s": tokens / stats.seconds, "bytes_per_token":
                   round(stats.bytes_in / max(tokens, 1), 3)}
    return tokenized, stats


def _stage_pack_and_store(tokenized: datasets.Dataset, tokenizer: Tokenizer, config: PrepareConfig,
                          metadata: dict, extra_files: dict[str, bytes], earlier: list[StageStats]) -> StageStats:
    """Pack rows and write them; metadata.json (written last) gets every stage's counts, this one's included."""
    from tqdm.auto import tqdm

    row_len = config.seq_len + 1
    stats = StageStats("pack_store", docs_in=len(tokenized))
    start = time.perf_counter()
    with StoreWriter(config.out, config.seq_len, metadata, overwrite=config.overwrite) as writer:
        for name, data in extra_files.items():
            writer.add_file(name, data)
        packer = Packer(row_len, tokenizer.eos_id)
        batches = tokenized.select_columns(["ids"]).with_format("numpy").iter(batch_size=256)
        for batch in tqdm(batches, total=-(-len(tokenized) // 256), desc="pack + store", unit="batch", disable=None):
            for ids in batch["ids"]:
                packer.add(ids)
            if (rows := packer.full_rows()) is not None:
                writer.append(*rows)
        tail, padding, dropped = packer.tail(), 0, 0
        if tail is not None:
            real = int((tail[1] > 0).sum())
            if config.drop_tail:
                dropped = real
            else:
                writer.append(*tail)
                padding = row_len - real
        stats.docs_out = packer.documents
        stats.bytes_in = stats.bytes_out = writer.rows * row_len * 4 * 2  # tokens + segment ids, int32
        stats.extra = {"rows": writer.rows, "tokens_stored": writer.rows * row_len - padding,
                       "padding_tokens": padding, "tail_tokens_dropped": dropped}
        stats.seconds = time.perf_counter() - start
        writer.metadata["stages"] = [_stage_dict(s) for s in [*earlier, stats]]
    stats.seconds = time.perf_counter() - start  # now including the final flush and rename
    return stats


def _tokenizer_files(tokenizer: Tokenizer, config: PrepareConfig) -> dict[str, bytes]:
    """A trained tokenizer travels inside the store (its .tiktoken file and sidecar); official ones by name."""
    if tokenizer.source in OFFICIAL:
        return {}
    files = {}
    for path in (tokenizer.source, sidecar_path(tokenizer.source)):
        with open(path, "rb") as f:
            files[f"{STORE_TOKENIZER_DIR}/{os.path.basename(path)}"] = f.read()
    return files


def _stage_dict(stats: StageStats) -> dict:
    return _jsonable(dataclasses.asdict(stats))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _refuse_existing(config: PrepareConfig) -> None:
    """Fail before hours of work, not at the end: the writer checks again when it starts."""
    if os.path.exists(config.out) and (not os.path.isdir(config.out) or os.listdir(config.out)):
        if not config.overwrite:
            raise DataError(f"{config.out} already exists; refusing to write a token store over it. "
                            "Pass --overwrite (overwrite=True) to replace it, or choose another --out")


def _require_documents(docs: datasets.Dataset, stats: StageStats, config: PrepareConfig) -> None:
    if len(docs) == 0:
        raise DataError(f"no documents left after the {stats.stage} stage of {config.source!r} "
                        f"(dropped: {stats.dropped}); is the corpus empty, or the filter too strict?")


# ----------------------------------------------------------------------------- prepare


def tokenizer_record(tokenizer: Tokenizer, stored_as: str | None) -> dict:
    return {"name": tokenizer.name, "hash": tokenizer.file_hash, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "file": stored_as}


def prepare(config: PrepareConfig, verbose: bool = True) -> dict[str, Any]:
    """Run every stage and write the store at `config.out`; returns the report (also saved as report.json)."""
    _refuse_existing(config)
    started = time.perf_counter()
    stages: list[StageStats] = []
    source = StageStats("source")
    with timed(source):
        docs = load_documents(config.source, text_field=config.text_field, limit=config.limit)
    source.docs_in = source.docs_out = len(docs)
    source.bytes_in = source.bytes_out = _raw_bytes(docs)
    stages.append(source)

    for stage in (_stage_clean, _stage_filter):
        docs, stats = stage(docs, config)
        stages.append(stats)
        _require_documents(docs, stats, config)
    for near in ([False, True] if config.near_dedup else [False]):
        docs, stats = _stage_dedup(docs, config, near)
        stages.append(stats)

    with tempfile.TemporaryDirectory() as workdir:
        tokenizer, bpe_stats = _stage_tokenizer(docs, config, workdir)
        if bpe_stats is not None:
            stages.append(bpe_stats)
        extra_files = _tokenizer_files(tokenizer, config)
        tokenized, stats = _stage_tokenize(docs, tokenizer, config)
        stages.append(stats)
        stored_as = next((name for name in extra_files if name.endswith(".tiktoken")), None)
        metadata = {"tokenizer": tokenizer_record(tokenizer, stored_as), "sources": [config.source],
                    "config": _jsonable(dataclasses.asdict(config))}
        pack_stats = _stage_pack_and_store(tokenized, tokenizer, config, metadata, extra_files, stages)
    stages.append(pack_stats)

    report = {"out": config.out, "seconds": time.perf_counter() - started,
              "tokenizer": metadata["tokenizer"], "stages": [_stage_dict(s) for s in stages],
              "config": metadata["config"]}
    with open(os.path.join(config.out, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
    if verbose:
        print(format_table(stages))
        print(f"token store: {config.out} ({pack_stats.extra['rows']:,} rows of {config.seq_len + 1} tokens, "
              f"tokenizer {tokenizer.name}); report: {os.path.join(config.out, REPORT_FILE)}")
    return report
