"""The ``[ocpp]`` section of the site file and the station credentials.

This module owns parsing and checking the central system's configuration: listen address, path
prefix, security profile, TLS files, station credentials (inline or from a credentials file),
DataTransfer vendor ids, what to measure, timeouts and queue bounds. It never opens a socket.
Errors name the key that was wrong, ``[ocpp].key``, and the value (``OcppConfigError``); the
keys are checked by the project's one section validator, :mod:`evcore.site.sections`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evcore.site.sections import Key, Section

DEFAULT_MEASURANDS: tuple[str, ...] = (
    "Current.Import",
    "Power.Active.Import",
    "Energy.Active.Import.Register",
    "Current.Offered",
)

_HEX = re.compile(r"^[0-9A-Fa-f]+$")


class OcppConfigError(ValueError):
    """The ``[ocpp]`` section or the credentials file is invalid; the message names the key."""


@dataclass(frozen=True)
class StationCredentials:
    """How one station (by its OCPP identity) proves who it is."""

    ocpp_id: str
    password: str | None = None
    #: OCPP 1.6 ``AuthorizationKey`` (16–20 bytes) given hex-encoded; the station may send either
    #: the hex string or the raw key as its Basic-auth password.
    authorization_key_hex: str | None = None
    #: Security profile for this station; ``None`` means the site default.
    security_profile: int | None = None
    #: Certificate common name expected under security profile 3 (the station serial).
    serial: str | None = None

    def passwords(self) -> tuple[bytes, ...]:
        out: list[bytes] = []
        if self.password is not None:
            out.append(self.password.encode())
        if self.authorization_key_hex is not None:
            out.append(self.authorization_key_hex.encode())
            out.append(bytes.fromhex(self.authorization_key_hex))
        return tuple(out)


@dataclass(frozen=True)
class OcppConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    path_prefix: str = "/ocpp"
    #: 0 = no authentication (tests and closed networks only), 1 = Basic auth, 2 = TLS + Basic auth,
    #: 3 = mutual TLS.
    security_profile: int = 1
    tls_cert: str | None = None
    tls_key: str | None = None
    #: CA bundle used to verify client certificates (security profile 3).
    tls_client_ca: str | None = None
    credentials: Mapping[str, StationCredentials] = field(default_factory=dict)
    data_transfer_vendor_ids: tuple[str, ...] = ()
    measurands: tuple[str, ...] = DEFAULT_MEASURANDS
    sample_interval_s: int = 10
    heartbeat_interval_s: int = 300
    call_timeout_s: float = 30.0
    queue_bound: int = 32
    #: Send charging limits in whole amperes (many chargers reject fractions); otherwise 0.1 A.
    whole_amperes: bool = True
    #: Configure measurands and interval after every accepted BootNotification.
    configure_on_boot: bool = True
    stack_level: int = 1
    #: Timestamps further than this in the future (relative to the clock) are refused.
    max_clock_skew_s: float = 300.0
    #: Meter samples arriving within this window go to the store in one write (group commit).
    store_batch_window_s: float = 0.005
    #: The largest WebSocket message a station may send; a larger one closes the connection
    #: (1009). A 1.6 StopTransaction carries the session's transactionData: 4 h of 10 s samples
    #: of the default measurands is 1.9 MiB (websockets' default, 1 MiB, refused it for ever).
    max_frame_bytes: int = 16 * 1024 * 1024
    #: A WebSocket ping to each station this often; one not answered within ``pong_timeout_s``
    #: ends the connection (the station is reported gone). 0: no pings. Without them a link that
    #: died without a close (power cut, a modem or NAT dropping the flow) kept the station
    #: connected for good.
    ping_interval_s: float = 30.0
    #: How long a ping's pong may take before the connection is failed (1011). None: the time
    #: ``max_frame_bytes`` takes at ``SLOW_LINK_BYTES_PER_S`` (at least ``ping_interval_s``): a
    #: station's pong waits behind the frame it is sending, and websockets does not count
    #: received data as a sign of life, so a shorter wait failed a large StopTransaction over a
    #: slow cellular link mid-frame, and the station resent it after reconnecting, for ever.
    ping_timeout_s: float | None = None
    #: At start, freeze what is allocated so far out of the cyclic GC's reach and collect the
    #: young generation less often (full collections over a large heap stall every station).
    #: Process-wide, so opt-in: the process that owns the event loop decides.
    gc_tuning: bool = False

    @property
    def pong_timeout_s(self) -> float:
        """The wait for a pong in force: ``ping_timeout_s``, or the time ``max_frame_bytes``
        takes at ``SLOW_LINK_BYTES_PER_S`` (at least ``ping_interval_s``)."""
        if self.ping_timeout_s is not None:
            return self.ping_timeout_s
        return max(self.ping_interval_s, self.max_frame_bytes / SLOW_LINK_BYTES_PER_S)

    def credentials_for(self, ocpp_id: str) -> StationCredentials | None:
        return self.credentials.get(ocpp_id)

    def profile_for(self, ocpp_id: str) -> int:
        cred = self.credentials.get(ocpp_id)
        if cred is not None and cred.security_profile is not None:
            return cred.security_profile
        return self.security_profile

    def check_tls_files(self) -> None:
        """Each TLS file named is a file (relative paths were taken against the site file's
        folder by :func:`parse_ocpp_section`); OcppConfigError naming ``[ocpp].key`` and the
        path. The central system calls it when it loads; ``parse_ocpp_section`` does not, so
        that a site file can be read where its TLS files are not (``evcore simcp``, checks of
        a deployable)."""
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise OcppConfigError(f"[ocpp].{key}: no such file {path!r}")


def _check_password(where: str, password: str) -> None:
    if not 16 <= len(password) <= 40:
        raise OcppConfigError(
            f"{where}: password must be 16 to 40 characters (OCPP BasicAuthPassword), "
            f"got {len(password)}"
        )


def _parse_credentials(where: str, ocpp_id: str, raw: Any) -> StationCredentials:
    if isinstance(raw, str):
        raw = {"password": raw}
    if not isinstance(raw, Mapping):
        raise OcppConfigError(f"{where}: expected a table or a password string")
    unknown = set(raw) - {"password", "authorization_key_hex", "security_profile", "serial"}
    if unknown:
        raise OcppConfigError(f"{where}: unknown keys {sorted(unknown)}")
    password = raw.get("password")
    if password is not None:
        if not isinstance(password, str):
            raise OcppConfigError(f"{where}.password: expected a string")
        _check_password(where, password)
    key_hex = raw.get("authorization_key_hex")
    if key_hex is not None:
        if not isinstance(key_hex, str) or not _HEX.match(key_hex) or len(key_hex) % 2:
            raise OcppConfigError(
                f"{where}.authorization_key_hex: expected an even-length hex string"
            )
        if not 16 <= len(key_hex) // 2 <= 20:
            raise OcppConfigError(
                f"{where}.authorization_key_hex: the 1.6 AuthorizationKey is 16 to 20 bytes, "
                f"got {len(key_hex) // 2}"
            )
    profile = raw.get("security_profile")
    # (``true`` and ``1.0`` equal 1: both were taken for profile 1)
    if profile is not None and (type(profile) is not int or profile not in (0, 1, 2, 3)):
        raise OcppConfigError(f"{where}.security_profile: expected 0, 1, 2 or 3, got {profile!r}")
    serial = raw.get("serial")
    if serial is not None and not isinstance(serial, str):
        raise OcppConfigError(f"{where}.serial: expected a string")
    return StationCredentials(
        ocpp_id=ocpp_id,
        password=password,
        authorization_key_hex=key_hex,
        security_profile=profile,
        serial=serial,
    )


def load_credentials_file(path: str | Path) -> dict[str, StationCredentials]:
    """A TOML file with one table per station: ``[stations.CP01] password = "…"``."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise OcppConfigError(f"[ocpp].credentials_file {str(p)!r}: {exc}") from exc
    stations = data.get("stations", {})
    if not isinstance(stations, Mapping):
        raise OcppConfigError(f"[ocpp].credentials_file {str(p)!r}: [stations] must be a table")
    return {
        sid: _parse_credentials(f"{p}: stations.{sid}", sid, raw) for sid, raw in stations.items()
    }


