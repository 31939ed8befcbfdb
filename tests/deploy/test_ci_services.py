"""``.ci/services`` gives a PostgreSQL it starts what the tests expect: user postgres in from
127.0.0.1 without a password and a database ``test`` (before, it started the server and left
both to the reader of the README). Its pieces are run as they are, sourced from the script: on
copies of a packaged pg_hba.conf, and on a throwaway cluster of the machine's PostgreSQL on a
port of its own (the running server on 5432 is never touched)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from bus_testkit import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / ".ci" / "services"

#: The rules of pg_hba.conf as Debian's pg_createcluster writes them (the packaged sample with
#: peer for local connections, scram-sha-256 for TCP).
PACKAGED_HBA = """\
# Database administrative login by Unix domain socket
local   all             postgres                                peer

# TYPE  DATABASE        USER            ADDRESS                 METHOD

# "local" is for Unix domain socket connections only
local   all             all                                     peer
# IPv4 local connections:
host    all             all             127.0.0.1/32            scram-sha-256
# IPv6 local connections:
host    all             all             ::1/128                 scram-sha-256
# Allow replication connections from localhost, by a user with the
# replication privilege.
local   replication     all                                     peer
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""


def _sourced(call: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``call`` in bash after sourcing .ci/services (which then only defines its functions)."""
    return subprocess.run(
        ["bash", "-c", f'. "$1" && {call}', "services", str(SERVICES)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def _rules(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.split() and line[0] != "#"]


def _trust(hba: Path) -> subprocess.CompletedProcess[str]:
    return _sourced(f'pg_hba_trust_localhost "{hba}"')


TRUST = ["host", "all", "all", "127.0.0.1/32", "trust"]


def test_the_trust_line_goes_before_every_tcp_rule_once(tmp_path: Path) -> None:
    hba = tmp_path / "pg_hba.conf"
    hba.write_text(PACKAGED_HBA)
    done = _trust(hba)
    assert done.returncode == 0 and done.stdout.strip() == "changed", done
    rules = _rules(hba.read_text())
    tcp = [r for r in rules if r[0].startswith("host")]
    assert tcp[0] == TRUST, rules  # first match wins: before the scram-sha-256 line
    assert [r for r in rules if r != TRUST] == _rules(PACKAGED_HBA)  # nothing else changed
    first = hba.read_bytes()
    again = _trust(hba)
    assert again.returncode == 0 and again.stdout == "", again
    assert hba.read_bytes() == first


def test_a_trust_line_after_a_password_rule_is_not_taken_for_done(tmp_path: Path) -> None:
    """Appended at the end, as a reader of the old README might, it is never used."""
    hba = tmp_path / "pg_hba.conf"
    hba.write_text(PACKAGED_HBA + "host all all 127.0.0.1/32 trust\n")
    assert _trust(hba).stdout.strip() == "changed"
    assert next(r for r in _rules(hba.read_text()) if r[0].startswith("host")) == TRUST


def test_a_file_that_already_trusts_127_0_0_1_first_is_left_as_it_is(tmp_path: Path) -> None:
    hba = tmp_path / "pg_hba.conf"
    text = "local all all trust\nhost all all 127.0.0.1/32 trust\n" + PACKAGED_HBA
    hba.write_text(text)
    done = _trust(hba)
    assert done.returncode == 0 and done.stdout == "", done
    assert hba.read_text() == text


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found and shutil.which("runuser") else None


@contextlib.contextmanager
def _throwaway_cluster() -> Iterator[tuple[Path, int]]:
    """A new cluster (initdb as user postgres, its packaged pg_hba rules) running on a free port
    of 127.0.0.1: its directory and port; stopped and removed at the end."""
    pg_bin = _pg_bin()
    if pg_bin is None or os.geteuid() != 0:
        pytest.skip("needs root and the machine's PostgreSQL binaries (initdb)")
    data = Path(tempfile.mkdtemp(prefix="evcore-ci-services-", dir="/tmp"))
    shutil.chown(data, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    try:
        subprocess.run(
            [*as_pg, str(pg_bin / "initdb"), "-D", str(data / "db"), "-U", "postgres"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        (data / "db" / "pg_hba.conf").write_text(PACKAGED_HBA)
        options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
        pg_ctl = [*as_pg, str(pg_bin / "pg_ctl"), "-D", str(data / "db")]
        subprocess.run(
            [*pg_ctl, "-o", options, "-w", "-l", str(data / "log"), "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield data / "db", port
    finally:
        subprocess.run(
            [*as_pg, str(pg_bin / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(data, ignore_errors=True)


def test_a_cluster_with_the_packaged_rules_lets_the_tests_in_after_both_steps() -> None:
    with _throwaway_cluster() as (db, port):
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=test connect_timeout=5"
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(dsn.replace("dbname=test", "dbname=postgres")).close()
        assert _trust(db / "pg_hba.conf").stdout.strip() == "changed"
        pg_bin = _pg_bin()
        assert pg_bin is not None
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(pg_bin / "pg_ctl"), "-D", str(db), "reload"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        with pytest.raises(psycopg.OperationalError, match='database "test" does not exist'):
            psycopg.connect(dsn).close()
        for _ in range(2):  # the second run finds it
            made = _sourced("pg_ensure_database test", PGPORT=str(port))
            assert made.returncode == 0, made
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("test",)


def test_creating_the_database_without_the_trust_line_fails_at_once_naming_why() -> None:
    with _throwaway_cluster() as (_, port):
        made = _sourced("pg_ensure_database test", PGPORT=str(port))
        assert made.returncode != 0 and "password" in made.stderr, made
