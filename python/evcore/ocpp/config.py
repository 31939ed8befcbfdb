"""The ``[ocpp]`` section of the site file and the station credentials.

This module owns parsing and checking the central system's configuration: listen address, path
prefix, security profile, TLS files, station credentials (inline or from a credentials file),
DataTransfer vendor ids, what to measure, timeouts and queue bounds. It never opens a socket.
Errors name the key that was wrong (``OcppConfigError``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    #: At start, freeze what is allocated so far out of the cyclic GC's reach and collect the
    #: young generation less often (full collections over a large heap stall every station).
    #: Process-wide, so opt-in: the process that owns the event loop decides.
    gc_tuning: bool = False

    def credentials_for(self, ocpp_id: str) -> StationCredentials | None:
        return self.credentials.get(ocpp_id)

    def profile_for(self, ocpp_id: str) -> int:
        cred = self.credentials.get(ocpp_id)
        if cred is not None and cred.security_profile is not None:
            return cred.security_profile
        return self.security_profile


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
    if profile is not None and profile not in (0, 1, 2, 3):
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
        raise OcppConfigError(f"ocpp.credentials_file {str(p)!r}: {exc}") from exc
    stations = data.get("stations", {})
    if not isinstance(stations, Mapping):
        raise OcppConfigError(f"ocpp.credentials_file {str(p)!r}: [stations] must be a table")
    return {
        sid: _parse_credentials(f"{p}: stations.{sid}", sid, raw) for sid, raw in stations.items()
    }


_KEYS = {
    "host",
    "port",
    "path_prefix",
    "security_profile",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "credentials",
    "credentials_file",
    "data_transfer_vendor_ids",
    "measurands",
    "sample_interval_s",
    "heartbeat_interval_s",
    "call_timeout_s",
    "queue_bound",
    "whole_amperes",
    "configure_on_boot",
    "stack_level",
    "max_clock_skew_s",
    "store_batch_window_s",
    "max_frame_bytes",
    "gc_tuning",
}


def parse_ocpp_section(
    section: Mapping[str, Any] | None, *, base_dir: str | Path | None = None
) -> OcppConfig:
    """Build an :class:`OcppConfig` from the site file's ``[ocpp]`` table (may be empty)."""
    raw = dict(section or {})
    unknown = set(raw) - _KEYS
    if unknown:
        raise OcppConfigError(f"ocpp: unknown keys {sorted(unknown)}")

    def typed(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = raw.get(key, default)
        if value is not None and not isinstance(value, kind):
            raise OcppConfigError(f"ocpp.{key}: expected {kind}, got {value!r}")
        return value

    creds: dict[str, StationCredentials] = {}
    cfile = typed("credentials_file", str, None)
    if cfile is not None:
        path = Path(cfile)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        creds.update(load_credentials_file(path))
    inline = typed("credentials", Mapping, {})
    for sid, entry in inline.items():
        creds[sid] = _parse_credentials(f"ocpp.credentials.{sid}", sid, entry)

    profile = typed("security_profile", int, 1)
    if profile not in (0, 1, 2, 3):
        raise OcppConfigError(f"ocpp.security_profile: expected 0, 1, 2 or 3, got {profile}")
    tls_cert = typed("tls_cert", str, None)
    tls_key = typed("tls_key", str, None)
    tls_ca = typed("tls_client_ca", str, None)
    if profile >= 2 and (tls_cert is None or tls_key is None):
        raise OcppConfigError(
            "ocpp.tls_cert and ocpp.tls_key are required for security profile 2/3"
        )
    if profile == 3 and tls_ca is None:
        raise OcppConfigError("ocpp.tls_client_ca is required for security profile 3")
    window = float(typed("store_batch_window_s", (int, float), 0.005))
    if not 0.0 <= window <= 1.0:
        raise OcppConfigError(f"ocpp.store_batch_window_s: must be within [0, 1] s, got {window}")
    max_frame = typed("max_frame_bytes", int, 16 * 1024 * 1024)
    if isinstance(max_frame, bool) or not 65_536 <= max_frame <= 1 << 30:
        raise OcppConfigError(
            f"ocpp.max_frame_bytes: must be within [65536, 1073741824] bytes, got {max_frame!r}"
        )
    port = typed("port", int, 9000)
    if not 0 <= port <= 65535:
        raise OcppConfigError(f"ocpp.port: expected 0..65535, got {port}")
    prefix = typed("path_prefix", str, "/ocpp").rstrip("/")
    if prefix and not prefix.startswith("/"):
        raise OcppConfigError(f"ocpp.path_prefix: must start with '/', got {prefix!r}")
    measurands = tuple(typed("measurands", list, list(DEFAULT_MEASURANDS)))
    interval = typed("sample_interval_s", int, 10)
    if interval < 1:
        raise OcppConfigError(f"ocpp.sample_interval_s: must be >= 1, got {interval}")
    timeout = float(typed("call_timeout_s", (int, float), 30.0))
    if timeout <= 0:
        raise OcppConfigError(f"ocpp.call_timeout_s: must be > 0, got {timeout}")
    bound = typed("queue_bound", int, 32)
    if bound < 1:
        raise OcppConfigError(f"ocpp.queue_bound: must be >= 1, got {bound}")
    return OcppConfig(
        host=typed("host", str, "127.0.0.1"),
        port=port,
        path_prefix=prefix,
        security_profile=profile,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_ca,
        credentials=creds,
        data_transfer_vendor_ids=tuple(typed("data_transfer_vendor_ids", list, [])),
        measurands=measurands,
        sample_interval_s=interval,
        heartbeat_interval_s=typed("heartbeat_interval_s", int, 300),
        call_timeout_s=timeout,
        queue_bound=bound,
        whole_amperes=typed("whole_amperes", bool, True),
        configure_on_boot=typed("configure_on_boot", bool, True),
        stack_level=typed("stack_level", int, 1),
        max_clock_skew_s=float(typed("max_clock_skew_s", (int, float), 300.0)),
        store_batch_window_s=window,
        max_frame_bytes=max_frame,
        gc_tuning=typed("gc_tuning", bool, False),
    )
