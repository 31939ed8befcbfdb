"""The Python interface of the core: Arrow and numpy in and out, typed exceptions for bad input,
the GIL released while Rust works, and no panic reaching Python."""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from evcore import _core
from evcore.allocator import AllocatorParams, allocate, allocator_batch
from evcore.allocator_reference import SiteArrays, reference_allocate
from evcore.checker import node_phase_currents
from evcore.envelope import OUTPUT_COLUMNS, EnvelopeParams, charger_batch, enforce, node_batch
from evcore.errors import EvcoreError, InputError
from evcore.site import Site, load_site


def small_site() -> Site:
    return load_site(
        {
            "site": {"id": "s"},
            "nodes": [
                {"id": "grid", "phase_limit_a": 63.0, "power_limit_kw": 40.0},
                {"id": "C1", "parent": "grid", "kind": "circuit", "phase_limit_a": 40.0},
            ],
            "chargers": [
                {
                    "id": f"cp{i}",
                    "parent": "C1" if i < 3 else "grid",
                    "wiring": "line_to_neutral",
                    "phases": ["L1"],
                    "voltage_v": 230.0,
                    "max_a": 32.0,
                }
                for i in range(4)
            ]
            + [
                {
                    "id": "dc",
                    "parent": "grid",
                    "kind": "dc",
                    "wiring": "three_phase",
                    "voltage_v": 230.0,
                    "max_w": 20000.0,
                }
            ],
        }
    )


