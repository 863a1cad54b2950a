"""Tests of the dedup stage (data/dedup.py) on real documents of the embedded corpus.

Near-duplicates are planted by small edits of sampled stdlib files; the reference for "how similar" is the exact
Jaccard of the shingle *strings* (no hashing, no MinHash), and the MinHash signature is checked against datasketch.
"""

import random

import datasets
import numpy as np
import pytest
from datasketch import MinHash

from data.dedup import (
    exact_dedup,
    exact_duplicate_mask,
    minhash_signature,
    near_dedup,
    near_duplicate_mask,
    shingle_hashes,
    shingles,
)
from data.errors import DataError

datasets.disable_progress_bars()

THRESHOLD = 0.8
SAMPLE = 300  # real documents
PLANTED = 100  # near copies of some of them


def true_jaccard(a: str, b: str) -> float:
    """Exact Jaccard of the two shingle sets, on the strings themselves."""
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


@pytest.fixture(scope="module")
def corpus(stdlib_texts) -> list[str]:
    """A fixed sample of distinct-text, non-empty documents of the embedded corpus (undecodable files skipped)."""
    texts = stdlib_texts
    texts = [t for t, first in zip(texts, exact_duplicate_mask(texts), strict=True) if first and shingles(t)]
    return random.Random(0).sample(texts, SAMPLE)


def edit_lines(text: str, rng: random.Random, fraction: float = 0.02) -> str:
    """A near copy: about `fraction` of the lines edited — a word replaced, a line deleted or a line inserted."""
    lines = text.split("\n")
    for _ in range(max(1, round(fraction * len(lines)))):
        i = rng.choice([k for k, line in enumerate(lines) if line.split()])
        kind = rng.choice(("replace", "delete", "insert"))
        if kind == "replace":
            words = lines[i].split(" ")
            k = rng.choice([k for k, w in enumerate(words) if w])
            words[k] = f"edited{rng.randrange(10**6)}"
            lines[i] = " ".join(words)
        elif kind == "delete":
            del lines[i]
        else:
            lines.insert(i, f"# planted line {rng.randrange(10**6)}")
    return "\n".join(lines)


def distinct(texts: list[str], threshold: float) -> list[bool]:
    """True for each text whose true Jaccard with every other text is below threshold."""
    sets = [set(shingles(t)) for t in texts]
    alone = [True] * len(texts)
    for i in range(len(sets)):
        for j in range(i):
            small, large = sorted((len(sets[i]), len(sets[j])))
            if small >= threshold * large and len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= threshold:
                alone[i] = alone[j] = False
    return alone


@pytest.fixture(scope="module")
def planted(corpus):
    """The sample with PLANTED near copies, each at a random place after its source.

    Returns (texts, source) where source[k] is None for an original and the index of the original for a copy.
    """
    rng = random.Random(1)
    big = [i for i, t in enumerate(corpus) if len(shingles(t)) >= 200 and t.count("\n") >= 50]
    sources = rng.sample(big, PLANTED)
    keyed = [(float(i), corpus[i], None) for i in range(len(corpus))]
    keyed += [(rng.uniform(i, len(corpus)), edit_lines(corpus[i], rng), i) for i in sources]
    keyed.sort(key=lambda item: item[0])
    return [text for _, text, _ in keyed], [source for _, _, source in keyed]


def test_planted_pairs_are_near_duplicates(corpus, planted):
    """What the test plants: every copy differs from its source, with true Jaccard in [0.85, 1)."""
    texts, source = planted
    similarities = [true_jaccard(corpus[s], t) for t, s in zip(texts, source, strict=True) if s is not None]
    assert len(similarities) == PLANTED
    assert min(similarities) >= 0.85 and max(similarities) < 1.0, (min(similarities), max(similarities))


def test_near_dedup_finds_planted_copies_and_keeps_distinct_documents(corpus, planted):
    texts, source = planted
    keep = near_duplicate_mask(texts, threshold=THRESHOLD)
    copies = [k for k, s in enumerate(source) if s is not None]
    recall = sum(not keep[k] for k in copies) / len(copies)
    assert recall >= 0.9, recall
    # Originals with a true near-duplicate among the other originals (the corpus has some, e.g. codec tables)
    # may rightly be dropped; every other original must be kept.
    originals = [k for k, s in enumerate(source) if s is None]
    alone = distinct([texts[k] for k in originals], THRESHOLD)
    dropped = [k for k, a in zip(originals, alone, strict=True) if a and not keep[k]]
    assert sum(alone) >= 0.9 * SAMPLE
    assert dropped == [], [texts[k][:80] for k in dropped]


