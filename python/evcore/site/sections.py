"""One validator for the keys of a configuration section (the site file's ``[api]``, ``[cloud]``,
``[metrics]``; cloud.toml's top level, ``[store]``, ``[tls]``, ``[retention]``).

It owns checking a table against declared keys (kind, default, range, ``host:port``, a file that
must exist), with one wording for every error, naming ``[section].key``. It never decides what a
section means: rules that join keys (``insecure`` against TLS files) stay with the section.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal[
    "bool", "number", "integer", "text", "choice", "host_port", "path", "file", "table", "any"
]


@dataclass(frozen=True, slots=True)
class Key:
    """A key's kind, default (None: absent unless ``required``) and, for numbers, ``[lo, hi]``
    (``above``: ``lo`` refused). ``path``/``file``: relative to the file's directory, a ``file``
    must exist. ``connect``: a ``host_port`` to connect to, so not port 0 (any free port)."""

    kind: Kind
    default: Any = None
    required: bool = False
    lo: float = -math.inf
    hi: float = math.inf
    above: bool = False
    connect: bool = False
    choices: tuple[str, ...] = ()
    #: Said after "missing" when a required key is absent.
    example: str = ""


@dataclass(frozen=True)
class Section:
    """``name``: ``"[cloud]"`` (``""``: a file's top level); ``error``: the section's own
    ``ValueError``; ``unknown_note``: added to the error for an unknown key."""

    name: str
    keys: Mapping[str, Key]
    error: type[ValueError] = ValueError
    unknown_note: str = ""

    def label(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def read(self, table: Any, base_dir: Path | str = ".") -> dict[str, Any]:
        """The checked values of the keys present or defaulted (absent ones without a default
        are left out); the first wrong key raises ``error`` naming it."""
        if not isinstance(table, Mapping):
            raise self.error(f"{self.name}: expected a table, got {type(table).__name__}")
        self.refuse_unknown(table)
        out: dict[str, Any] = {}
        for key, spec in self.keys.items():
            value = table.get(key)
            if value is not None:
                out[key] = self.check(key, value, base_dir)
            elif spec.required:
                hint = f"; e.g. {spec.example}" if spec.example else ""
                raise self.error(f"{self.label(key)}: missing{hint}")
            elif spec.default is not None:
                out[key] = spec.default
        return out

    def refuse_unknown(self, keys: Iterable[str]) -> None:
        unknown = sorted(set(keys) - set(self.keys))
        if unknown:
            also = f" (also {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
            raise self.error(
                f"{self.label(unknown[0])}: unknown key{also}; known keys: "
                f"{', '.join(sorted(self.keys))}{self.unknown_note}"
            )

    def check(self, key: str, value: Any, base_dir: Path | str = ".") -> Any:
        spec, label = self.keys[key], self.label(key)
        kind = spec.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.error(f"{label} must be true or false, got {value!r}")
            return value
        if kind in ("number", "integer"):
            wanted = int if kind == "integer" else int | float
            if isinstance(value, bool) or not isinstance(value, wanted) or not _within(spec, value):
                raise self.error(f"{label} must be {_range(spec)}, got {value!r}")
            return int(value) if kind == "integer" else float(value)
        if kind in ("text", "path", "file"):
            if not isinstance(value, str) or not value or "\x00" in value:
                what = "a non-empty string" if kind == "text" else "a file path"
                raise self.error(f"{label} must be {what}, got {value!r}")
            if kind == "text":
                return value
            path = Path(value) if Path(value).is_absolute() else Path(base_dir) / value
            if kind == "file" and not path.is_file():
                raise self.error(f"{label}: no such file {str(path)!r}")
            return path
        if kind == "choice" and value not in spec.choices:
            raise self.error(f"{label} must be one of {', '.join(spec.choices)}, got {value!r}")
        if kind == "host_port":
            split_host_port(value, label, self.error, connect=spec.connect)
        if kind == "table" and not isinstance(value, Mapping):
            raise self.error(f"{label}: expected a table, got {type(value).__name__}")
        return value


def _within(spec: Key, v: float) -> bool:
    return math.isfinite(v) and (v > spec.lo if spec.above else v >= spec.lo) and v <= spec.hi


def _range(spec: Key) -> str:
    what = "an integer" if spec.kind == "integer" else "a number"
    if spec.hi < math.inf:
        return f"{what} in {'(' if spec.above else '['}{spec.lo:g}, {spec.hi:g}]"
    return f"{what} {'>' if spec.above else '>='} {spec.lo:g}"


def split_host_port(
    value: Any, label: str, error: type[ValueError] = ValueError, *, connect: bool = False
) -> tuple[str, int]:
    """``"host:port"`` → (host, port), IPv6 as ``"[::1]:9464"``; an error names ``label``.
    ``connect``: an address to connect to, so port 0 (any free one, for a listener) is refused."""
    example = 'e.g. "127.0.0.1:9464" or "[::1]:9464"'
    if not isinstance(value, str):
        raise error(f"{label}: expected a 'host:port' string ({example}), got {value!r}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise error(f"{label}: expected 'host:port' ({example}), got {value!r}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise error(f"{label}: malformed IPv6 host in {value!r} ({example})")
        host = host[1:-1]
    elif ":" in host:
        raise error(f"{label}: an IPv6 host goes in brackets ({example}), got {value!r}")
    if any(ch.isspace() for ch in host) or "/" in host:
        raise error(f"{label}: {host!r} is not a host name or address")
    low = 1 if connect else 0
    if not (port_text.isascii() and port_text.isdigit()) or not low <= int(port_text) <= 65535:
        raise error(f"{label}: port must be a number from {low} to 65535, got {value!r}")
    return host, int(port_text)