def big_site(n: int) -> Site:
    per = 8
    nodes: list[dict[str, Any]] = [{"id": "grid", "phase_limit_a": 9.0 * n}]
    nodes += [
        {"id": f"C{j}", "parent": "grid", "phase_limit_a": 60.0}
        for j in range((n + per - 1) // per)
    ]
    chargers = [
        {
            "id": f"cp{i}",
            "parent": f"C{i // per}",
            "wiring": "three_phase",
            "phases": [["L1", "L2", "L3"], ["L2", "L3", "L1"], ["L3", "L1", "L2"]][i % 3],
            "voltage_v": 230.0,
            "max_a": 32.0,
        }
        for i in range(n)
    ]
    return load_site({"site": {"id": "big"}, "nodes": nodes, "chargers": chargers})


def test_enforce_takes_numpy_and_returns_the_documented_arrow_schema() -> None:
    site = small_site()
    req = np.array([32.0, 32.0, 32.0, 10.0, 0.0])
    out = enforce(site, {"requested_a": req}, params=EnvelopeParams())
    assert isinstance(out, pa.RecordBatch)
    assert tuple(out.schema.names) == OUTPUT_COLUMNS
    sp = out.column("setpoint_a").to_numpy(zero_copy_only=True)  # float64, no nulls
    assert sp.dtype == np.float64
    assert sp[:3].sum() <= 40.0 + 1e-9 and sp[3] == 10.0
    assert out.column("binding").to_pylist()[0] == "node_phase"
    assert out.column("binding_node").to_pylist()[0] == "C1"
    assert "circuit C1 phase L1" in out.column("reason").to_pylist()[0]
    assert set(out.column("binding").to_pylist()) <= set(_core.binding_codes())


def test_unknown_profile_counts_a_fresh_reading_above_its_maximum() -> None:
    """A charger whose profile state is unknown counts at max_a, or at its fresh meter reading
    when that is higher (the site file's maximum is wrong): the other on the circuit gets less."""
    site = small_site()
    cols: dict[str, Any] = {
        "requested_a": [32.0, 0.0, 0.0, 0.0, 0.0],
        "profile_unknown": [False, False, True, False, False],
        "measured_l1_a": [0.0] * 5,
        "measured_age_s": [1.0] * 5,
    }
    out = enforce(site, cols)
    sp = out.column("setpoint_a").to_numpy()
    assert sp[0] == pytest.approx(40.0 - 32.0)  # cp2 counted at its 32 A maximum
    cols["measured_l1_a"] = [0.0, 0.0, 36.0, 0.0, 0.0]
    out = enforce(site, cols)
    sp = out.column("setpoint_a").to_numpy()
    assert sp[0] == 0.0  # 4 A left: below the 6 A minimum
    assert "measured 36 A" in out.column("reason").to_pylist()[2]
    cols["measured_age_s"] = [1.0, 1.0, 600.0, 1.0, 1.0]  # stale: not counted
    sp = enforce(site, cols).column("setpoint_a").to_numpy()
    assert sp[0] == pytest.approx(8.0)


def test_reason_names_a_node_whose_kind_is_its_id_once() -> None:
    site = load_site(
        {
            "site": {"id": "s"},
            "nodes": [{"id": "grid", "kind": "grid", "phase_limit_a": 63.0, "power_limit_kw": 4.6}],
            "chargers": [
                {
                    "id": "a",
                    "parent": "grid",
                    "wiring": "line_to_neutral",
                    "phases": ["L1"],
                    "max_a": 32.0,
                },
            ],
        }
    )
    reason = enforce(site, {"requested_a": [32.0]}).column("reason").to_pylist()[0]
    assert reason == "held at 20 A: grid at 4.6 of 4.6 kW", reason


def test_allocator_raises_line_to_line_sessions_to_the_exact_phasor_limit() -> None:
    """The water-filling bounds AB + CA on line A linearly (17.5 A each under 35 A); the raise
    pass takes both to the exact limit 35/sqrt(3), judged by the independent checker."""
    site = load_site(
        {
            "site": {"id": "na", "phase_names": ["A", "B", "C"], "voltage_ln_v": 120.0},
            "nodes": [{"id": "grid", "kind": "grid", "phase_limit_a": 35.0}],
            "chargers": [
                {
                    "id": i,
                    "parent": "grid",
                    "wiring": "line_to_line",
                    "phases": ph,
                    "voltage_v": 208.0,
                    "max_a": 32.0,
                }
                for i, ph in (("ab", ["A", "B"]), ("ca", ["C", "A"]))
            ],
        }
    )
    out = allocate(site, {"measured_l1_a": [0.0, 0.0], "measured_age_s": [1.0, 1.0]})
    level = out.column("level_a").to_numpy()
    sp = out.column("setpoint_a").to_numpy()
    assert level == pytest.approx([17.5, 17.5])
    assert sp == pytest.approx([35.0 / math.sqrt(3.0)] * 2, rel=1e-7)
    lines = node_phase_currents(site, np.column_stack([sp, np.zeros(2), np.zeros(2)]))[0]
    assert lines[0] <= 35.0 * (1 + 1e-9) and lines[0] == pytest.approx(35.0, rel=1e-7)
    assert out.column("binding").to_pylist() == ["node_phase", "node_phase"]


def test_arrow_batch_table_and_mapping_inputs_agree() -> None:
    site = small_site()
    cols = {"requested_a": [20.0, 20.0, 20.0, 6.0, 0.0], "requested_w": [0, 0, 0, 0, 11000.0]}
    a = enforce(site, charger_batch(site, **cols))
    b = enforce(site, pa.Table.from_batches([charger_batch(site, **cols)]))
    c = enforce(site, cols)
    d = enforce(site, {k: pa.array(v, pa.float64()) for k, v in cols.items()})
    for x in (b, c, d):
        assert x.column("setpoint_a").equals(a.column("setpoint_a"))
    assert a.column("setpoint_w").to_pylist()[4] == pytest.approx(11000.0)


def test_allocate_output_has_level_and_admission_columns() -> None:
    site = small_site()
    batch = allocator_batch(site, priority=[1.0, 1.0, 2.0, 1.0, 1.0])
    out = allocate(site, batch, params=AllocatorParams())
    assert out.schema.names[-2:] == ["level_a", "admitted"]
    sp = out.column("setpoint_a").to_numpy()
    assert sp[:3] == pytest.approx([10.0, 10.0, 20.0])
    assert out.column("admitted").to_pylist() == [True] * 5


SWAPPED = ["cp1", "cp0", "cp2", "cp3", "dc"]  # rows out of site order


@pytest.mark.parametrize(
    ("change", "column", "row"),
    [
        (
            lambda b: b.set_column(1, "requested_a", pa.array([1.0, None, 1, 1, 1])),
            "requested_a",
            1,
        ),
        (lambda b: b.set_column(1, "requested_a", pa.array(["x"] * 5)), "requested_a", None),
        (
            lambda b: b.set_column(0, "charger_id", pa.array(["cp1", "cp0", "cp2", "cp3", "dc"])),
            "charger_id",
            0,
        ),
        (lambda b: b.drop_columns(["measured_age_s"]), "measured_age_s", None),
    ],
)
def test_bad_columns_raise_input_error_naming_column_and_row(
    change: Any, column: str, row: int | None
) -> None:
    site = small_site()
    bad = change(charger_batch(site))
    with pytest.raises(InputError) as info:
        _core.enforce(site.topology, bad, node_batch(site), None, False)
    assert info.value.column == column and info.value.row == row, str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EvcoreError)


