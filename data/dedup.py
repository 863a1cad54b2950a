"""Deduplication stage of the data pipeline: drop exact and near-duplicate documents, keeping the first of each.

Input is cleaned text (NFC, "\\n" newlines). Both passes keep the first occurrence in input order and drop later
copies, so the result is deterministic.

Exact dedup hashes a normal form of the text: trailing whitespace of every line removed and leading/trailing
blank lines dropped. Indentation and inner spacing are kept (they are content in code); case is kept.

Near dedup estimates Jaccard similarity of shingle sets with MinHash and finds candidate pairs with LSH
(datasketch's `MinHashLSH`), then confirms each candidate with the exact Jaccard of the two shingle sets:

- Shingles are word n-grams (default 5) of the lower-cased `\\w+` tokens, punctuation dropped — the choice of
  BigCode and text-dedup for code. Character n-grams were rejected: every Python file shares the same short
  grams (`self.`, `retur`, `def _`, indentation), which lifts the similarity of unrelated files. Among 400
  sampled stdlib files (exact duplicates removed), char 5-grams put 13 pairs at Jaccard >= 0.8 (e.g. different
  codec tables), char 9-grams 8, word 5-grams 1 (two identical `__main__.py` stubs). A text with fewer than
  `ngram` tokens is one shingle; a text with no tokens has none and is always kept (exact dedup handles those).
- A shingle is hashed once (xxh32 of its UTF-8 bytes); the signature is the minimum over `num_perm` affine
  permutations `a*h + b mod 2^32` of the MurmurHash3-premixed hash, computed with numpy: the same values as
  datasketch's default "affine32" scheme (tested), without its per-shingle Python loop.
- LSH bands x rows come from datasketch's optimiser over the S-curve with false negatives weighted 19x false
  positives: a false positive costs one exact Jaccard check, a false negative is a duplicate left in. At 0.8
  and 128 permutations this is 16 bands of 8 rows: a pair at Jaccard 0.8 becomes a candidate with p = 0.95,
  at 0.85 with p = 0.994.
- A document is dropped when its exact Jaccard with an earlier *kept* document is >= threshold (greedy, in input
  order), so every dropped document has a kept one at least that similar; chains A~B~C with A !~ C keep C.

All shingle sets stay in memory during the pass (4 bytes a shingle, about 0.4x the text size for code):
fine here, a limit for corpora larger than RAM.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence

import datasets
import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

from data.errors import DataError

TOKEN = re.compile(r"\w+")
LSH_WEIGHTS = (0.05, 0.95)  # (false positive, false negative) weights for choosing bands x rows
CHUNK = 8192  # shingles permuted at a time: bounds memory at CHUNK * num_perm * 4 bytes
MAX_HASH = np.uint32(0xFFFFFFFF)


# ---- exact duplicates ----


def normalise_for_hash(text: str) -> str:
    """The text that exact dedup compares: trailing whitespace of each line and outer blank lines removed."""
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def exact_hash(text: str) -> bytes:
    """16-byte BLAKE2b digest of the normalised text."""
    data = normalise_for_hash(text).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).digest()


def exact_duplicate_mask(texts: Sequence[str]) -> list[bool]:
    """Keep-mask: True for the first occurrence of each normalised text, False for later copies."""
    _check_texts(texts)
    return _first_occurrences([exact_hash(t) for t in texts])


def _first_occurrences(hashes: Sequence[bytes]) -> list[bool]:
    seen: set[bytes] = set()
    keep = []
    for h in hashes:
        keep.append(h not in seen)
        seen.add(h)
    return keep


def exact_dedup(ds: datasets.Dataset, column: str = "text", num_proc: int | None = None
                ) -> tuple[datasets.Dataset, dict]:
    """Drop rows whose normalised `column` text equals an earlier row's; other columns are kept.

    Returns the filtered dataset and stats: documents_in, documents_out, removed.
    """
    _check_dataset(ds, column)
    hashed = ds.map(_hash_batch, batched=True, with_indices=True, fn_kwargs={"column": column},
                    remove_columns=ds.column_names, num_proc=num_proc, keep_in_memory=True, desc="exact hashes")
    keep = _first_occurrences(hashed["hash"] if len(ds) else [])
    return _select(ds, keep), _counts(keep)


def _hash_batch(batch: dict, indices: list[int], column: str) -> dict:
    return {"hash": [exact_hash(t) for t in _batch_texts(batch, indices, column)]}


# ---- near duplicates ----


def shingles(text: str, ngram: int = 5) -> list[str]:
    """Word n-grams of the lower-cased `\\w+` tokens, joined by a space (one shingle if fewer tokens than ngram)."""
    tokens = TOKEN.findall(text.lower())
    if not tokens:
        return []
    starts = range(max(len(tokens) - ngram, 0) + 1)
    return [" ".join(tokens[i:i + ngram]) for i in starts]


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """The shingle set as sorted unique xxh32 hashes.  # [shingles] uint32"""
    grams = shingles(text, ngram)
    hashes = np.fromiter((xxhash.xxh32_intdigest(g.encode("utf-8", "surrogatepass")) for g in grams),
                         dtype=np.uint32, count=len(grams))
    return np.unique(hashes)


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> np.ndarray:
    """datasketch's affine32 permutation parameters (a odd, b).  # [2, num_perm] uint32"""
    return MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 finalizer, a bijection on uint32 that spreads the input bits (datasketch's pre-mix)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_signature(hashes: np.ndarray, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """MinHash of a set of uint32 hashes: per permutation, the minimum of a*fmix(h) + b mod 2^32.

    Equals `datasketch.MinHash(num_perm, seed, hashfunc=int).update_batch(hashes)`.  # [num_perm] uint32
    """
    a, b = _permutations(num_perm, seed)
    mixed = _fmix32(np.asarray(hashes, dtype=np.uint32))
    signature = np.full(num_perm, MAX_HASH, dtype=np.uint32)
    for start in range(0, len(mixed), CHUNK):
        permuted = mixed[start:start + CHUNK, None] * a + b  # [chunk, num_perm], wraps mod 2^32
        signature = np.minimum(signature, permuted.min(axis=0))
    return signature


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays (0 when both are empty)."""
    if len(a) + len(b) == 0:
        return 0.0
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common)


