"""``cloud.toml``: where the cloud listens, its TLS files and its store (docs/cloud.md)."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evcore.api.auth import AuthConfigError, Credentials
from evcore.metrics.server import MetricsConfig, MetricsConfigError
from evcore.site.sections import Key, Section

log = logging.getLogger("evcore.cloud")

DEFAULT_LISTEN = "0.0.0.0:50061"


class CloudConfigError(ValueError):
    """``cloud.toml`` is wrong; the message names the key."""


@dataclass(frozen=True)
class CloudTls:
    cert_file: Path
    key_file: Path
    # Sites' client certificates must be signed by this CA; their common name is the site id.
    client_ca_file: Path


@dataclass(frozen=True)
class FleetConfig:
    """``[fleet]``: who may call the FleetApi and how demand is read (docs/cloud.md)."""

    # Operators' client certificates are signed by this CA (never the sites' CA); None: insecure.
    operator_ca_file: Path | None
    # Operator identities by certificate common name (or x-evcore-operator header when insecure).
    operators: Credentials
    demand_window_s: float = 900.0
    # Check for material demand or topology changes this often (0: only on request).
    resplit_every_s: float = 60.0
    resplit_change_ratio: float = 0.2
    resplit_min_kw: float = 5.0
    # Publish stored-but-unpublished revisions at start and then this often (0: at start only).
    republish_every_s: float = 30.0
    # A re-split's increases go out this long after the last of its decreases was taken by its
    # edge (break before make; docs/cloud.md): the chargers' time to come down.
    ramp_s: float = 30.0
    # An edge that took no signal sent to it this long is counted at what it may still hold and no
    # longer waited for (docs/cloud.md "Break before make").
    ack_timeout_s: float = 120.0


@dataclass(frozen=True)
class CloudRetention:
    """``[retention]``: what the serve process deletes, and how often (docs/cloud.md). Audit
    records are never deleted."""

    # Telemetry batches whose newest sample is older than this many days go (0: keep all).
    telemetry_days: float = 30.0
    # Per site, plans below the newest this many versions go (0: keep all).
    plans_keep: int = 50
    every_s: float = 3600.0
    # Rows per delete transaction: an upload waits for at most one such batch.
    batch_rows: int = 1000

    @property
    def enabled(self) -> bool:
        return self.telemetry_days > 0 or self.plans_keep > 0


@dataclass(frozen=True)
class CloudConfig:
    store_url: str
    # ``[store] read_timeout_s``: a read waits at most this long, then UNAVAILABLE naming the store.
    store_read_timeout_s: float = 10.0
    # ``[store] write_timeout_s``: a write waits at most this long, then UNAVAILABLE naming the
    # store (whether anything was committed: every upload is idempotent, a retry is safe).
    store_write_timeout_s: float = 30.0
    # ``[store] open_timeout_s``: connecting and applying migrations wait at most this long, then
    # the cloud does not start, naming the store and the step that hung (as the edge store).
    store_open_timeout_s: float = 120.0
    listen: str = DEFAULT_LISTEN
    tls: CloudTls | None = None
    # Local development only: no TLS, the site id taken from the `x-evcore-site-id` header.
    insecure: bool = False
    reflection: bool = True
    stop_grace_s: float = 5.0
    # Audit over NATS: the edge's [bus] keys (kind is nats) for one durable consumer per site.
    bus: Mapping[str, Any] | None = None
    bus_sites: tuple[str, ...] = ()
    # ``[bus] sites = "*"``: every site the cloud knows (a topology, audit or telemetry stored),
    # looked for again every ``discover_s``; a new site's audit is read without a restart.
    bus_discover: bool = False
    discover_s: float = 30.0
    audit_durable: str = "cloud-audit"
    # FleetApi (operators): None when not served.
    fleet: FleetConfig | None = None
    retention: CloudRetention = CloudRetention()
    # ``[metrics]``: a Prometheus endpoint (docs/metrics.md); None: none.
    metrics: MetricsConfig | None = None

    @staticmethod
    def from_table(table: Mapping[str, Any], base_dir: Path | str = ".") -> CloudConfig:
        base = Path(base_dir)
        top = _TOP.read(table, base)
        store = _STORE.read(top["store"])
        url = store["url"]
        if not url.startswith(("postgresql://", "postgres://")) and "://" not in url:
            path = Path(url.removeprefix("sqlite:").removeprefix("//"))
            if not path.is_absolute():
                url = f"sqlite:{base / path}"
        tls = CloudTls(**_TLS.read(top["tls"], base)) if "tls" in top else None
        insecure, listen, grace = top["insecure"], top["listen"], top["stop_grace_s"]
        if tls is None and not insecure:
            raise CloudConfigError(
                "[tls] (cert_file, key_file, client_ca_file) is required: sites authenticate "
                "with client certificates; `insecure = true` only for local development"
            )
        if tls is not None and insecure:
            raise CloudConfigError("insecure = true and [tls] together: choose one")
        fleet = _fleet_section(table.get("fleet"), base, secure=tls is not None)
        if fleet is not None and table.get("bus") is None:
            raise CloudConfigError(
                "[fleet] needs [bus]: the sites' curtailments are published on their grid subjects"
            )
        bus, sites, durable, discover_s = _bus_section(
            table.get("bus"), base, sites_required=fleet is None
        )
        discover = sites == ("*",)
        return CloudConfig(
            store_url=url,
            store_read_timeout_s=store["read_timeout_s"],
            store_write_timeout_s=store["write_timeout_s"],
            store_open_timeout_s=store["open_timeout_s"],
            listen=listen,
            tls=tls,
            insecure=insecure,
            reflection=top["reflection"],
            stop_grace_s=grace,
            bus=bus,
            bus_sites=() if discover else sites,
            bus_discover=discover,
            discover_s=discover_s,
            audit_durable=durable,
            fleet=fleet,
            retention=CloudRetention(**_RETENTION.read(top.get("retention", {}))),
            metrics=_metrics_section(table.get("metrics"), base),
        )

    @staticmethod
    def from_file(path: str | Path) -> CloudConfig:
        p = Path(path)
        try:
            with p.open("rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise CloudConfigError(f"cannot read {p}: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise CloudConfigError(f"{p} is not UTF-8 text as TOML must be ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise CloudConfigError(f"{p} is not valid TOML: {exc}") from exc
        return CloudConfig.from_table(table, p.parent)


def _bus_section(
    section: Any, base: Path, *, sites_required: bool = True
) -> tuple[Mapping[str, Any] | None, tuple[str, ...], str, float]:
    """``[bus]``: ``sites`` (whose audit subjects to consume; ``"*"``: every site the cloud
    knows, as ``("*",)``, looked for every ``discover_s``), ``audit_durable``, and the edge's
    ``[bus]`` keys (docs/bus.md) for the NATS connection; validated by the bus's own parser."""
    if section is None:
        return None, (), "cloud-audit", 30.0
    if not isinstance(section, Mapping):
        raise CloudConfigError("[bus] must be a table")
    sites = section.get("sites", None if sites_required else [])
    if sites == "*":
        sites = ["*"]
    elif (
        not isinstance(sites, list)
        or (sites_required and not sites)
        or not all(isinstance(x, str) and x for x in sites)
    ):
        raise CloudConfigError(
            '[bus] sites must be a non-empty list of site ids, or "*" (every site the cloud knows)'
        )
    if len(set(sites)) != len(sites):
        raise CloudConfigError("[bus] sites names a site twice")
    if "*" in sites and len(sites) > 1:
        # Read as a site named "*" (subject token %2A, which no edge uses): the other sites were
        # consumed and no new one ever was, without a word.
        raise CloudConfigError(
            '[bus] sites: "*" (every site the cloud knows) stands alone, as sites = "*", '
            "not in a list with other site ids"
        )
    durable = section.get("audit_durable", "cloud-audit")
    if not isinstance(durable, str) or not durable:
        raise CloudConfigError(f"[bus] audit_durable must be a name, got {durable!r}")
    discover_s = section.get("discover_s", 30.0)
    if (
        isinstance(discover_s, bool)
        or not isinstance(discover_s, int | float)
        or not 0.05 <= discover_s <= 86400
    ):
        raise CloudConfigError(
            f"[bus] discover_s must be a number of seconds in [0.05, 86400], got {discover_s!r}"
        )
    rest = {k: v for k, v in section.items() if k not in ("sites", "audit_durable", "discover_s")}
    if rest.get("kind", "nats") != "nats":
        raise CloudConfigError("[bus] kind must be nats for the cloud")
    rest["kind"] = "nats"
    outbox = Path(str(rest.get("outbox_dir", "var/outbox")))
    rest["outbox_dir"] = str(outbox if outbox.is_absolute() else base / outbox)
    from evcore.bus.config import parse_bus_config

    try:
        parse_bus_config(rest)
    except ValueError as exc:
        raise CloudConfigError(str(exc)) from exc
    return rest, tuple(sites), durable, float(discover_s)