@pytest.mark.parametrize(
    ("column", "value", "row"),
    [
        ("profile_unknown", [False, None, False, False, False], 1),
        ("faulted", [False, False, False, None, False], 3),
        ("last_sent_confirmed", ["false"] * 5, None),
        ("connected", [True, True, math.nan, True, True], 2),
        ("switches", np.array([0, 0, 2**63, 0, 0], dtype=np.uint64), 2),
        ("switches", [1, None, 0, 0, 0], 1),
        ("requested_a", [16.0, "x", 0.0, 0.0, 0.0], None),
    ],
)
def test_values_the_facade_cannot_take_raise_input_error_naming_column_and_row(
    column: str, value: Any, row: int | None
) -> None:
    """Review of session 12: numpy's own conversion took a null as False in a flag column (a
    charger whose fault or profile state is unknown counted as known: 16 A went to it), any
    non-empty string as True, and wrapped a uint64 count past int64 to a negative one."""
    site = small_site()
    with pytest.raises(InputError) as info:
        charger_batch(site, **{column: value})
    assert (info.value.column, info.value.row) == (column, row), str(info.value)
    # Well-formed lists of the same columns still go through.
    ok = {
        "profile_unknown": [False] * 5,
        "faulted": [False] * 5,
        "last_sent_confirmed": [True] * 5,
        "connected": [1, 1, 0, 1, 1],
        "switches": np.array([0, 1, 2, 0, 0], dtype=np.uint64),
        "requested_a": [16, 16.0, 0, 0, 0],
    }[column]
    assert charger_batch(site, **{column: ok}).num_rows == 5


def test_a_node_batch_out_of_site_order_or_length_names_the_row() -> None:
    site = small_site()
    nodes = node_batch(site)
    swapped = nodes.set_column(0, "node_id", pa.array(["C1", "grid"]))
    with pytest.raises(InputError) as info:
        _core.enforce(site.topology, charger_batch(site), swapped, None, False)
    assert (info.value.column, info.value.row) == ("node_id", 0), str(info.value)
    with pytest.raises(InputError) as info:
        _core.enforce(site.topology, charger_batch(site), nodes.slice(0, 1), None, False)
    assert (info.value.column, info.value.row) == ("node_id", None), str(info.value)


def test_bad_parameters_and_demand_raise_input_error() -> None:
    site = small_site()
    with pytest.raises(InputError) as info:
        enforce(site, None, params={"nowww_s": 1.0})
    assert info.value.column == "nowww_s"
    with pytest.raises(InputError) as info:
        enforce(site, None, params={"now_s": math.nan})
    assert info.value.column == "now_s"
    with pytest.raises(InputError) as info:
        allocate(site, {"energy_wanted_kwh": [1.0, math.nan, 1.0, 1.0, 1.0]})
    assert (info.value.column, info.value.row) == ("energy_wanted_kwh", 1)
    with pytest.raises(InputError):
        enforce(site, {"requested_a": [1.0, 2.0]})  # wrong length


