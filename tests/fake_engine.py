"""A deterministic stand-in for infer.engine.Engine, to test scheduling against (JetStream's idea).

Its "model": after token t at position p, a request with seed s draws (31 t + 7 p + s) mod vocab. Its "KV cache"
is the token sequence itself, so a prefill that reuses a cached prefix can be checked token by token, and a
request's tokens can be computed without the scheduler (`expected`).
"""

from __future__ import annotations

import dataclasses

from infer.engine import Engine, Prefill, Step


@dataclasses.dataclass(frozen=True)
class FakeCache:
    tokens: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.tokens)


def next_token(token: int, position: int, seed: int, vocab: int) -> int:
    return (31 * token + 7 * position + seed) % vocab


def expected(prompt: list[int], max_new: int, seed: int = 0, vocab: int = 100, stop_ids=()) -> list[int]:
    """The tokens the fake model generates for a prompt (a stop id ends them and is included)."""
    seq, out = list(prompt), []
    while len(out) < max_new:
        token = next_token(seq[-1], len(seq), seed, vocab)
        out.append(token)
        seq.append(token)
        if token in stop_ids:
            break
    return out


class FakeEngine:
    check = Engine.check  # the same request checks as the real engine

    def __init__(self, slots: int = 4, max_length: int = 64, vocab: int = 100, fail_prefill_token: int | None = None):
        self.slots, self.max_length = slots, max_length
        self.config = dataclasses.make_dataclass("Config", ["vocab_size"])(vocab)
        self.fail_prefill_token = fail_prefill_token
        self.fail_next_generate = False
        self.bad_reuse: list[tuple] = []  # reuses whose cached tokens were not the prompt's prefix
        self.calls = {"prefill": 0, "insert": 0, "generate": 0}
        self.longest: list[int | None] = []  # what each generate call was told the longest sequence holds

    def init_state(self) -> dict:
        return {}

    def prefill(self, prompt, params, reuse=None) -> Prefill:
        self.calls["prefill"] += 1
        if self.fail_prefill_token is not None and self.fail_prefill_token in prompt:
            raise RuntimeError("prefill failed on purpose")
        start = 0
        if reuse is not None:
            cache, start = reuse
            if list(cache.tokens[:start]) != list(prompt[:start]):
                self.bad_reuse.append((cache.tokens, prompt, start))
        token = next_token(prompt[-1], len(prompt), params.seed, self.config.vocab_size)
        return Prefill(FakeCache(tuple(prompt)), len(prompt), token, 0.0, params, start)

    def insert(self, prefill: Prefill, state: dict, slot: int) -> dict:
        self.calls["insert"] += 1
        state = dict(state)
        state[slot] = (list(prefill.cache.tokens), prefill.token, prefill.rows.seed)
        return state

    def generate(self, state: dict, longest: int | None = None) -> tuple[dict, Step]:
        self.calls["generate"] += 1
        self.longest.append(longest)
        if self.fail_next_generate:
            self.fail_next_generate = False
            raise RuntimeError("generate failed on purpose")
        tokens, new = [0] * self.slots, {}
        for slot, (seq, token, seed) in state.items():
            seq = [*seq, token]
            tokens[slot] = next_token(token, len(seq), seed, self.config.vocab_size)
            new[slot] = (seq, tokens[slot], seed)
        return new, Step(tokens, [0.0] * self.slots)

    def extract(self, state: dict, slot: int, length: int) -> FakeCache:
        return FakeCache(tuple(state[slot][0][:length]))

    def cache_bytes(self, length: int) -> int:
        return length


class FakeTokenizer:
    """Token t is the letter chr(97 + t % 26)."""

    def decode(self, ids) -> str:
        return "".join(chr(97 + t % 26) for t in ids)
