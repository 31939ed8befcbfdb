"""``evcore sim`` refuses what it cannot run before the run, naming the field, without a
traceback (review A): a scenario, site, arrivals or price file that is not UTF-8; a negative seed
(numpy's generators refuse one: a traceback); a ``--report`` path under a regular file or on a
directory (said only after the whole run); a policy listed twice (run twice). A report that cannot
be written after the run is said with a non-zero exit, the comparison still printed."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from evcore.cli import main as evcore_main
from evcore.sim import report, runner
from evcore.sim.arrivals import generate
from evcore.sim.scenario import ScenarioError, load_scenario, with_overrides
from sim_testkit import one_charger_site

SCENARIO = """
[scenario]
name = "inputs"
start = "2026-01-05T00:00:00Z"
duration_h = 6
seed = 3
{scenario_extra}
{site}
[arrivals]
stay_mean_h = 4.0
{arrivals_extra}
[[arrivals.vehicles]]
name = "car"
battery_kwh = 60.0
phases = 3
{tariff}
"""

SITE = "\n" + one_charger_site("inputs")

# A run of a quarter of an hour, one policy, in process: under a second.
QUICK = ["--hours", "0.25", "--backend", "in-process", "--no-progress", "--jobs", "1"]


def _scenario(
    tmp_path: Path,
    *,
    scenario_extra: str = "",
    site: str = SITE,
    arrivals_extra: str = "",
    tariff: str = "",
) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(
        SCENARIO.format(
            scenario_extra=scenario_extra, site=site, arrivals_extra=arrivals_extra, tariff=tariff
        )
    )
    return path


def _no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(runner, "run_comparison", refuse)


LATIN1 = b"# caf\xe9\n"


def test_a_scenario_file_that_is_not_utf8_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _scenario(tmp_path)
    path.write_bytes(LATIN1 + path.read_bytes())
    with pytest.raises(ScenarioError, match="not UTF-8"):
        load_scenario(path)
    assert evcore_main(["sim", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not UTF-8" in err


def test_a_site_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_bytes(LATIN1 + SITE.encode())
    path = _scenario(tmp_path, scenario_extra='site_file = "site.toml"', site="")
    with pytest.raises(ScenarioError, match=r"\[scenario\]\.site_file: cannot load .*site\.toml"):
        load_scenario(path)


@pytest.mark.parametrize("model", ["csv", "acn"])
def test_an_arrivals_file_that_is_not_utf8_is_named(tmp_path: Path, model: str) -> None:
    (tmp_path / "sessions").write_bytes(b"id,arrival_h,departure_h,energy_kwh\ncaf\xe9,1,2,3\n")
    path = _scenario(tmp_path, arrivals_extra=f'model = "{model}"\nfile = "sessions"\n')
    sc = load_scenario(path)
    with pytest.raises(ScenarioError, match=r"\[arrivals\]\.file: cannot read"):
        generate(sc)


def test_a_price_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "prices.csv").write_bytes(
        b"time,price_per_kwh\n2026-01-05T00:00:00Z,0.3\n# caf\xe9\n"
    )
    path = _scenario(tmp_path, tariff='[tariff]\nfile = "prices.csv"\n')
    with pytest.raises(ScenarioError, match=r"\[tariff\]\.file: cannot read"):
        load_scenario(path)


@pytest.mark.parametrize(
    ("where", "line", "named"),
    [
        ("scenario", "seed = -1", r"\[scenario\]\.seed: must be >= 0"),
        ("scenario", "seed = 1.5", r"\[scenario\]\.seed: must be a whole number >= 0"),
        ("arrivals", "seed_offset = -2", r"\[arrivals\]\.seed_offset: must be >= 0"),
    ],
)
def test_a_negative_or_fractional_seed_in_the_file_is_named(
    tmp_path: Path, where: str, line: str, named: str
) -> None:
    text = _scenario(tmp_path).read_text().replace("seed = 3\n", "")
    text = text.replace(f"[{where}]\n", f"[{where}]\n{line}\n", 1)
    (tmp_path / "scenario.toml").write_text(text)
    with pytest.raises(ScenarioError, match=named):
        load_scenario(tmp_path / "scenario.toml")


def test_a_negative_seed_on_the_command_line_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sc = load_scenario(_scenario(tmp_path))
    with pytest.raises(ScenarioError, match="--seed must be a whole number >= 0, got -1"):
        with_overrides(sc, seed=-1)
    assert with_overrides(sc, seed=0).seed == 0
    code = evcore_main(["sim", str(tmp_path / "scenario.toml"), "--seed", "-1", *QUICK])
    assert code == 2
    assert "--seed must be a whole number >= 0" in capsys.readouterr().err


def test_a_policy_listed_twice_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_run(monkeypatch)
    path = _scenario(tmp_path)
    assert evcore_main(["sim", str(path), "--policies", "fair_share,fair_share"]) == 2
    assert "--policies: 'fair_share' is listed twice" in capsys.readouterr().err
    _scenario(tmp_path, scenario_extra='policies = ["fair_share", "uncontrolled", "fair_share"]')
    with pytest.raises(ScenarioError, match=r"\[scenario\]\.policies: 'fair_share' is listed"):
        load_scenario(path)


def test_an_unusable_report_path_is_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_run(monkeypatch)
    path = _scenario(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for where, said in [
        (a_file / "sub" / "report.html", f"{a_file}: is a file, not a directory"),
        (tmp_path, f"{tmp_path}: is a directory"),
    ]:
        assert evcore_main(["sim", str(path), "--report", str(where), *QUICK]) == 2, where
        err = capsys.readouterr().err
        assert f"--report {where}: cannot write the report: {said}" in err, err
    # A directory that does not exist yet is made, as before; the report is not written yet.
    fine = tmp_path / "new" / "dir" / "report.html"
    report.check_writable(fine)
    assert fine.parent.is_dir() and list(fine.parent.iterdir()) == []


def test_a_report_that_cannot_be_written_after_the_run_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(cmp: Any, path: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "write_html", full)
    out_path = tmp_path / "out" / "report.html"
    args = ["sim", str(_scenario(tmp_path)), "--policies", "fair_share", *QUICK]
    assert evcore_main([*args, "--report", str(out_path)]) == 1
    out, err = capsys.readouterr()
    assert "fair_share" in out  # the comparison is printed all the same
    assert f"cannot write the report: {out_path}: No space left on device" in err, err
