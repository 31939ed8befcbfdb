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