@pytest.mark.parametrize(
    ("bad", "clamped"),
    [
        (-1.0, 1e-6),
        (0.0, 1e-6),
        (1e-300, 1e-6),
        (-math.inf, 1e-6),
        (1e9, 1e6),
        (math.inf, 1e6),
        (math.nan, 1.0),
    ],
)
def test_priority_outside_the_range_is_clamped_not_an_error(bad: float, clamped: float) -> None:
    """One bad priority must not stop every decision: it counts at the nearest bound of
    [1e-6, 1e6] (NaN: the default 1), the others are allocated as usual, the limits hold."""
    site = small_site()
    a = allocate(site, {"priority": [1.0, bad, 1.0, 1.0, 1.0]})
    b = allocate(site, {"priority": [1.0, clamped, 1.0, 1.0, 1.0]})
    assert a.column("setpoint_a").equals(b.column("setpoint_a"))
    assert a.column("admitted").to_pylist() == [True] * 5
    sp = a.column("setpoint_a").to_numpy()
    assert sp[:3].sum() <= 40.0 + 1e-9  # circuit C1
    # Grid L1 (63 A) carries cp0..cp3 and the DC charger's L1: 12.6 A each at equal weights.
    if clamped == 1e-6:  # the smallest weight: its minimum, the others share the rest
        assert sp.tolist() == pytest.approx([14.25, 6.0, 14.25, 14.25, 14.25])
    elif clamped == 1e6:  # the largest: all of C1 but the others' minimum
        assert sp.tolist() == pytest.approx([6.0, 28.0, 6.0, 11.5, 11.5])
    else:
        assert sp.tolist() == pytest.approx([12.6] * 5)
    # The numpy reference clamps alike.
    cb = allocator_batch(site, priority=[1.0, bad, 1.0, 1.0, 1.0])
    nb = node_batch(site)
    cols = {k: np.asarray(cb.column(k).to_numpy(zero_copy_only=False)) for k in cb.schema.names}
    ncols = {k: np.asarray(nb.column(k).to_numpy(zero_copy_only=False)) for k in nb.schema.names}
    ref = reference_allocate(SiteArrays.build(site), cols, ncols, AllocatorParams().as_dict())
    assert a.column("level_a").to_numpy() == pytest.approx(ref.level_a, abs=1e-9)


def test_absurd_values_give_results_not_panics() -> None:
    site = small_site()
    n = len(site.chargers)
    rng = np.random.default_rng(7)
    pool = np.array([math.nan, math.inf, -math.inf, -1e308, 1e308, 0.0, -0.0, 5e-324, 16.0])
    for _ in range(200):
        cols = {
            name: rng.choice(pool, n)
            for name in (
                "requested_a",
                "requested_w",
                "measured_l1_a",
                "measured_l2_a",
                "measured_l3_a",
                "measured_age_s",
                "last_sent_a",
                "last_sent_w",
                "on_since_s",
                "off_since_s",
                "read_under_a",
                "read_under_w",
            )
        }
        ncols = {
            name: rng.choice(pool, len(site.nodes))
            for name in (
                "other_load_l1_a",
                "other_load_l2_a",
                "other_load_l3_a",
                "other_load_age_s",
            )
        }
        try:
            out = enforce(site, cols, ncols, params={"now_s": 1e9})
            alloc = allocate(site, {**cols, "energy_wanted_kwh": rng.choice(pool[1:], n)}, ncols)
        except EvcoreError:
            continue  # a typed refusal is fine; a PanicException would fail the test
        for batch in (out, alloc):
            sp = batch.column("setpoint_a").to_numpy()
            assert np.all(np.isfinite(sp)) and np.all(sp >= 0)
            ac = sp[:4]
            assert np.all((ac == 0) | ((ac >= 6.0) & (ac <= 32.0)))