#: The slow link the default ``ping_timeout_s`` allows for: a cellular uplink at 20 kB/s (16 MiB
#: then takes 839 s, the 1.9 MiB of a 4 h StopTransaction 100 s).
SLOW_LINK_BYTES_PER_S = 20_000.0
#: The largest ``max_frame_bytes`` range (checked here: ``Section`` prints 2**30 as 1.07374e+09).
_FRAME_BYTES = (65_536, 1 << 30)
#: OCPP's ``CiString255`` (1.6 DataTransfer.vendorId; 2.0.1 vendorId and measurand maxLength).
_MAX_CHARS = 255

_SECTION = Section(
    "[ocpp]",
    {
        "host": Key("text", default="127.0.0.1"),
        "port": Key("integer", default=9000, lo=0, hi=65535),
        "path_prefix": Key("any", default="/ocpp"),
        "security_profile": Key("integer", default=1, lo=0, hi=3),
        # Relative to the site file's folder (``base_dir``), like every other file it names.
        "tls_cert": Key("path"),
        "tls_key": Key("path"),
        "tls_client_ca": Key("path"),
        "credentials": Key("table"),
        "credentials_file": Key("path"),
        "data_transfer_vendor_ids": Key("any", default=()),
        "measurands": Key("any", default=DEFAULT_MEASURANDS),
        "sample_interval_s": Key("integer", default=10, lo=1, hi=86_400),
        "heartbeat_interval_s": Key("integer", default=300, lo=1, hi=86_400),
        # NaN or inf made every CALL time out at once (every station answer was dropped).
        "call_timeout_s": Key("number", default=30.0, lo=0, above=True, hi=3_600),
        "queue_bound": Key("integer", default=32, lo=1, hi=10_000),
        "whole_amperes": Key("bool", default=True),
        "configure_on_boot": Key("bool", default=True),
        # OCPP's stackLevel is >= 0.
        "stack_level": Key("integer", default=1, lo=0),
        # Every profile's startSchedule is this much before now: a day is already generous.
        "max_clock_skew_s": Key("number", default=300.0, lo=0, hi=86_400),
        "store_batch_window_s": Key("number", default=0.005, lo=0, hi=1),
        "max_frame_bytes": Key("any", default=16 * 1024 * 1024),
        "ping_interval_s": Key("number", default=30.0, lo=0, hi=3_600),
        # No default: derived from max_frame_bytes (OcppConfig.pong_timeout_s).
        "ping_timeout_s": Key("number", lo=0, above=True, hi=86_400),
        "gc_tuning": Key("bool", default=False),
    },
    OcppConfigError,
)


