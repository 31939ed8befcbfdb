"""``cloud.toml``: where the cloud listens, its TLS files and its store (docs/cloud.md)."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
class CloudConfig:
    store_url: str
    listen: str = DEFAULT_LISTEN
    tls: CloudTls | None = None
    # Local development only: no TLS, the site id taken from the `x-evcore-site-id` header.
    insecure: bool = False
    reflection: bool = True
    stop_grace_s: float = 5.0

    @staticmethod
    def from_table(table: Mapping[str, Any], base_dir: Path | str = ".") -> CloudConfig:
        base = Path(base_dir)
        known = {"listen", "tls", "store", "insecure", "reflection", "stop_grace_s"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise CloudConfigError(f"unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
        listen = table.get("listen", DEFAULT_LISTEN)
        if not isinstance(listen, str) or ":" not in listen:
            raise CloudConfigError(f"listen must be 'host:port', got {listen!r}")
        insecure = table.get("insecure", False)
        if not isinstance(insecure, bool):
            raise CloudConfigError(f"insecure must be true or false, got {insecure!r}")
        reflection = table.get("reflection", True)
        if not isinstance(reflection, bool):
            raise CloudConfigError(f"reflection must be true or false, got {reflection!r}")
        grace = table.get("stop_grace_s", 5.0)
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
            raise CloudConfigError(f"stop_grace_s must be a number >= 0, got {grace!r}")

        store = table.get("store")
        if not isinstance(store, Mapping) or not isinstance(store.get("url"), str):
            raise CloudConfigError("[store] url is required (sqlite:DIR or postgresql://…)")
        extra = sorted(set(store) - {"url"})
        if extra:
            raise CloudConfigError(f"[store]: unknown key(s) {', '.join(extra)}")
        url = str(store["url"])
        if not url.startswith(("postgresql://", "postgres://")) and "://" not in url:
            path = Path(url.removeprefix("sqlite:").removeprefix("//"))
            if not path.is_absolute():
                url = f"sqlite:{base / path}"

        tls: CloudTls | None = None
        t = table.get("tls")
        if t is not None:
            if not isinstance(t, Mapping):
                raise CloudConfigError("[tls] must be a table")
            extra = sorted(set(t) - {"cert_file", "key_file", "client_ca_file"})
            if extra:
                raise CloudConfigError(f"[tls]: unknown key(s) {', '.join(extra)}")

            def path_of(key: str) -> Path:
                v = t.get(key)
                if not isinstance(v, str) or not v:
                    raise CloudConfigError(f"[tls] {key} is required (a path)")
                p = Path(v)
                return p if p.is_absolute() else base / p

            tls = CloudTls(path_of("cert_file"), path_of("key_file"), path_of("client_ca_file"))
        if tls is None and not insecure:
            raise CloudConfigError(
                "[tls] (cert_file, key_file, client_ca_file) is required: sites authenticate "
                "with client certificates; `insecure = true` only for local development"
            )
        if tls is not None and insecure:
            raise CloudConfigError("insecure = true and [tls] together: choose one")
        return CloudConfig(
            store_url=url,
            listen=listen,
            tls=tls,
            insecure=insecure,
            reflection=reflection,
            stop_grace_s=float(grace),
        )

    @staticmethod
    def from_file(path: str | Path) -> CloudConfig:
        p = Path(path)
        try:
            with p.open("rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise CloudConfigError(f"cannot read {p}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise CloudConfigError(f"{p} is not valid TOML: {exc}") from exc
        return CloudConfig.from_table(table, p.parent)
