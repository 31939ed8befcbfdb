"""Bus subject names: every subject is ``evcore.<site>.<kind>[.<charger>]``.

Ids come from site files and from OCPP URLs, so they may hold ``.``, ``*``, ``>``, spaces or
anything else; each id is escaped into exactly one NATS token (reversibly) so that per-site
permissions stay one wildcard (``evcore.<site>.>``) and a charger id can never widen a subscription.
This module never touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "evcore"

# Characters kept as they are in a token; everything else (including '%') is percent-encoded
# as UTF-8 bytes.
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def escape_token(raw: str) -> str:
    """Encode any non-empty id as one NATS subject token (``[A-Za-z0-9_-]`` and ``%XX``)."""
    if not isinstance(raw, str):
        raise TypeError(f"subject id must be a string, got {type(raw).__name__}")
    if raw == "":
        raise ValueError("subject id must not be empty")
    out: list[str] = []
    for ch in raw:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def name_token(raw: str) -> str:
    """Encode an id for a JetStream stream or consumer name: ``[A-Za-z0-9-]`` and ``_XX`` only.

    JetStream puts stream and consumer names into ack subjects; a ``%`` there breaks pull consumers
    (nats-server 2.9), so names use a stricter, still reversible, escape than subjects.
    """
    if raw == "":
        raise ValueError("stream or consumer name part must not be empty")
    out: list[str] = []
    for ch in raw:
        if ch in _SAFE and ch != "_":
            out.append(ch)
        else:
            out.extend(f"_{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def unescape_token(token: str) -> str:
    """Invert :func:`escape_token`; raises ``ValueError`` on a token it could not have produced."""
    data = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "%":
            hex2 = token[i + 1 : i + 3]
            if len(hex2) != 2 or any(c not in "0123456789ABCDEF" for c in hex2):
                raise ValueError(
                    f"bad escape {token[i : i + 3]!r} at {i} in subject token {token!r}"
                )
            data.append(int(hex2, 16))
            i += 3
        elif ch in _SAFE:
            data.extend(ch.encode("ascii"))
            i += 1
        else:
            raise ValueError(
                f"character {ch!r} cannot appear in an escaped subject token {token!r}"
            )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"subject token {token!r} does not decode as UTF-8: {exc}") from exc


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` matches one token, a final ``>`` one or more tokens."""
    return tokens_match(pattern.split("."), subject.split("."))


def tokens_match(p: Sequence[str], s: Sequence[str]) -> bool:
    """:func:`subject_matches` on already split tokens (``streams`` caches the pattern's split)."""
    for i, tok in enumerate(p):
        if tok == ">":
            return i == len(p) - 1 and len(s) > i
        if i >= len(s):
            return False
        if tok != "*" and tok != s[i]:
            return False
    return len(s) == len(p)


# nats-server reads a protocol line of at most 4096 bytes (its max_control_line) and closes the
# connection over a longer one; a publish's line holds the subject, a reply inbox (JetStream's,
# about 50 bytes) and two sizes, a subscription's the subject, a queue group and an id.
MAX_SUBJECT_BYTES = 4096 - 256


def subject_too_long(subject: str) -> str | None:
    """Why ``subject`` is too long for a NATS server to read, or None."""
    size = len(subject.encode("utf-8", "surrogatepass"))
    if size <= MAX_SUBJECT_BYTES:
        return None
    return (
        f"subject of {size} bytes ({subject[:60]!r}...) is longer than the {MAX_SUBJECT_BYTES} "
        f"bytes a NATS server takes (its protocol lines are at most 4096 bytes, "
        f"max_control_line, and it closes the connection over a longer one): shorten the id in it"
    )


def validate_subject(subject: str, *, wildcards: bool) -> None:
    """Raise ``ValueError`` naming the problem when ``subject`` is not a valid NATS subject."""
    if not subject:
        raise ValueError("subject must not be empty")
    too_long = subject_too_long(subject)
    if too_long is not None:
        raise ValueError(too_long)
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if tok == "":
            raise ValueError(f"subject {subject!r} has an empty token")
        if any(c.isspace() for c in tok):
            raise ValueError(f"subject {subject!r} contains whitespace")
        if tok in ("*", ">"):
            if not wildcards:
                raise ValueError(f"subject {subject!r}: wildcards are not allowed when publishing")
            if tok == ">" and i != len(tokens) - 1:
                raise ValueError(f"subject {subject!r}: '>' must be the last token")
        elif "*" in tok or ">" in tok:
            raise ValueError(f"subject {subject!r}: '*' and '>' must be whole tokens")


