"""Persistence for the edge: one :class:`Store` interface, an embedded SQLite implementation
(default) and a PostgreSQL one, chosen by the site file's ``[store]`` section (docs/store.md).

    store = open_store(site.sections.get("store"), base_dir)
    await store.open()          # connects and applies migrations; optional (lazy otherwise)
    ...
    await store.close()
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from evcore.store.base import (
    AuditChainConflict,
    AuditHead,
    SessionRecord,
    SetpointRecord,
    Store,
    StoreConfig,
    StoreConfigError,
    StoredAuditRow,
    StoreError,
    StoreUnavailable,
    TransactionRecord,
)
from evcore.store.retention import run_retention
from evcore.store.sql import SqlStore

__all__ = [
    "AuditChainConflict",
    "AuditHead",
    "SessionRecord",
    "SetpointRecord",
    "SqlStore",
    "Store",
    "StoreConfig",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailable",
    "StoredAuditRow",
    "TransactionRecord",
    "open_store",
    "open_store_url",
    "run_retention",
    "split_postgres_url",
    "store_url_directory",
]


def open_store(
    section: Mapping[str, object] | None, base_dir: Path | str, *, must_exist: bool = False
) -> SqlStore:
    """Build the store the ``[store]`` section names (embedded when absent); relative paths are
    taken from ``base_dir`` (the site file's directory). Nothing is opened until ``open()``.
    ``must_exist`` makes opening fail instead of creating an empty store (read-only tools)."""
    cfg = StoreConfig.from_section(section)
    if cfg.kind == "postgres":
        from evcore.store.postgres import postgres_store

        return postgres_store(
            cfg.dsn,
            cfg.schema,
            telemetry_retention_s=cfg.telemetry_retention_s,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            write_timeout_s=cfg.write_timeout_s,
            open_timeout_s=cfg.open_timeout_s,
            must_exist=must_exist,
        )
    from evcore.store.sqlite import sqlite_store

    directory = Path(cfg.path)
    if not directory.is_absolute():
        directory = Path(base_dir) / directory
    return sqlite_store(
        directory,
        telemetry_retention_s=cfg.telemetry_retention_s,
        must_exist=must_exist,
        read_timeout_s=cfg.read_timeout_s,
        write_timeout_s=cfg.write_timeout_s,
        open_timeout_s=cfg.open_timeout_s,
    )


def open_store_url(url: str, base_dir: Path | str = ".", *, must_exist: bool = False) -> SqlStore:
    """A store from a URL: ``sqlite:DIR`` / ``sqlite:///abs/dir`` / a plain directory, or
    ``postgresql://user@host:port/db?schema=NAME`` (schema defaults to ``evcore``)."""
    if url.startswith(("postgresql://", "postgres://")):
        dsn, schema = split_postgres_url(url, "evcore")
        return open_store(
            {"kind": "postgres", "dsn": dsn, "schema": schema}, base_dir, must_exist=must_exist
        )
    return open_store(
        {"kind": "embedded", "path": store_url_directory(url)}, base_dir, must_exist=must_exist
    )


def split_postgres_url(url: str, default_schema: str) -> tuple[str, str]:
    """``(dsn, schema)`` of ``postgresql://user@host:port/db?schema=NAME``: the ``schema`` query
    parameter taken out of the DSN (``default_schema`` when absent)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), default_schema)
    rest = [(k, v) for k, v in query if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def store_url_directory(url: str) -> str:
    """The directory of an embedded store's URL: ``sqlite:DIR``, ``sqlite:///abs/dir`` or a plain
    directory (as given: relative ones are the caller's to resolve)."""
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise StoreConfigError(f"store URL {url!r} names no directory")
        return path
    if "://" in url:
        raise StoreConfigError(
            f"store URL {url!r}: scheme must be sqlite: or postgresql:// (or give a directory)"
        )
    return url
