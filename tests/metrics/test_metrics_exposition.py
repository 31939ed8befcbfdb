"""The text exposition format (0.0.4): escaping, NaN and infinities, types, and the mistakes that
would make Prometheus refuse a whole scrape (refused here instead)."""

from __future__ import annotations

import math

import pytest
from evcore.metrics import MetricFamily, Registry, render
from metrics_testkit import parse


def test_label_values_escape_backslash_quote_and_newline() -> None:
    fam = MetricFamily("evcore_x", "gauge", "A gauge.")
    fam.add(1, {"charger_id": 'cp\\01 "north"\nbay'})
    text = render([fam])
    assert text == (
        "# HELP evcore_x A gauge.\n"
        "# TYPE evcore_x gauge\n"
        'evcore_x{charger_id="cp\\\\01 \\"north\\"\\nbay"} 1\n'
    )
    # Read back by an independent reader, the value is the original string.
    assert parse(text).value("evcore_x", charger_id='cp\\01 "north"\nbay') == 1


def test_help_escapes_backslash_and_newline_but_not_quotes() -> None:
    fam = MetricFamily("evcore_y", "gauge", 'Line one\nline "two" C:\\evcore')
    text = render([fam])
    assert text.splitlines()[0] == '# HELP evcore_y Line one\\nline "two" C:\\\\evcore'
    assert parse(text).helps["evcore_y"] == 'Line one\nline "two" C:\\evcore'


def test_nan_and_infinities() -> None:
    fam = MetricFamily("evcore_z", "gauge", "Special values.")
    fam.add(math.nan, {"v": "nan"}).add(math.inf, {"v": "inf"}).add(-math.inf, {"v": "-inf"})
    lines = render([fam]).splitlines()[2:]
    assert lines == ['evcore_z{v="nan"} NaN', 'evcore_z{v="inf"} +Inf', 'evcore_z{v="-inf"} -Inf']
    got = parse(render([fam]))
    assert math.isnan(got.value("evcore_z", v="nan"))
    assert got.value("evcore_z", v="inf") == math.inf
    assert got.value("evcore_z", v="-inf") == -math.inf


def test_numbers_read_back_exactly() -> None:
    values = [0, 1, -3, 2**53, 0.1, 1e-9, 6.02e23, -0.0, 32.000000000000004, True, False]
    fam = MetricFamily("evcore_n", "gauge", "Numbers.")
    for i, v in enumerate(values):
        fam.add(v, {"i": str(i)})
    got = parse(render([fam]))
    for i, v in enumerate(values):
        assert got.value("evcore_n", i=str(i)) == float(v)
    assert 'evcore_n{i="0"} 0\n' in render([fam])  # integers without a decimal point
    assert 'evcore_n{i="9"} 1\n' in render([fam])  # bool as 1 / 0


def test_types_and_summary_samples() -> None:
    counter = MetricFamily("evcore_things_total", "counter", "Things.").add(7)
    gauge = MetricFamily("evcore_level_amperes", "gauge", "Level.").add(16.5, {"node_id": "F1"})
    summary = MetricFamily("evcore_took_seconds", "summary", "Took.")
    summary.add_summary({0.5: 0.01, 0.99: 0.2}, {"site": "s"}, sum_value=1.5, count=40)
    untyped = MetricFamily("evcore_other", "untyped", "Other.").add(1)
    text = render([counter, gauge, summary, untyped])
    got = parse(text)
    assert got.types == {
        "evcore_things_total": "counter",
        "evcore_level_amperes": "gauge",
        "evcore_took_seconds": "summary",
        "evcore_other": "untyped",
    }
    assert got.value("evcore_took_seconds", site="s", quantile="0.5") == 0.01
    assert got.value("evcore_took_seconds", site="s", quantile="0.99") == 0.2
    assert got.value("evcore_took_seconds_sum", site="s") == 1.5
    assert got.value("evcore_took_seconds_count", site="s") == 40
    # A family without samples still says what it is (absent is not zero).
    empty = render([MetricFamily("evcore_none", "gauge", "Nothing yet.")])
    assert empty == "# HELP evcore_none Nothing yet.\n# TYPE evcore_none gauge\n"
    assert render([]) == ""


@pytest.mark.parametrize(
    ("name", "kind", "match"),
    [
        ("evcore-bad", "gauge", "not a Prometheus metric name"),
        ("1evcore", "gauge", "not a Prometheus metric name"),
        ("evcore_things", "counter", "ends in _total"),
        ("evcore_x", "histogram", "unknown type"),
    ],
)
def test_bad_families_are_refused(name: str, kind: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MetricFamily(name, kind, "x")  # type: ignore[arg-type]


def test_bad_labels_and_duplicates_are_refused() -> None:
    fam = MetricFamily("evcore_x", "gauge", "x")
    for bad in ("node-id", "__name__", "1a"):
        with pytest.raises(ValueError, match="cannot be a label name"):
            fam.add(1, {bad: "v"})
    with pytest.raises(ValueError, match="must be a str"):
        fam.add(1, {"phase": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="cannot be a label name"):
        MetricFamily("evcore_s", "summary", "s").add_summary({0.5: 1.0}, {"quantile": "x"})
    with pytest.raises(ValueError, match="not in"):
        MetricFamily("evcore_s", "summary", "s").add_summary({1.5: 1.0})
    fam.add(1, {"a": "1", "b": "2"}).add(2, {"b": "2", "a": "1"})
    with pytest.raises(ValueError, match="given twice"):
        render([fam])
    with pytest.raises(ValueError, match="given twice"):
        render([MetricFamily("evcore_y", "gauge", "y"), MetricFamily("evcore_y", "gauge", "y")])


def test_registry_collects_at_every_render_and_counts() -> None:
    reg = Registry()
    level = [1.0]
    reg.register(lambda: [MetricFamily("evcore_level", "gauge", "Level.").add(level[0])])
    uploads = reg.counter("evcore_uploads_total", "Uploads.", ["site_id", "outcome"])
    assert parse(reg.render()).value("evcore_level") == 1.0
    level[0] = 2.5
    uploads.inc(site_id="a", outcome="stored")
    uploads.inc(3, site_id="a", outcome="stored")
    uploads.inc(site_id="b", outcome="refused")
    got = parse(reg.render())
    assert got.value("evcore_level") == 2.5
    assert got.value("evcore_uploads_total", site_id="a", outcome="stored") == 4
    assert got.value("evcore_uploads_total", site_id="b", outcome="refused") == 1
    with pytest.raises(ValueError, match="labels"):
        uploads.inc(site_id="a")
    with pytest.raises(ValueError, match="cannot increase"):
        uploads.inc(-1, site_id="a", outcome="stored")
    plain = reg.counter("evcore_sites_total", "Sites.")
    assert parse(reg.render()).value("evcore_sites_total") == 0  # a plain counter starts at 0
    plain.inc()
    assert plain.value() == 1