def validate_queue(queue: str | None) -> None:
    """Raise ``ValueError`` naming ``queue`` when NATS cannot carry it as a queue group name
    (whitespace: a protocol line's separator). ``None`` or ``""``: no group."""
    if queue and any(c.isspace() for c in queue):
        raise ValueError(f"queue group {queue!r} contains whitespace, which NATS cannot carry")


# Kinds whose events must not be lost: they go through the disk-backed outbox.
CRITICAL_KINDS = frozenset({"audit", "transaction", "setpoint", "station_event"})
# Kinds that may be sampled down (latest per subject wins) under backpressure.
SAMPLED_KINDS = frozenset({"telemetry", "node_load"})


@dataclass(frozen=True)
class Subjects:
    """Subject builder for one site: ``Subjects("depot-1").telemetry("C.1")``."""

    site_id: str

    @property
    def site_token(self) -> str:
        return escape_token(self.site_id)

    @property
    def root(self) -> str:
        """``evcore.<site>`` (no trailing dot)."""
        return f"{PREFIX}.{self.site_token}"

    @property
    def all(self) -> str:
        """Every subject of the site: ``evcore.<site>.>`` (the one wildcard for permissions)."""
        return f"{self.root}.>"

    def _per_charger(self, kind: str, charger_id: str | None) -> str:
        return f"{self.root}.{kind}.{'*' if charger_id is None else escape_token(charger_id)}"

    def telemetry(self, charger_id: str | None = None) -> str:
        """Meter samples of one charger (``None``: wildcard over all chargers)."""
        return self._per_charger("telemetry", charger_id)

    def node_load(self, node_id: str | None = None) -> str:
        """Readings of a node's non-charger load (building meter; ``None``: every node)."""
        return self._per_charger("node_load", node_id)

    def status(self, charger_id: str | None = None) -> str:
        """Charger status changes."""
        return self._per_charger("status", charger_id)

    def transaction(self, charger_id: str | None = None) -> str:
        """Transaction events (critical: outbox)."""
        return self._per_charger("transaction", charger_id)

    def setpoint(self, charger_id: str | None = None) -> str:
        """Setpoints sent (critical: outbox)."""
        return self._per_charger("setpoint", charger_id)

    def station_event(self, station_id: str | None = None) -> str:
        """Station notifications (security, firmware, diagnostics, log status) of one OCPP
        station, by its OCPP id (critical: outbox)."""
        return self._per_charger("station_event", station_id)

    def command(self, charger_id: str | None = None) -> str:
        """Requests to one charger's OCPP connection (request/reply, not stored)."""
        return self._per_charger("command", charger_id)

    @property
    def audit(self) -> str:
        """Audit records (critical: outbox)."""
        return f"{self.root}.audit"

    @property
    def plan(self) -> str:
        """Plans from the edge or cloud planner."""
        return f"{self.root}.plan"

    @property
    def grid(self) -> str:
        """Grid signals: curtailments and price updates."""
        return f"{self.root}.grid"

    @property
    def decision(self) -> str:
        """Decision notifications (summary of each control decision)."""
        return f"{self.root}.decision"

    @property
    def topology(self) -> str:
        """The site topology as loaded."""
        return f"{self.root}.topology"

    @property
    def tariff(self) -> str:
        """Tariffs and prices."""
        return f"{self.root}.tariff"

    def rpc(self, service: str) -> str:
        """Request/reply endpoint of a service (``rpc("edge.state")`` → ``….rpc.edge%2Estate``)."""
        return f"{self.root}.rpc.{escape_token(service)}"

    def kind_of(self, subject: str) -> str:
        """The ``<kind>`` token of one of this site's subjects (``""`` for other subjects)."""
        prefix = self.root + "."
        if not subject.startswith(prefix):
            return ""
        return subject[len(prefix) :].split(".", 1)[0]

    def charger_of(self, subject: str) -> str | None:
        """The unescaped charger id of a per-charger subject, or ``None``."""
        prefix = self.root + "."
        if not subject.startswith(prefix):
            return None
        rest = subject[len(prefix) :].split(".")
        if len(rest) != 2 or rest[1] in ("*", ">"):
            return None
        return unescape_token(rest[1])