def near_duplicate_mask(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                        seed: int = 0) -> list[bool]:
    """Keep-mask: False for each text whose shingle Jaccard with an earlier kept text is >= threshold."""
    _check_texts(texts)
    _check_near_args(threshold, num_perm, ngram, seed)
    sets = [shingle_hashes(t, ngram) for t in texts]
    signatures = [minhash_signature(s, num_perm, seed) for s in sets]
    return _near_keep(sets, signatures, threshold, num_perm, seed)[0]


def near_dedup(ds: datasets.Dataset, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 0,
               num_proc: int | None = None, column: str = "text") -> tuple[datasets.Dataset, dict]:
    """Drop rows that are near-duplicates (shingle Jaccard >= threshold) of an earlier kept row.

    Shingling and MinHash run in `ds.map` (parallel with num_proc); the LSH pass is sequential. Returns the
    filtered dataset (other columns kept) and stats: documents_in, documents_out, removed, clusters (kept
    documents that absorbed at least one duplicate), candidates (LSH candidate pairs checked exactly),
    rejected (of those, below threshold), bands, rows and the arguments.
    """
    _check_dataset(ds, column)
    _check_near_args(threshold, num_perm, ngram, seed)
    features = datasets.Features({"shingles": datasets.Sequence(datasets.Value("uint32")),
                                  "signature": datasets.Sequence(datasets.Value("uint32"))})
    sketched = ds.map(_sketch_batch, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
                      fn_kwargs={"column": column, "ngram": ngram, "num_perm": num_perm, "seed": seed},
                      num_proc=num_proc, keep_in_memory=True, desc="minhash").with_format("numpy")
    sets = list(sketched["shingles"]) if len(ds) else []  # map on no rows adds no columns
    signatures = list(sketched["signature"]) if len(ds) else []
    keep, stats = _near_keep(sets, signatures, threshold, num_perm, seed)
    stats |= {"threshold": threshold, "num_perm": num_perm, "ngram": ngram, "seed": seed}
    return _select(ds, keep), stats