def _strings(key: str, value: Any, *, non_empty: bool, csv: bool = False) -> tuple[str, ...]:
    """A list of non-empty strings of at most 255 characters (``CiString255``); ``non_empty``:
    the list may not be empty; ``csv``: no commas or spaces in a name (1.6 sends measurands as
    one comma-separated configuration value)."""
    items = value if isinstance(value, list | tuple) else None
    if (
        items is None
        or (non_empty and not items)
        or not all(isinstance(v, str) and v.strip() and len(v) <= _MAX_CHARS for v in items)
        or (csv and any("," in v or any(c.isspace() for c in v) for v in items))
    ):
        what = "a non-empty list" if non_empty else "a list"
        kind = "names without commas or spaces" if csv else "non-empty strings"
        raise OcppConfigError(
            f"{_SECTION.label(key)} must be {what} of {kind} (at most {_MAX_CHARS} characters "
            f"each), got {value!r}"
        )
    return tuple(items)


def _path_prefix(value: Any) -> str:
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise OcppConfigError(
            f"{_SECTION.label('path_prefix')} must be a string starting with '/' "
            f"(or empty), got {value!r}"
        )
    return value.rstrip("/")


def _frame_bytes(value: Any) -> int:
    lo, hi = _FRAME_BYTES
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise OcppConfigError(
            f"{_SECTION.label('max_frame_bytes')} must be an integer in [{lo}, {hi}] bytes, "
            f"got {value!r}"
        )
    return value


