"""The prefix cache: keys and values of sequences already computed (prompts, and finished conversations turns
included), found again by the longest prefix a new prompt shares with one of them, so that only the rest of
the prompt is prefilled. A shared system prompt or the earlier turns of a chat are computed once.

Entries are indexed by their blocks of BLOCK tokens: a chain hash of blocks 1..k names "the first k blocks",
so a lookup walks the prompt's blocks until one is unknown; of the entries holding the deepest known chain,
the one sharing the most tokens (counted one by one past the last full block) is the hit. Memory is bounded
by a byte budget; the least recently used entries go first.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

BLOCK = 16  # tokens per indexed block; shorter shared prefixes are not reused


@dataclasses.dataclass
class Entry:
    tokens: tuple[int, ...]  # the sequence whose KV `cache` holds at positions 0 .. len - 1
    cache: Any  # the engine's KVCache of one sequence
    nbytes: int
    keys: list[int]  # its block chain hashes


@dataclasses.dataclass
class Hit:
    entry: Entry
    length: int  # leading prompt tokens whose KV the entry holds


def block_hashes(tokens: Sequence[int], limit: int | None = None) -> list[int]:
    """Chain hashes of the first 1, 2, ... full blocks (of at most `limit` tokens)."""
    n = len(tokens) if limit is None else min(limit, len(tokens))
    hashes, h = [], 0
    for start in range(0, n - BLOCK + 1, BLOCK):
        h = hash((h, tuple(tokens[start:start + BLOCK])))
        hashes.append(h)
    return hashes


class PrefixCache:
    """Sequences' KV by token prefix, at most `capacity_bytes` of them (LRU eviction)."""

    def __init__(self, capacity_bytes: int):
        self.capacity = int(capacity_bytes)
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id -> entry, least recently used first
        self.index: dict[int, OrderedDict[int, None]] = {}  # chain hash -> ids of entries holding it
        self.bytes = 0
        self.lookups = self.hits = self.hit_tokens = self.evictions = 0
        self._ids = itertools.count()

    def lookup(self, prompt: Sequence[int]) -> Hit | None:
        """The entry sharing the longest prefix with `prompt` (at most len(prompt) - 1 tokens: the last
        prompt token is always computed, for its logits), or None when none shares a block."""
        self.lookups += 1
        limit = len(prompt) - 1
        candidates, blocks = None, 0
        for h in block_hashes(prompt, limit):
            ids = self.index.get(h)
            if not ids:
                break
            candidates, blocks = ids, blocks + 1
        if candidates is None:
            return None
        known = tuple(prompt[:blocks * BLOCK])
        best, length = None, 0
        for key in reversed(candidates):  # the most recently used first
            entry = self.entries[key]
            if entry.tokens[:len(known)] != known:  # a hash collision
                continue
            shared = len(known) + _shared(entry.tokens[len(known):], prompt[len(known):], limit - len(known))
            if shared > length:
                best, length = key, shared
        if best is None:
            return None
        self._touch(best)
        self.hits += 1
        self.hit_tokens += length
        return Hit(self.entries[best], length)

    def add(self, tokens: Sequence[int], cache: Any, nbytes: int) -> bool:
        """Keep `cache` (the KV of `tokens`). An entry that is a prefix of `tokens` is dropped (this one
        covers it); nothing is added when an entry already covers `tokens`. False when not kept."""
        tokens = tuple(int(t) for t in tokens)
        if len(tokens) < BLOCK or nbytes > self.capacity:
            return False
        for key, entry in list(self.entries.items()):
            if entry.tokens[:len(tokens)] == tokens:
                self._touch(key)
                return False
            if tokens[:len(entry.tokens)] == entry.tokens:
                self._remove(key)
        while self.bytes + nbytes > self.capacity:
            self._remove(next(iter(self.entries)))
            self.evictions += 1
        key = next(self._ids)
        entry = Entry(tokens, cache, nbytes, block_hashes(tokens))
        self.entries[key] = entry
        self.bytes += nbytes
        for h in entry.keys:
            self.index.setdefault(h, OrderedDict())[key] = None
        return True

    def __len__(self) -> int:
        return len(self.entries)

    def _touch(self, key: int) -> None:
        self.entries.move_to_end(key)
        for h in self.entries[key].keys:
            self.index[h].move_to_end(key)

    def _remove(self, key: int) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.nbytes
        for h in entry.keys:
            ids = self.index[h]
            del ids[key]
            if not ids:
                del self.index[h]


def _shared(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
