"""A ``[store]`` whose keys belong to the other kind is refused naming both. ``dsn`` (and
``schema``) without ``kind = "postgres"`` opened the embedded store, the default, without a word:
an edge told ``dsn = "postgresql://…"`` kept its audit trail, sessions and telemetry in SQLite
files under its working directory, and the database the operator looked at stayed empty."""

from __future__ import annotations

from pathlib import Path

import pytest
from evcore.cli import main
from evcore.store import StoreConfig, StoreConfigError, open_store
from pg_testkit import PG_DSN

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ({"dsn": PG_DSN}, "dsn"),
        ({"kind": "embedded", "dsn": PG_DSN}, "dsn"),
        ({"schema": "depot_1"}, "schema"),
        ({"kind": "postgres", "dsn": PG_DSN, "path": "var/store"}, "path"),
    ],
    ids=["dsn-without-kind", "dsn-with-embedded", "schema-without-kind", "path-with-postgres"],
)
def test_a_key_of_the_other_kind_is_refused_naming_it_and_the_kind(
    section: dict[str, object], named: str, tmp_path: Path
) -> None:
    with pytest.raises(StoreConfigError) as refused:
        StoreConfig.from_section(section)
    said = str(refused.value)
    assert f"[store] {named}" in said and "kind" in said, said
    with pytest.raises(StoreConfigError):
        open_store(section, tmp_path)
    assert not (tmp_path / "var").exists(), "an embedded store was opened"


def test_site_check_refuses_a_dsn_without_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.toml"
    example = (ROOT / "edge" / "site.example.toml").read_text(encoding="utf-8")
    site.write_text(example + f'\n[store]\ndsn = "{PG_DSN}"\n')
    assert main(["site", "check", str(site)]) == 2
    assert "[store] dsn" in capsys.readouterr().err


def test_each_kind_still_takes_its_own_keys() -> None:
    pg = StoreConfig.from_section({"kind": "postgres", "dsn": PG_DSN, "schema": "depot_1"})
    assert (pg.kind, pg.dsn, pg.schema) == ("postgres", PG_DSN, "depot_1")
    embedded = StoreConfig.from_section({"path": "var/other"})
    assert (embedded.kind, embedded.path) == ("embedded", "var/other")
