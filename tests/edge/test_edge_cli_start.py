"""`evcore edge` whose start fails ends with a message and a non-zero code (a supervisor can
restart it or alert); an unreadable bus outbox no longer keeps it from starting."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import pytest
from bus_testkit import SHARED_NATS, free_port
from edge_testkit import spawn_edge, start_edge
from evcore.edge.sitegen import depot_table, to_toml

pytestmark = pytest.mark.timeout(120)


async def _run_until_exit(site_file: Path, timeout_s: float) -> tuple[int | None, str]:
    proc = await spawn_edge(site_file)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        out, _ = await proc.communicate()
        return None, out.decode()
    return proc.returncode, out.decode()


async def test_a_start_that_fails_exits_non_zero_naming_the_error(tmp_path: Path) -> None:
    """Review 2026-12-05 (HIGH): with its OCPP port taken the edge printed nothing and waited
    for ever, deaf to SIGTERM (systemd's Restart= never fired)."""
    table = depot_table(2, per_feeder=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        table["ocpp"]["port"] = taken.getsockname()[1]
        table["store"] = {"kind": "embedded", "path": str(tmp_path / "store")}
        site_file = tmp_path / "site.toml"
        site_file.write_text(to_toml(table))
        rc, out = await _run_until_exit(site_file, 45.0)
    assert rc == 1, f"still running after 45 s (rc {rc}): {out[-1500:]}"
    assert "could not start" in out and "address already in use" in out


async def test_an_unreadable_outbox_is_set_aside_and_the_edge_starts(tmp_path: Path) -> None:
    """Review 2026-12-05: a garbage outbox file ("file is not a database") kept the edge from
    ever starting; now it is moved aside and the edge controls."""
    site = "outbox-garbage"
    table = depot_table(2, per_feeder=2, site_id=site)
    table["ocpp"]["port"] = free_port()
    table["store"] = {"kind": "embedded", "path": str(tmp_path / "store")}
    outbox = tmp_path / "outbox"
    table["bus"] = {"kind": "nats", "urls": [SHARED_NATS], "outbox_dir": str(outbox)}
    outbox.mkdir()
    bad = outbox / f"{site}.sqlite"
    bad.write_bytes(b"garbage" * 200)
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    proc = await start_edge(site_file, timeout_s=45.0)
    try:
        assert len(list(outbox.glob(f"{site}.sqlite.corrupt-*"))) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    ("change", "says", "rc"),
    [
        ({"bus": {"kind": "kafka"}}, "[bus] kind must be one of", 2),
        ({"api": {"tokens": "abcdefabcdefabcdef"}}, "[api] tokens: expected an array of tables", 2),
        ({"api": {"tokens": ["abcdefabcdefabcdef"]}}, "[api] tokens[0]: expected a table", 2),
        ({"ocpp": None}, "[ocpp]: expected a table, got int", 2),  # ocpp = 5
        ({"edge": {"tick_s": 1e-9}}, "[edge].tick_s must be a number >= 0.05", 2),
        ({"store": [{"path": "x"}]}, "[store]: expected a table, got list", 2),
    ],
)
async def test_a_bad_section_is_a_message_not_a_traceback(
    tmp_path: Path, change: dict[str, object], says: str, rc: int
) -> None:
    """Review of session 13: a bad [bus] kind or [api] tokens that are not tables ended in a
    traceback (ValueError, AttributeError)."""
    table = depot_table(2, per_feeder=2)
    table["ocpp"]["port"] = free_port()
    table.update(change)
    top = ""
    if change.get("ocpp", {}) is None:  # a bare key where a table belongs: before the tables
        del table["ocpp"]
        top = "ocpp = 5\n"
    site_file = tmp_path / "site.toml"
    site_file.write_text(top + to_toml(table))
    got, out = await _run_until_exit(site_file, 45.0)
    assert got == rc and says in out and "Traceback" not in out, out[-1500:]


async def test_an_api_section_with_enabled_false_opens_no_port(tmp_path: Path) -> None:
    """Review of session 13: `[api] enabled = false` was documented and ignored (the API was
    served)."""
    port = free_port()
    table = depot_table(2, per_feeder=2)
    table["ocpp"]["port"] = free_port()
    table["api"] = {"enabled": False, "listen": f"127.0.0.1:{port}"}
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    proc = await start_edge(site_file, timeout_s=45.0)
    try:
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0


async def test_an_audit_journal_that_cannot_be_written_stops_the_start(tmp_path: Path) -> None:
    """Review of session 13: under the shipped service unit the journal went beside the site
    file, in the read-only /etc/evcore, and was found unwritable only when the store failed:
    then no decision could leave. Now the edge does not start, naming the key."""
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the journal's directory should be")
    table = depot_table(2, per_feeder=2)
    table["ocpp"]["port"] = free_port()
    table["store"] = {"kind": "embedded", "path": str(tmp_path / "store")}
    table["edge"] = {"audit_journal": str(not_a_dir / "audit-journal")}
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    rc, out = await _run_until_exit(site_file, 45.0)
    assert rc == 1, out[-1500:]
    assert "[edge].audit_journal: cannot write in" in out and str(not_a_dir) in out


async def test_an_unknown_table_is_refused_as_site_check_refuses_it(tmp_path: Path) -> None:
    """Review of session 13: a `[metric]` typo (for `[metrics]`) ran without a metrics endpoint
    and without a word; `evcore site check` refused it, the edge did not."""
    table = depot_table(2, per_feeder=2)
    table["ocpp"]["port"] = free_port()
    table["metric"] = {"listen": "127.0.0.1:0"}
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    rc, out = await _run_until_exit(site_file, 45.0)
    assert rc == 2 and "unknown table [metric]" in out and "[metrics]" in out, out[-1500:]