def test_gil_is_released_during_allocate_and_enforce() -> None:
    site = big_site(20_000)
    batch = allocator_batch(site, measured_age_s=1.0, measured_l1_a=5.0)
    nodes = node_batch(
        site, other_load_age_s=1.0, other_load_l1_a=0.0, other_load_l2_a=0.0, other_load_l3_a=0.0
    )
    ebatch = charger_batch(site, requested_a=32.0)
    params = AllocatorParams().as_dict()
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    # A long switch interval: the main thread gives up the GIL only when Rust releases it.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.05)  # let the thread start (sleep releases the GIL)
        # If the GIL were held, the thread could never move during a call. A loaded machine may
        # not schedule it during one particular call, so try a few times.
        progress = [0, 0]
        for _ in range(20):
            before = counter[0]
            _core.allocate(site.topology, batch, nodes, params, False)
            progress[0] = max(progress[0], counter[0] - before)
            before = counter[0]
            _core.enforce(site.topology, ebatch, nodes, None, False)
            progress[1] = max(progress[1], counter[0] - before)
            if min(progress) > 0:
                break
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert all(p > 0 for p in progress), progress


def test_numpy_float_columns_reach_arrow_without_a_copy() -> None:
    site = small_site()
    req = np.ascontiguousarray([16.0, 16.0, 16.0, 6.0, 0.0])
    batch = charger_batch(site, requested_a=req)
    data = batch.column("requested_a").buffers()[1]
    assert data is not None and data.address == req.ctypes.data
    out = enforce(site, batch)
    sp = out.column("setpoint_a").to_numpy(zero_copy_only=True)
    assert sp.ctypes.data == out.column("setpoint_a").buffers()[1].address


def test_allocate_takes_a_table_like_a_batch() -> None:
    site = small_site()
    batch = allocator_batch(site, priority=[1.0, 1.0, 2.0, 1.0, 1.0])
    a = allocate(site, batch)
    b = allocate(site, pa.Table.from_batches([batch]))
    assert a.column("setpoint_a").equals(b.column("setpoint_a"))
    with pytest.raises(InputError):
        allocate(site, [1, 2, 3])


def test_reclaimed_headroom_reads_as_a_low_draw_not_as_no_energy_wanted() -> None:
    """A car whose energy need is unknown (the default, +inf) that draws 3 A of the 20 A it was
    given is capped near its draw (held at the 6 A minimum; binding ``demand``: vehicle demand).
    Its reason used to say "no energy wanted", which is false: it wants energy and draws little.
    A session that really wants nothing more is paused and says so."""
    site = small_site()
    n = len(site.chargers)
    cols: dict[str, Any] = {
        "connected": np.array([True, True, False, False, False]),
        "last_sent_a": np.array([20.0, 20.0, 0.0, 0.0, 0.0]),
        "on_since_s": np.array([0.0, 0.0, math.nan, math.nan, math.nan]),
        "measured_l1_a": np.array([3.0, 20.0, 0.0, 0.0, 0.0]),
        "measured_age_s": np.full(n, 1.0),
    }
    params = AllocatorParams(now_s=3600.0)
    out = allocate(site, cols, params=params)
    sp = out.column("setpoint_a").to_numpy()
    assert sp[:2].tolist() == pytest.approx([6.0, 22.0])
    assert out.column("binding").to_pylist()[0] == "demand"
    assert out.column("reason").to_pylist()[0] == (
        "held at 6 A: the vehicle draws only 3 A (the rest is offered to others)"
    )
    wants_nothing = {**cols, "energy_wanted_kwh": np.array([0.0, math.inf, 0.0, 0.0, 0.0])}
    out = allocate(site, wants_nothing, params=params)
    assert out.column("setpoint_a").to_numpy()[0] == 0.0
    assert out.column("reason").to_pylist()[0] == "paused: no energy wanted"


