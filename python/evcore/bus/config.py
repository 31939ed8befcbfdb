"""The ``[bus]`` section of the site file, validated, and the default streams of a site.

See docs/bus.md for every key. Errors name the key and the value that was wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from evcore.bus.api import StreamSpec
from evcore.bus.subjects import Subjects, name_token

KINDS = ("inprocess", "nats")


@dataclass(frozen=True)
class BusConfig:
    kind: str = "inprocess"
    # NATS server URLs (a cluster: several); only for kind = "nats".
    urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    # Directory of the disk-backed outbox for critical events (NATS only); one SQLite file per site.
    outbox_dir: Path = Path("var/outbox")
    # The most a site's outbox holds while the broker is away or behind (subjects, event ids and
    # payloads, bytes); past it a critical publish is refused naming this key (OutboxFull) and
    # nothing held is dropped. The file takes somewhat more (SQLite's pages, its -wal file).
    outbox_max_bytes: int = 1 << 30
    # Connection name shown in NATS monitoring.
    name: str = "evcore"
    # Stream retention.
    events_max_age_s: float = 30 * 24 * 3600.0
    telemetry_max_age_s: float = 24 * 3600.0
    telemetry_max_bytes: int = 1 << 30
    duplicate_window_s: float = 120.0
    replicas: int = 1
    storage: str = "file"
    # Bounded queues: per subscription backlog and the normal-event send queue.
    subscriber_queue_size: int = 10_000
    send_queue_size: int = 10_000
    # Broker timing.
    connect_timeout_s: float = 2.0
    reconnect_wait_s: float = 0.5
    publish_timeout_s: float = 2.0
    # Credentials (NATS): a token or a .creds file; never logged.
    token: str = field(default="", repr=False)
    creds_file: str = ""
    # Whether this process creates/updates the site's streams (edge: yes; a restricted client: no).
    manage_streams: bool = True
    # The JetStream domain of the servers that hold the streams, when the bus connects to a leaf
    # node without JetStream of its own (an edge's local nats-server, edge/nats-edge.conf): its
    # JetStream API requests go to $JS.<domain>.API, across the leaf connection. "" = none.
    jetstream_domain: str = ""

    def streams(self, site_id: str) -> list[StreamSpec]:
        return default_streams(site_id, self)


def default_streams(site_id: str, cfg: BusConfig | None = None) -> list[StreamSpec]:
    """Two streams per site: events (kept long) and telemetry (short, size-capped).

    Each stream's duplicate window is at most its max_age: JetStream refuses a stream with a longer
    one (err_code 10052), and ``telemetry_max_age_s = 20`` or ``events_max_age_s = 60`` left the
    site without that stream (every audit record waited in the outbox for ever)."""
    c = cfg or BusConfig()
    s = Subjects(site_id)
    base = f"EVCORE_{name_token(site_id)}"
    return [
        StreamSpec(
            name=f"{base}_EVENTS",
            subjects=(
                s.audit,
                s.transaction(),
                s.setpoint(),
                s.status(),
                s.station_event(),
                s.plan,
                s.grid,
                s.decision,
                s.topology,
                s.tariff,
            ),
            max_age_s=c.events_max_age_s,
            duplicate_window_s=min(c.duplicate_window_s, c.events_max_age_s),
            replicas=c.replicas,
            storage=c.storage,
        ),
        StreamSpec(
            name=f"{base}_TELEMETRY",
            subjects=(s.telemetry(), s.node_load()),
            max_age_s=c.telemetry_max_age_s,
            max_bytes=c.telemetry_max_bytes,
            duplicate_window_s=min(c.duplicate_window_s, 30.0, c.telemetry_max_age_s),
            replicas=c.replicas,
            storage=c.storage,
        ),
    ]


def _num(sec: Mapping[str, Any], key: str, default: float, *, positive: bool = True) -> float:
    v = sec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"[bus] {key} must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"[bus] {key} must be > 0, got {v!r}")
    return float(v)


def _int(sec: Mapping[str, Any], key: str, default: int) -> int:
    v = sec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**63:
        raise ValueError(f"[bus] {key} must be a positive integer below 2**63, got {v!r}")
    return v


def parse_bus_config(section: Mapping[str, Any] | None) -> BusConfig:
    """Validate a ``[bus]`` table (``None``: the embedded default)."""
    sec: Mapping[str, Any] = section or {}
    if not isinstance(sec, Mapping):
        raise ValueError(f"[bus] must be a table, got {type(sec).__name__}")
    known = set(BusConfig.__dataclass_fields__) | {"url"}
    unknown = sorted(set(sec) - known)
    if unknown:
        raise ValueError(f"[bus] unknown key(s): {', '.join(unknown)}")
    kind = sec.get("kind", "inprocess")
    if kind not in KINDS:
        raise ValueError(f"[bus] kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if "url" in sec and "urls" in sec:
        raise ValueError("[bus] give either url or urls, not both")
    raw_urls = sec.get("urls", [sec["url"]] if "url" in sec else list(BusConfig.urls))
    if isinstance(raw_urls, str):
        raw_urls = [raw_urls]
    if not isinstance(raw_urls, list | tuple) or not raw_urls:
        raise ValueError(f"[bus] urls must be a non-empty list of nats:// URLs, got {raw_urls!r}")
    key = "urls" if "urls" in sec else "url"
    for u in raw_urls:
        if not isinstance(u, str) or not u.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ValueError(f"[bus] url {u!r} must start with nats://, tls://, ws:// or wss://")
        _check_url(key, u)
    storage = sec.get("storage", "file")
    if storage not in ("file", "memory"):
        raise ValueError(f"[bus] storage must be 'file' or 'memory', got {storage!r}")
    replicas = _int(sec, "replicas", 1)
    if replicas > 5:
        raise ValueError(f"[bus] replicas must be 1..5 (JetStream limit), got {replicas}")
    outbox = sec.get("outbox_dir", "var/outbox")
    if not isinstance(outbox, str) or not outbox:
        raise ValueError(f"[bus] outbox_dir must be a path string, got {outbox!r}")
    domain = sec.get("jetstream_domain", "")
    if not isinstance(domain, str) or (domain and not re.fullmatch(r"[A-Za-z0-9_-]+", domain)):
        raise ValueError(
            f"[bus] jetstream_domain must be a name of letters, digits, '-' and '_', got {domain!r}"
        )
    for key in ("name", "token", "creds_file"):
        if key in sec and not isinstance(sec[key], str):
            raise ValueError(f"[bus] {key} must be a string, got {sec[key]!r}")
    manage = sec.get("manage_streams", True)
    if not isinstance(manage, bool):
        raise ValueError(f"[bus] manage_streams must be true or false, got {manage!r}")
    if "duplicate_window_s" in sec and "events_max_age_s" in sec:
        # Both given: a window longer than the events' retention is a contradiction to name (a
        # default window is only shortened to the retention, as for telemetry).
        window = _num(sec, "duplicate_window_s", BusConfig.duplicate_window_s)
        age = _num(sec, "events_max_age_s", BusConfig.events_max_age_s)
        if window > age:
            raise ValueError(
                f"[bus] duplicate_window_s ({window:g}) must not exceed events_max_age_s "
                f"({age:g}): JetStream refuses such a stream"
            )
    return BusConfig(
        kind=kind,
        urls=tuple(raw_urls),
        outbox_dir=Path(outbox),
        outbox_max_bytes=_int(sec, "outbox_max_bytes", BusConfig.outbox_max_bytes),
        name=sec.get("name", "evcore"),
        events_max_age_s=_num(sec, "events_max_age_s", BusConfig.events_max_age_s),
        telemetry_max_age_s=_num(sec, "telemetry_max_age_s", BusConfig.telemetry_max_age_s),
        telemetry_max_bytes=_int(sec, "telemetry_max_bytes", BusConfig.telemetry_max_bytes),
        duplicate_window_s=_num(sec, "duplicate_window_s", BusConfig.duplicate_window_s),
        replicas=replicas,
        storage=storage,
        subscriber_queue_size=_int(sec, "subscriber_queue_size", BusConfig.subscriber_queue_size),
        send_queue_size=_int(sec, "send_queue_size", BusConfig.send_queue_size),
        connect_timeout_s=_num(sec, "connect_timeout_s", BusConfig.connect_timeout_s),
        reconnect_wait_s=_num(sec, "reconnect_wait_s", BusConfig.reconnect_wait_s),
        publish_timeout_s=_num(sec, "publish_timeout_s", BusConfig.publish_timeout_s),
        token=sec.get("token", ""),
        creds_file=sec.get("creds_file", ""),
        manage_streams=manage,
        jetstream_domain=domain,
    )


def _check_url(key: str, url: str) -> None:
    """A URL nats-py can connect to: a host, and a port (if any) in 1..65535. nats-py raised at
    the first connect otherwise ('nats: invalid hostname in connect url'), which ended the bus's
    connect task: it never connected, and said nothing."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"[bus] {key}: {url!r} is not a URL nats-py can use ({exc})") from None
    if not parts.hostname:
        raise ValueError(f"[bus] {key}: {url!r} names no host (e.g. nats://10.0.0.5:4222)")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"[bus] {key}: {url!r} has port {port}, not in 1..65535")


def check_creds_file(cfg: BusConfig) -> None:
    """Refuse a ``creds_file`` that cannot be read (``ValueError`` naming the key): nats-py reads
    it at every connect, and a bus given one that is not there never connected, its error
    logged at DEBUG only. A relative path is the working directory's, as nats-py takes it."""
    if not cfg.creds_file:
        return
    try:
        with open(cfg.creds_file, "rb") as creds:
            creds.read(1)
    except OSError as exc:
        raise ValueError(
            f"[bus] creds_file {cfg.creds_file!r} cannot be read ({exc.strerror or exc}); a "
            f"relative path is taken from the working directory ({Path.cwd()})"
        ) from None
