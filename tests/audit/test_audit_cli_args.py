"""``evcore audit show`` refuses a ``--limit`` below 1 and a ``--since``/``--until`` that is no
finite time with an argparse error naming the option (review A: ``--limit 0``, negative limits,
``--since nan`` and ``--since 1e400`` were taken and passed to the store); a ``--config`` site
file that is not UTF-8 is said, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from evcore.audit.cli import main as audit_main


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--limit", "0"], "argument --limit: must be at least 1"),
        (["--limit", "-5"], "argument --limit: must be at least 1"),
        (["--limit", str(2**63)], "argument --limit: must be at least 1 (and at most 2**63 - 1)"),
        (["--since", "nan"], "argument --since: time 'nan' is not a finite time"),
        (["--since", "1e400"], "argument --since: time '1e400' is not a finite time"),
        (["--until=-inf"], "argument --until: time '-inf' is not a finite time"),
        (["--since", "9" * 400 + "d"], "argument --since: time '999"),
        (["--since", "soon"], "argument --since: time 'soon' is not ISO 8601"),
        # Review 2027-01: milliseconds for seconds gave a silent "no decisions in that period".
        (
            ["--since", "1767225600000"],
            "argument --since: time '1767225600000' as epoch seconds is outside years 1..9999 "
            "(milliseconds?); as milliseconds it is 2026-01-01T00:00:00.000Z, give 1767225600.000",
        ),
        (["--until=-1e12"], "argument --until: time '-1e12' as epoch seconds is outside"),
    ],
)
def test_show_refuses_a_limit_or_time_it_cannot_use(
    tmp_path: Path, args: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert audit_main(["show", "--store", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and said in err, err
    assert "no embedded store" not in err  # refused before the store was looked for


def test_a_site_file_that_is_not_utf8_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site.toml"
    site.write_bytes(b'[store]\nkind = "caf\xe9"\n')
    assert audit_main(["verify", "--config", str(site)]) == 2
    err = capsys.readouterr().err
    assert f"site file {site} is not UTF-8" in err, err


async def test_times_an_operator_copies_find_the_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RFC 3339 allows a lowercase z (it was refused as not ISO 8601); epoch seconds as such."""
    import asyncio

    from evcore.audit import AuditLog, Decision
    from evcore.clock import ManualClock
    from evcore.store import open_store
    from evcore.v1.setpoint_pb2 import Setpoint

    store = open_store({"path": str(tmp_path / "s")}, tmp_path)
    await store.open()
    try:
        await AuditLog(store, clock=ManualClock()).append(
            Decision(
                "D0",
                "tick",
                decided_at_s=1_767_225_605.0,
                setpoints=[Setpoint(charger_id="C1", setpoint_a=16.0, reason="charger max")],
            )
        )
    finally:
        await store.close()
    for since in ("2026-01-01T00:00:00z", "2026-01-01T00:00:00Z", "1767225600", "2026-01-01"):
        args = ["show", "--store", str(tmp_path / "s"), "--charger", "C1", "--since", since]
        assert await asyncio.to_thread(audit_main, args) == 0, since
        out = capsys.readouterr().out
        assert out.startswith("#0 2026-01-01T00:00:05.000Z decision D0"), (since, out)
