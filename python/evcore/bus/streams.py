"""Which stream stores a subject, and which stream a durable consumer's filter reads (shared by
both bus implementations so they agree)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from evcore.bus.api import StreamSpec
from evcore.bus.subjects import tokens_match, validate_subject

T = TypeVar("T")


@functools.lru_cache(maxsize=1024)
def _pattern_tokens(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def stream_for_subject(specs: Sequence[StreamSpec], subject: str) -> StreamSpec | None:
    """The stream that stores a concrete subject, or ``None`` (then it is live-only)."""
    tokens = subject.split(".")
    for spec in specs:
        for f in spec.subjects:
            if tokens_match(_pattern_tokens(f), tokens):
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


def durable_stream(specs: Sequence[StreamSpec], pattern: str, durable: str) -> StreamSpec:
    """The stream a durable consumer on ``pattern`` reads; ``ValueError`` for an invalid pattern,
    an empty durable name, or a pattern no single stream stores."""
    validate_subject(pattern, wildcards=True)
    if not durable:
        raise ValueError("consume: durable name must not be empty")
    return stream_for_pattern(specs, pattern)


class RouteCache(Generic[T]):
    """What a concrete subject resolves to, validated once per subject and kept for at most
    ``size`` subjects (the oldest goes first; 0 resolves on every publish)."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"route_cache_size must be >= 0, got {size}")
        self._size = size
        self._routes: dict[str, T] = {}

    def get(self, subject: str, resolve: Callable[[str], T]) -> T:
        """The cached route of ``subject``, or ``resolve(subject)`` after validating it (an
        invalid subject raises ``ValueError`` and is never cached)."""
        route = self._routes.get(subject)
        if route is None:
            validate_subject(subject, wildcards=False)
            route = resolve(subject)
            if self._size > 0:
                if len(self._routes) >= self._size:
                    del self._routes[next(iter(self._routes))]
                self._routes[subject] = route
        return route

    def clear(self) -> None:
        self._routes.clear()

    def __len__(self) -> int:
        return len(self._routes)