def test_near_dedup_on_dataset_matches_the_mask_and_keeps_columns(planted):
    texts, source = planted
    ds = datasets.Dataset.from_dict({"id": [f"doc{k}" for k in range(len(texts))], "text": texts})
    out, stats = near_dedup(ds, threshold=THRESHOLD)
    keep = near_duplicate_mask(texts, threshold=THRESHOLD)
    assert out.column_names == ["id", "text"]
    assert out["id"] == [f"doc{k}" for k in range(len(texts)) if keep[k]]
    assert stats["documents_in"] == len(texts)
    assert stats["documents_out"] == sum(keep) == len(out)
    assert stats["removed"] == len(texts) - sum(keep)
    assert 0 < stats["clusters"] <= stats["removed"]
    assert stats["bands"] * stats["rows"] <= stats["num_perm"]


def mixed(a: str, c: str, target: float) -> str:
    """The first part of `a` followed by the start of `c`, same line count, cut so true Jaccard ~ target."""
    lines, other = a.split("\n"), c.split("\n")
    low, high = 0, len(lines)
    while high - low > 1:  # true Jaccard grows with the share of `a`
        cut = (low + high) // 2
        text = "\n".join(lines[:cut] + other[: len(lines) - cut])
        low, high = (cut, high) if true_jaccard(a, text) < target else (low, cut)
    return "\n".join(lines[:high] + other[: len(lines) - high])


def test_threshold_is_honoured(corpus):
    """Pairs at true Jaccard ~0.5 (part of a document, then part of another) survive 0.8, and go at 0.3."""
    big = [t for t in corpus if len(shingles(t)) >= 300]
    texts = []
    for a, c in zip(big[:20], big[20:40], strict=True):
        texts += [a, mixed(a, c, 0.5)]
    similarities = [true_jaccard(texts[i], texts[i + 1]) for i in range(0, len(texts), 2)]
    assert all(0.45 <= s <= 0.6 for s in similarities), similarities
    assert all(near_duplicate_mask(texts, threshold=THRESHOLD))
    strict = near_duplicate_mask(texts, threshold=0.3)
    assert sum(not strict[i] for i in range(1, len(texts), 2)) >= 0.9 * len(similarities)


def test_exact_dedup_keeps_first_of_normalised_copies(corpus):
    a, b = corpus[0], corpus[1]
    texts = [
        a,
        b,
        a.replace("\n", "  \n") + "\n\n",  # trailing spaces and blank lines: the same document
        "\n" + b,  # a leading blank line: the same document
        a.upper(),  # case is content: kept
        a.replace("\n", "\n "),  # indentation is content: kept
        "",
        "",
    ]
    assert exact_duplicate_mask(texts) == [True, True, False, False, True, True, True, False]
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    out, stats = exact_dedup(ds)
    assert out["n"] == [0, 1, 4, 5, 6]
    assert stats == {"documents_in": 8, "documents_out": 5, "removed": 3}


def test_minhash_signature_equals_datasketch():
    """Our vectorised MinHash gives datasketch's affine32 values, also past one chunk of shingles."""
    rng = np.random.default_rng(0)
    for n, seed in ((1, 0), (50, 7), (20_000, 3)):
        hashes = np.unique(rng.integers(0, 2**32, n, dtype=np.uint64)).astype(np.uint32)
        reference = MinHash(num_perm=64, seed=seed, hashfunc=int)
        reference.update_batch(hashes.tolist())
        np.testing.assert_array_equal(minhash_signature(hashes, num_perm=64, seed=seed), reference.hashvalues)


def test_shingles_of_short_and_empty_texts():
    assert shingles("Import os, sys", ngram=5) == ["import os sys"]
    assert shingles("a b c d e f", ngram=5) == ["a b c d e", "b c d e f"]
    assert shingles(" (\n) ") == [] and len(shingle_hashes("")) == 0
    assert near_duplicate_mask(["", "", "()"]) == [True, True, True]  # no shingles: never a near duplicate


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "exact_dedup"),
        ({"threshold": 0.999}, "lower the threshold"),
        ({"num_perm": 1}, "num_perm"),
        ({"ngram": 0}, "ngram"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_data_error(kwargs, message):
    with pytest.raises(DataError, match=message):
        near_duplicate_mask(["a b c"], **kwargs)


def test_bad_inputs_raise_data_error():
    with pytest.raises(DataError, match="not str"):
        near_duplicate_mask(["a", None])
    with pytest.raises(DataError, match="one string"):
        exact_duplicate_mask("abc")
    with pytest.raises(DataError, match="no column 'text'"):
        exact_dedup(datasets.Dataset.from_dict({"body": ["a"]}))
    with pytest.raises(DataError, match="must hold strings"):
        near_dedup(datasets.Dataset.from_dict({"text": [1, 2]}))
    with pytest.raises(DataError, match="row 1"):
        exact_dedup(datasets.Dataset.from_dict({"text": ["a", None]}))
    with pytest.raises(DataError, match="Dataset"):
        near_dedup({"text": ["a"]})