def _fleet_section(section: Any, base: Path, *, secure: bool) -> FleetConfig | None:
    """``[fleet]``: ``operator_ca_file`` (required with [tls]), ``[[fleet.operators]]``
    (``common_name``, ``roles`` as the edge API's: viewer, operator, grid_operator) and
    ``demand_window_s``."""
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise CloudConfigError("[fleet] must be a table")
    known = {
        "operator_ca_file",
        "operators",
        "demand_window_s",
        "resplit_every_s",
        "resplit_change_ratio",
        "resplit_min_kw",
        "republish_every_s",
        "ramp_s",
        "ack_timeout_s",
    }
    extra = sorted(set(section) - known)
    if extra:
        raise CloudConfigError(f"[fleet]: unknown key(s) {', '.join(extra)}")
    ca: Path | None = None
    raw_ca = section.get("operator_ca_file")
    if raw_ca is not None:
        if not isinstance(raw_ca, str) or not raw_ca:
            raise CloudConfigError("[fleet] operator_ca_file must be a path")
        ca = Path(raw_ca) if Path(raw_ca).is_absolute() else base / raw_ca
    elif secure:
        raise CloudConfigError(
            "[fleet] operator_ca_file is required: operators present client certificates of "
            "their own CA (a site's certificate is never an operator)"
        )
    operators = section.get("operators", [])
    if (
        not isinstance(operators, list)
        or not operators
        or not all(isinstance(o, Mapping) for o in operators)
    ):
        raise CloudConfigError("[fleet] operators must be a non-empty list of tables")
    try:
        creds = Credentials.from_config(clients=operators, source="[fleet] operators")
    except AuthConfigError as exc:
        raise CloudConfigError(str(exc)) from exc

    def number(key: str, default: float, *, zero_ok: bool) -> float:
        v = section.get(key, default)
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float)
            or not (v >= 0 if zero_ok else v > 0)
            or v == float("inf")
        ):
            raise CloudConfigError(
                f"[fleet] {key} must be a number {'>=' if zero_ok else '>'} 0, got {v!r}"
            )
        return float(v)

    return FleetConfig(
        ca,
        creds,
        number("demand_window_s", 900.0, zero_ok=False),
        number("resplit_every_s", 60.0, zero_ok=True),
        number("resplit_change_ratio", 0.2, zero_ok=True),
        number("resplit_min_kw", 5.0, zero_ok=True),
        number("republish_every_s", 30.0, zero_ok=True),
        number("ramp_s", 30.0, zero_ok=True),
        number("ack_timeout_s", 120.0, zero_ok=False),
    )