def _with_reference(
    site: Site, cols: dict[str, Any], params: AllocatorParams
) -> tuple[pa.RecordBatch, Any]:
    """The allocation of ``cols`` and the numpy reference's; their water-filling levels agree."""
    out = allocate(site, cols, params=params)
    cb = allocator_batch(site, **cols)
    nb = node_batch(site)
    full = {k: np.asarray(cb.column(k).to_numpy(zero_copy_only=False)) for k in cb.schema.names}
    ncols = {k: np.asarray(nb.column(k).to_numpy(zero_copy_only=False)) for k in nb.schema.names}
    ref = reference_allocate(SiteArrays.build(site), full, ncols, params.as_dict())
    assert out.column("level_a").to_numpy() == pytest.approx(ref.level_a, abs=1e-9)
    return out, ref


def test_a_reading_taken_while_the_car_ramps_up_does_not_cap_it_as_in_the_reference() -> None:
    """Headroom reclaim only from a reading taken 30 s or more after the session turned on:
    cp0 resumed 10 s ago (reading 1 s old, 0 A) and cp1 (reading 20 s old, taken before it
    resumed) keep their share; cp2 (on for an hour, 8 A of 30) and the DC charger (2 kW of
    15 kW) are capped at their draw + 2 A. Rust and the numpy reference agree."""
    site = small_site()
    now = 3600.0
    cols: dict[str, Any] = {
        "connected": np.full(5, True),
        "last_sent_a": np.array([16.0, 16.0, 30.0, 0.0, math.nan]),
        "last_sent_w": np.array([math.nan] * 4 + [15000.0]),
        "on_since_s": np.array([now - 10.0, now - 10.0, 0.0, math.nan, 0.0]),
        "measured_l1_a": np.array([0.0, 0.0, 8.0, 0.0, 3.0]),
        "measured_l2_a": np.array([0.0, 0.0, 0.0, 0.0, 3.0]),
        "measured_l3_a": np.array([0.0, 0.0, 0.0, 0.0, 3.0]),
        "measured_age_s": np.array([1.0, 20.0, 1.0, 1.0, 1.0]),
    }
    out, ref = _with_reference(site, cols, AllocatorParams(now_s=now, stale_after_s=60.0))
    assert out.column("admitted").to_pylist() == ref.admitted.tolist()
    binding = out.column("binding").to_pylist()
    sp = out.column("setpoint_a").to_numpy()
    assert binding[0] != "demand" and binding[1] != "demand"
    assert sp[0] > 10.0 and sp[1] > 10.0
    assert binding[2] == "demand" and sp[2] == pytest.approx(10.0)
    assert binding[4] == "demand"


@pytest.mark.parametrize("under", [8.0, 8.9, 30.0, math.nan])
def test_a_car_drawing_the_setpoint_its_reading_was_taken_under_is_probed_as_in_the_reference(
    under: float,
) -> None:
    """cp2 (on for an hour) reads 8 A. Taken under 8 A (or 8.9 A: within margin_a / 2) the car
    takes all it is given: capped at twice its draw (16 A) instead of its draw + 2 A (10 A), and
    gets its share of C1; taken under 30 A, or under an unknown setpoint, 10 A as before. The
    DC charger reads 3 A per phase taken under the 15 kW it was sent: not all of it, so capped
    at its draw + 2 A. Rust and the numpy reference agree."""
    site = small_site()
    now = 3600.0
    cols: dict[str, Any] = {
        "connected": np.full(5, True),
        "last_sent_a": np.array([0.0, 0.0, 30.0, 0.0, math.nan]),
        "last_sent_w": np.array([math.nan] * 4 + [15000.0]),
        "on_since_s": np.array([math.nan, math.nan, 0.0, math.nan, 0.0]),
        "measured_l1_a": np.array([0.0, 0.0, 8.0, 0.0, 3.0]),
        "measured_l2_a": np.array([0.0, 0.0, 0.0, 0.0, 3.0]),
        "measured_l3_a": np.array([0.0, 0.0, 0.0, 0.0, 3.0]),
        "measured_age_s": np.full(5, 1.0),
        "read_under_a": np.array([math.nan, math.nan, under, math.nan, math.nan]),
        "read_under_w": np.array([math.nan] * 4 + [15000.0]),
    }
    out, ref = _with_reference(site, cols, AllocatorParams(now_s=now, stale_after_s=60.0))
    assert ref.cap[2] == pytest.approx(16.0 if under < 9.0 else 10.0)
    sp = out.column("setpoint_a").to_numpy()
    binding = out.column("binding").to_pylist()
    if under < 9.0:  # its 16 A cap does not bind: it shares C1 (40 A) with cp0 and cp1
        assert sp[2] == pytest.approx(40.0 / 3.0) and binding[2] == "node_phase"
    else:
        assert sp[2] == pytest.approx(10.0) and binding[2] == "demand"
    assert binding[4] == "demand"


