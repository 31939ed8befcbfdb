"""Which stream stores a subject, and which stream a durable consumer's filter reads (shared by
both bus implementations so they agree)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from evcore.bus.api import StreamSpec


@functools.lru_cache(maxsize=1024)
def _pattern_tokens(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def _tokens_match(p: tuple[str, ...], s: list[str]) -> bool:
    """:func:`evcore.bus.subjects.subject_matches` on already split tokens."""
    for i, tok in enumerate(p):
        if tok == ">":
            return i == len(p) - 1 and len(s) > i
        if i >= len(s):
            return False
        if tok != "*" and tok != s[i]:
            return False
    return len(s) == len(p)


def stream_for_subject(specs: Sequence[StreamSpec], subject: str) -> StreamSpec | None:
    """The stream that stores a concrete subject, or ``None`` (then it is live-only)."""
    tokens = subject.split(".")
    for spec in specs:
        for f in spec.subjects:
            if _tokens_match(_pattern_tokens(f), tokens):
                return spec
    return None


def _covers(filter_: str, pattern: str) -> bool:
    """Whether every subject matching ``pattern`` also matches ``filter_``."""
    f = filter_.split(".")
    p = pattern.split(".")
    for i, tok in enumerate(f):
        if tok == ">":
            return len(p) > i
        if i >= len(p):
            return False
        if p[i] == ">":
            return False
        if tok == "*":
            continue
        if p[i] != tok:
            return False
    return len(p) == len(f)


def stream_for_pattern(specs: Sequence[StreamSpec], pattern: str) -> StreamSpec:
    """The one stream whose subjects cover ``pattern``; a clear error when none or several do."""
    found = [s for s in specs if any(_covers(f, pattern) for f in s.subjects)]
    if not found:
        raise ValueError(
            f"no stream stores {pattern!r}; durable consumers need a stored subject "
            f"(streams: {', '.join(s.name + ' ' + '|'.join(s.subjects) for s in specs)})"
        )
    if len(found) > 1:
        raise ValueError(f"{pattern!r} spans several streams: {', '.join(s.name for s in found)}")
    return found[0]