def parse_ocpp_section(
    section: Mapping[str, Any] | None, *, base_dir: str | Path | None = None
) -> OcppConfig:
    """Build an :class:`OcppConfig` from the site file's ``[ocpp]`` table (may be empty).

    Every key is checked (kind and range; errors name ``[ocpp].key`` and the value). File paths
    (``tls_*``, ``credentials_file``) are taken relative to ``base_dir``, the site file's folder
    (the working directory when None). The credentials file is read here; whether the TLS files
    exist is :meth:`OcppConfig.check_tls_files` (the central system calls it when it loads)."""
    raw = {} if section is None else section
    if isinstance(raw, Mapping):
        unknown = sorted(set(raw) - set(_SECTION.keys))
        if unknown:
            # "unknown keys" (plural) is what callers and tests have matched on.
            raise OcppConfigError(
                f"[ocpp]: unknown keys {', '.join(unknown)}; known keys: "
                f"{', '.join(sorted(_SECTION.keys))}"
            )
    v = _SECTION.read(raw, "." if base_dir is None else base_dir)

    creds: dict[str, StationCredentials] = {}
    if "credentials_file" in v:
        creds.update(load_credentials_file(v["credentials_file"]))
    for sid, entry in v.get("credentials", {}).items():
        creds[sid] = _parse_credentials(f"[ocpp].credentials.{sid}", sid, entry)

    profile: int = v["security_profile"]
    tls = {k: str(v[k]) if k in v else None for k in ("tls_cert", "tls_key", "tls_client_ca")}
    if profile >= 2 and (tls["tls_cert"] is None or tls["tls_key"] is None):
        raise OcppConfigError(
            f"[ocpp].tls_cert and [ocpp].tls_key are required for security profile 2/3, "
            f"got security_profile = {profile}"
        )
    if profile == 3 and tls["tls_client_ca"] is None:
        raise OcppConfigError("[ocpp].tls_client_ca is required for security profile 3")
    return OcppConfig(
        host=v["host"],
        port=v["port"],
        path_prefix=_path_prefix(v["path_prefix"]),
        security_profile=profile,
        tls_cert=tls["tls_cert"],
        tls_key=tls["tls_key"],
        tls_client_ca=tls["tls_client_ca"],
        credentials=creds,
        data_transfer_vendor_ids=_strings(
            "data_transfer_vendor_ids", v["data_transfer_vendor_ids"], non_empty=False
        ),
        measurands=_strings("measurands", v["measurands"], non_empty=True, csv=True),
        sample_interval_s=v["sample_interval_s"],
        heartbeat_interval_s=v["heartbeat_interval_s"],
        call_timeout_s=v["call_timeout_s"],
        queue_bound=v["queue_bound"],
        whole_amperes=v["whole_amperes"],
        configure_on_boot=v["configure_on_boot"],
        stack_level=v["stack_level"],
        max_clock_skew_s=v["max_clock_skew_s"],
        store_batch_window_s=v["store_batch_window_s"],
        max_frame_bytes=_frame_bytes(v["max_frame_bytes"]),
        ping_interval_s=v["ping_interval_s"],
        ping_timeout_s=v.get("ping_timeout_s"),
        gc_tuning=v["gc_tuning"],
    )