@pytest.mark.parametrize("switches", [math.nan, 1e30, 3.0])
def test_a_switch_count_given_as_a_float_keeps_a_paused_session_at_its_cap(switches: float) -> None:
    """max_switches 3: a paused session whose count is 3, unknown (NaN) or absurd (1e30) stays
    paused. Cast to int64, NaN and 1e30 became int64's minimum and the session resumed."""
    site = small_site()
    n = len(site.chargers)
    cols: dict[str, Any] = {
        "requested_a": np.full(n, 16.0),
        "requested_w": np.full(n, 5000.0),
        "last_sent_a": np.zeros(n),
        "last_sent_w": np.zeros(n),
        "switches": np.full(n, switches),
    }
    out = enforce(site, cols, params=EnvelopeParams(max_switches=3.0))
    assert out.column("setpoint_a").to_pylist() == [0.0] * n
    assert set(out.column("binding").to_pylist()) == {"hysteresis"}
    # Below the cap it resumes: the cap is what holds it.
    out = enforce(
        site, cols | {"switches": np.full(n, 2.0)}, params=EnvelopeParams(max_switches=3.0)
    )
    assert all(x > 0 for x in out.column("setpoint_a").to_pylist())


def test_a_uint64_beyond_int64_is_a_float_in_a_float_column() -> None:
    """Only an integer column refuses a count past int64 (an age of 2^63 s is a float)."""
    site = small_site()
    batch = charger_batch(site, measured_age_s=np.array([2**63] * 5, dtype=np.uint64))
    assert batch.column("measured_age_s").to_pylist() == [float(2**63)] * 5


@pytest.mark.parametrize(
    ("switches", "max_switches", "held"),
    [
        (3.0, 3.0, True),
        (math.inf, 3.0, True),
        (math.nan, 3.0, True),
        (1e300, 3.0, True),
        (2.0, 3.0, False),
        (math.inf, math.inf, False),
        (math.nan, math.inf, True),
    ],
)
def test_the_envelope_and_the_allocator_agree_on_the_switch_cap(
    switches: float, max_switches: float, held: bool
) -> None:
    """Review of session 12: an infinite switch count passed a finite cap in the envelope (16 A)
    while the allocator held it (0 A); with no cap the allocator held it and the envelope not.
    One rule for both (and the numpy reference): at or above a finite cap, or a count not
    known (NaN); no cap is never reached."""
    site = load_site(
        {
            "site": {"id": "s"},
            "nodes": [{"id": "g", "phase_limit_a": 64.0}],
            "chargers": [{"id": "a", "parent": "g", "wiring": "three_phase", "max_a": 16.0}],
        }
    )
    cols = {"requested_a": [16.0], "switches": [switches], "last_sent_a": [0.0]}
    params = {"max_switches": max_switches}
    e = enforce(site, cols, params=params)
    a = allocate(site, cols, params=params)
    want = 0.0 if held else 16.0
    assert e.column("setpoint_a").to_pylist() == [want]
    assert a.column("setpoint_a").to_pylist() == [want]
    if held:
        assert e.column("binding").to_pylist() == ["hysteresis"]
        assert a.column("binding").to_pylist() == ["hysteresis"]
