"""The stage report of a data preparation run: what each stage took in and gave
out (documents, bytes), how long it took, and why it dropped what it dropped."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager


@dataclasses.dataclass
class StageStats:
    stage: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    extra: dict[str, float | int | str] = dataclasses.field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else float("inf")


@contextmanager
def timed(stats: StageStats) -> Iterator[StageStats]:
    start = time.perf_counter()
    try:
        yield stats
    finally:
        stats.seconds = time.perf_counter() - start


def format_table(stages: list[StageStats]) -> str:
    """A fixed-width table, one line per stage, with drop reasons and extras below it."""
    lines = [f"{'stage':<10} {'docs in':>9} {'docs out':>9} {'MB in':>9} {'MB out':>9} {'seconds':>8} {'MB/s':>8}"]
    for s in stages:
        lines.append(
            f"{s.stage:<10} {s.docs_in:>9,} {s.docs_out:>9,} {s.bytes_in / 1e6:>9.2f} {s.bytes_out / 1e6:>9.2f} "
            f"{s.seconds:>8.2f} {s.mb_per_s:>8.1f}"
        )
        details = [f"{k}: {v:,}" for k, v in sorted(s.dropped.items())]
        details += [f"{k}: {_number(v)}" for k, v in s.extra.items()]
        if details:
            lines.append(f"{'':<10} " + ", ".join(details))
    return "\n".join(lines)


def _number(value: float | int | str) -> str:
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"