def _sketch_batch(batch: dict, indices: list[int], column: str, ngram: int, num_perm: int, seed: int) -> dict:
    sets = [shingle_hashes(t, ngram) for t in _batch_texts(batch, indices, column)]
    return {"shingles": sets, "signature": [minhash_signature(s, num_perm, seed) for s in sets]}


def _near_keep(sets: Sequence[np.ndarray], signatures: Sequence[np.ndarray], threshold: float, num_perm: int,
               seed: int) -> tuple[list[bool], dict]:
    """Greedy pass in input order: query the LSH index of kept documents, verify, keep or drop."""
    lsh = _lsh(threshold, num_perm)
    permutations = _permutations(num_perm, seed)
    keep, heads, candidates, rejected = [], set(), 0, 0
    for i, (shingle_set, signature) in enumerate(zip(sets, signatures, strict=True)):
        if len(shingle_set) == 0:
            keep.append(True)
            continue
        minhash = MinHash(hashvalues=signature, permutations=permutations, scheme="affine32")
        found = sorted(lsh.query(minhash))
        match = next((j for j in found if _similar(shingle_set, sets[j], threshold)), None)
        candidates += len(found)
        rejected += len(found) if match is None else found.index(match)
        keep.append(match is None)
        if match is None:
            lsh.insert(i, minhash, check_duplication=False)
        else:
            heads.add(match)
    stats = _counts(keep) | {"clusters": len(heads), "candidates": candidates, "rejected": rejected,
                             "bands": lsh.b, "rows": lsh.r}
    return keep, stats


def _similar(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    """Exact Jaccard >= threshold, skipping the intersection when the set sizes alone rule it out."""
    if min(len(a), len(b)) < threshold * max(len(a), len(b)):
        return False
    return jaccard(a, b) >= threshold


def _lsh(threshold: float, num_perm: int) -> MinHashLSH:
    try:
        return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    except ValueError as err:
        raise DataError(f"no LSH banding for threshold={threshold}, num_perm={num_perm} ({err}): "
                        "lower the threshold or raise num_perm") from err


# ---- checks and shared helpers ----


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise DataError("texts must be a sequence of strings, got one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"texts[{i}] is {type(t).__name__}, not str")


def _check_dataset(ds: datasets.Dataset, column: str) -> None:
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"expected a datasets.Dataset, got {type(ds).__name__}")
    if column not in ds.column_names:
        raise DataError(f"dataset has no column {column!r} (columns: {', '.join(ds.column_names)})")
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"column {column!r} must hold strings, it holds {feature}")


def _batch_texts(batch: dict, indices: list[int], column: str) -> list[str]:
    """The batch's texts; a missing (None) one is an error that names its row."""
    texts = batch[column]
    for i, t in zip(indices, texts, strict=True):
        if t is None:
            raise DataError(f"column {column!r} is missing (None) in row {i}")
    return texts


def _check_near_args(threshold: float, num_perm: int, ngram: int, seed: int) -> None:
    if not isinstance(threshold, int | float) or not 0.0 < threshold < 1.0:
        raise DataError(f"threshold must be in (0, 1) (identical texts: exact_dedup), got {threshold!r}")
    if not isinstance(num_perm, int) or num_perm < 2:
        raise DataError(f"num_perm must be an integer >= 2, got {num_perm!r}")
    if not isinstance(ngram, int) or ngram < 1:
        raise DataError(f"ngram must be an integer >= 1, got {ngram!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DataError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def _select(ds: datasets.Dataset, keep: Sequence[bool]) -> datasets.Dataset:
    return ds.select(np.flatnonzero(np.asarray(keep, dtype=bool)))


def _counts(keep: Sequence[bool]) -> dict:
    kept = int(sum(keep))
    return {"documents_in": len(keep), "documents_out": kept, "removed": len(keep) - kept}
