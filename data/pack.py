"""Packing: token streams of documents, joined with the eos token, cut into rows
of seq_len + 1 tokens (inputs and next-token targets overlap by one).

Each row carries segment ids — 1, 2, ... for the documents (or pieces of them)
it holds, numbered from 1 within the row, 0 for padding — so the model's segment
mask keeps documents apart. Positions restart at 0 where a segment starts and
are derived from the segment ids. A document that does not fit the rest of a
row continues in the next one; nothing is dropped but the final partial row,
which is padded and kept unless `drop_tail` is set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

PAD_ID = 0  # the token id written in padding; its segment id is 0 and loss weight 0


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """[..., length] segment ids -> position of each token within its segment."""
    segment_ids = np.asarray(segment_ids)
    length = segment_ids.shape[-1]
    index = np.broadcast_to(np.arange(length), segment_ids.shape)
    starts = np.ones(segment_ids.shape, dtype=bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return (index - start_index).astype(np.int32)


class Packer:
    """Accumulates documents' tokens and emits full rows of `row_len` tokens."""

    def __init__(self, row_len: int, eos_id: int, dtype=np.int32):
        if row_len < 2:
            raise ValueError(f"rows need at least 2 tokens (seq_len >= 1), got row_len={row_len}")
        self.row_len, self.eos_id, self.dtype = row_len, eos_id, dtype
        self._tokens: list[np.ndarray] = []  # pieces of the current unfinished stream
        self._docs: list[np.ndarray] = []  # a document counter per piece
        self._buffered = 0
        self._doc = 0
        self.documents = 0
        self.tokens_in = 0

    def add(self, tokens: Iterable[int]) -> None:
        piece = np.fromiter(tokens, dtype=self.dtype)
        piece = np.append(piece, np.asarray(self.eos_id, self.dtype))
        self._doc += 1
        self.documents += 1
        self.tokens_in += len(piece)
        self._tokens.append(piece)
        self._docs.append(np.full(len(piece), self._doc, np.int64))
        self._buffered += len(piece)

    def full_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(tokens, segment_ids), each [rows, row_len], of every complete row buffered so far."""
        rows = self._buffered // self.row_len
        if rows == 0:
            return None
        tokens, docs = np.concatenate(self._tokens), np.concatenate(self._docs)
        cut = rows * self.row_len
        self._tokens, self._docs = [tokens[cut:]], [docs[cut:]]
        self._buffered -= cut
        return tokens[:cut].reshape(rows, self.row_len), _renumber(docs[:cut].reshape(rows, self.row_len))

    def tail(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The last partial row, padded with PAD_ID / segment 0; None if nothing is left."""
        if self._buffered == 0:
            return None
        tokens, docs = np.concatenate(self._tokens), np.concatenate(self._docs)
        pad = self.row_len - len(tokens)
        tokens = np.concatenate([tokens, np.full(pad, PAD_ID, self.dtype)])[None]
        segments = np.concatenate([_renumber(docs[None]), np.zeros((1, pad), np.int32)], axis=1)
        self._tokens, self._docs, self._buffered = [], [], 0
        return tokens, segments


def _renumber(docs: np.ndarray) -> np.ndarray:
    """Global document counters [rows, row_len] -> segment ids 1, 2, ... within each row."""
    changes = np.ones(docs.shape, dtype=np.int32)
    changes[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return np.cumsum(changes, axis=1, dtype=np.int32)


def pack(documents: Iterable[Iterable[int]], seq_len: int, eos_id: int, drop_tail: bool = False,
         ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens, segment_ids) chunks, each [rows, seq_len + 1], from tokenized documents."""
    packer = Packer(seq_len + 1, eos_id)
    for doc in documents:
        packer.add(doc)
        if packer._buffered >= 64 * packer.row_len:
            yield packer.full_rows()
    rows = packer.full_rows()
    if rows is not None:
        yield rows
    tail = packer.tail()
    if tail is not None and not drop_tail:
        yield tail