def _metrics_section(section: Any, base: Path) -> MetricsConfig | None:
    try:
        return MetricsConfig.from_section(section, base)
    except MetricsConfigError as exc:
        raise CloudConfigError(str(exc)) from None


_TOP = Section(
    "",
    {
        "listen": Key("host_port", DEFAULT_LISTEN),
        "tls": Key("table"),
        "store": Key(
            "table", required=True, example='[store] url = "sqlite:DIR" or "postgresql://…"'
        ),
        "insecure": Key("bool", False),
        "reflection": Key("bool", True),
        "stop_grace_s": Key("number", 5.0, lo=0),
        "bus": Key("any"),
        "fleet": Key("any"),
        "retention": Key("any"),
        "metrics": Key("any"),
    },
    CloudConfigError,
)
_STORE = Section(
    "[store]",
    {
        "url": Key("text", required=True, example='url = "sqlite:DIR" or "postgresql://…"'),
        "read_timeout_s": Key("number", CloudConfig.store_read_timeout_s, lo=0, above=True),
        "write_timeout_s": Key("number", CloudConfig.store_write_timeout_s, lo=0, above=True),
        "open_timeout_s": Key("number", CloudConfig.store_open_timeout_s, lo=0, above=True),
    },
    CloudConfigError,
)
_TLS = Section(
    "[tls]",
    {k: Key("path", required=True) for k in ("cert_file", "key_file", "client_ca_file")},
    CloudConfigError,
)
_RETENTION = Section(
    "[retention]",
    {
        "telemetry_days": Key("number", CloudRetention.telemetry_days, lo=0),
        "plans_keep": Key("integer", CloudRetention.plans_keep, lo=0),
        "every_s": Key("number", CloudRetention.every_s, lo=0, above=True),
        "batch_rows": Key("integer", CloudRetention.batch_rows, lo=0, above=True),
    },
    CloudConfigError,
    unknown_note=" (audit records are never deleted: no key deletes them)",
)
