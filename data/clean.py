"""Cleaning and quality filtering of raw documents.

clean:  bytes -> text. Invalid UTF-8 and binary files are dropped and counted
        (never a crash); text is NFC-normalised, newlines become "\\n", a leading
        byte-order mark and control characters other than newline and tab go.
filter: length bounds and quality heuristics — share of alphanumeric
        characters, share of repeated lines, longest line.

Both work on one document at a time and return a reason ("" to keep), so a
report can say how many documents each rule removed.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

from data.errors import DataError

# C0 and C1 control characters except tab (\x09) and newline (\x0a); \r is handled first.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NEWLINES = re.compile(r"\r\n?")
BINARY_CONTROL_SHARE = 0.1  # above this share of control characters a file is binary, not text


def clean_text(raw: bytes) -> tuple[str, str]:
    """(cleaned text, "") or ("", reason) with reason "invalid_utf8" or "binary"."""
    if b"\x00" in raw:
        return "", "binary"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "", "invalid_utf8"
    text = _NEWLINES.sub("\n", text)
    controls = len(_CONTROL.findall(text))
    if text and controls / len(text) > BINARY_CONTROL_SHARE:
        return "", "binary"
    text = _CONTROL.sub("", text).removeprefix("\ufeff")
    return unicodedata.normalize("NFC", text), ""


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Quality rules; a document failing any one is dropped. Defaults keep ordinary prose and code."""

    min_chars: int = 64
    max_chars: int = 2_000_000
    min_alnum_share: float = 0.25  # letters and digits among all characters
    max_repeated_line_share: float = 0.5  # non-blank lines that repeat an earlier line of the document
    max_line_chars: int = 5_000  # the longest line (minified code, data dumps)

    def __post_init__(self):
        if not 0 <= self.min_chars <= self.max_chars:
            raise DataError(f"FilterConfig: need 0 <= min_chars ({self.min_chars}) <= max_chars ({self.max_chars})")
        for name in ("min_alnum_share", "max_repeated_line_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"FilterConfig.{name} must be within [0, 1], got {getattr(self, name)}")
        if self.max_line_chars <= 0:
            raise DataError(f"FilterConfig.max_line_chars must be positive, got {self.max_line_chars}")


def quality_reason(text: str, config: FilterConfig) -> str:
    """"" if `text` passes every rule, else the name of the first rule it fails."""
    if len(text) < config.min_chars:
        return "too_short"
    if len(text) > config.max_chars:
        return "too_long"
    alnum = sum(ch.isalnum() for ch in text)
    if alnum / len(text) < config.min_alnum_share:
        return "low_alnum_share"
    lines = text.split("\n")
    if max(map(len, lines)) > config.max_line_chars:
        return "long_line"
    content = [line.strip() for line in lines if line.strip()]
    if content and 1 - len(set(content)) / len(content) > config.max_repeated_line_share:
        return "repeated_lines"
    return ""
