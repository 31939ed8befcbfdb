"""A feeder at exactly full capacity keeps every session at its fair share.

Regression (edge room, high): five three-phase chargers on an 80 A feeder, each confirmed at
16 A and measured at 16.0 A, each asking for 32 A, were all cut to 6 A ("held at 6 A: feeder F1
phase L1 at 80 of 80 A"): what they hold filled the feeder exactly, the water-filling level
solved to 0 and every setpoint fell to the minimum; in the closed loop a 16 -> 6 A sawtooth.
Judged by the independent checker (phasor line currents, counted as the envelope counts:
max(setpoint, fresh measurement)) and by the numpy reference allocator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from evcore.allocator import AllocatorParams, allocate, allocator_batch
from evcore.allocator_reference import SiteArrays, reference_allocate
from evcore.checker import node_phase_currents
from evcore.envelope import EnvelopeParams, enforce, node_batch
from evcore.site import Site, load_site

N = 5
NOW = 10_000.0


def feeder_site() -> Site:
    return load_site(
        {
            "site": {"id": "depot"},
            "nodes": [
                {"id": "grid", "kind": "grid", "phase_limit_a": 160.0},
                {"id": "F1", "parent": "grid", "kind": "feeder", "phase_limit_a": 80.0},
            ],
            "chargers": [
                {
                    "id": f"cp{i}",
                    "parent": "F1",
                    "wiring": "three_phase",
                    "voltage_v": 230.0,
                    "max_a": 32.0,
                }
                for i in range(N)
            ],
        }
    )


def run(draw: list[float]) -> tuple[Site, Any, dict[str, Any], dict[str, Any], dict[str, float]]:
    """Every session running at a confirmed 16 A for an hour, drawing ``draw`` A on each phase
    (fresh), wanting more (energy unbounded, charger maximum 32 A)."""
    site = feeder_site()
    d = np.asarray(draw, dtype=float)
    cols: dict[str, Any] = {
        "measured_l1_a": d,
        "measured_l2_a": d,
        "measured_l3_a": d,
        "measured_age_s": np.full(N, 1.0),
        "last_sent_a": np.full(N, 16.0),
        "last_sent_confirmed": np.full(N, True),
        "on_since_s": np.full(N, NOW - 3600.0),
    }
    ncols: dict[str, Any] = {f"other_load_l{k}_a": np.zeros(2) for k in (1, 2, 3)}
    ncols["other_load_age_s"] = np.ones(2)
    params = AllocatorParams(now_s=NOW).as_dict()
    cb = allocator_batch(site, **cols)
    nb = node_batch(site, **ncols)
    out = allocate(site, cb, nb, params=params)
    full = {n: np.asarray(cb.column(n).to_numpy(zero_copy_only=False)) for n in cb.schema.names}
    nfull = {n: np.asarray(nb.column(n).to_numpy(zero_copy_only=False)) for n in nb.schema.names}
    return site, out, full, nfull, params


def counted_lines(site: Site, setpoint: np.ndarray, draw: list[float]) -> np.ndarray:
    counted = np.maximum(setpoint, np.asarray(draw))
    lines: np.ndarray = node_phase_currents(site, np.column_stack([counted] * 3))
    return lines


@pytest.mark.parametrize("measured", [16.0, 15.9])
def test_full_feeder_gives_the_fair_share_not_the_minimum(measured: float) -> None:
    draw = [measured] * N
    site, out, full, nfull, params = run(draw)
    sp = out.column("setpoint_a").to_numpy()
    assert out.column("admitted").to_pylist() == [True] * N
    assert sp == pytest.approx([80.0 / N] * N), out.column("reason").to_pylist()
    assert out.column("binding").to_pylist() == ["node_phase"] * N
    assert out.column("reason").to_pylist()[0] == "held at 16 A: feeder F1 phase L1 at 80 of 80 A"
    # The envelope's limits hold, counted independently: feeder at 80 of 80 A on every phase.
    lines = counted_lines(site, sp, draw)
    assert np.all(lines[1] <= 80.0 * (1 + 1e-9)) and lines[1] == pytest.approx([80.0] * 3)
    assert np.all(lines[0] <= 160.0)
    # The numpy reference agrees (water-filling level and setpoints).
    ref = reference_allocate(SiteArrays.build(site), full, nfull, params)
    assert ref.admitted.tolist() == [True] * N
    assert out.column("level_a").to_numpy() == pytest.approx(ref.level_a, abs=1e-9)
    assert sp == pytest.approx(ref.raised_a, abs=1e-9)


def test_one_session_over_the_fair_level_is_lowered_and_nobody_goes_to_the_minimum() -> None:
    draw = [20.0, 15.0, 15.0, 15.0, 15.0]  # exactly 80 A, one session above 80/5
    site, out, full, nfull, params = run(draw)
    sp = out.column("setpoint_a").to_numpy()
    assert sp == pytest.approx([15.0] * N)
    assert np.all(counted_lines(site, sp, draw)[1] <= 80.0 * (1 + 1e-9))
    ref = reference_allocate(SiteArrays.build(site), full, nfull, params)
    assert sp == pytest.approx(ref.raised_a, abs=1e-9)


def test_feeder_measured_over_its_limit_is_sized_to_fit_when_followed_not_paused() -> None:
    """80.5 A measured on an 80 A feeder: no setpoint brings the counted load (max of setpoint
    and measured draw) under the limit. The old rule paused all five, and the next tick they all
    came back (a 16 -> 0 -> 16 A sawtooth). Now each gets 16 A: the feeder carries 80 A once
    the chargers follow their setpoints, and the reason says the feeder is over on what is
    measured (not the minimum 6 A, not a pause, not "not admitted")."""
    draw = [16.1] * N
    site, out, full, nfull, params = run(draw)
    sp = out.column("setpoint_a").to_numpy()
    assert sp == pytest.approx([16.0] * N)
    assert out.column("admitted").to_pylist() == [True] * N
    assert out.column("binding").to_pylist() == ["node_phase"] * N
    assert out.column("binding_value").to_numpy() == pytest.approx([80.5] * N)
    assert (
        out.column("reason").to_pylist()
        == [
            "lowered to 16 A (drawing 16.1 A): feeder F1 phase L1 at 80.5 of 80 A measured:"
            " sized to fit when chargers follow their setpoints"
        ]
        * N
    )
    # Judged independently: counted with the measured draw the feeder is over (it cannot be
    # otherwise); with every charger drawing its setpoint it holds exactly 80 A.
    assert np.all(counted_lines(site, sp, draw)[1] > 80.0)
    followed: np.ndarray = node_phase_currents(site, np.column_stack([sp] * 3))
    assert np.all(followed[1] <= 80.0 * (1 + 1e-9)) and followed[1] == pytest.approx([80.0] * 3)
    ref = reference_allocate(SiteArrays.build(site), full, nfull, params)
    assert ref.admitted.tolist() == [True] * N
    assert out.column("level_a").to_numpy() == pytest.approx(ref.level_a, abs=1e-9)
    assert sp == pytest.approx(ref.raised_a, abs=1e-9)


def test_unequal_draws_over_the_limit_share_the_feeder_as_if_followed() -> None:
    """84 A measured (one charger at 20 A): the feeder is shared as if each followed its
    setpoint, 16 A each, rather than by what each happens to draw; the reference agrees."""
    draw = [20.0, 16.0, 16.0, 16.0, 16.0]
    site, out, full, nfull, params = run(draw)
    sp = out.column("setpoint_a").to_numpy()
    assert sp == pytest.approx([16.0] * N)
    assert out.column("reason").to_pylist()[0].startswith("lowered to 16 A (drawing 20 A)")
    ref = reference_allocate(SiteArrays.build(site), full, nfull, params)
    assert sp == pytest.approx(ref.raised_a, abs=1e-9)


def test_envelope_alone_lowers_requests_to_fit_when_followed() -> None:
    """Through ``_core.enforce``: the same feeder, requests of 20 A. Each is lowered to 16 A;
    applying the envelope to its own output changes nothing."""
    site = feeder_site()
    cols: dict[str, Any] = {
        "requested_a": np.full(N, 20.0),
        "measured_l1_a": np.full(N, 16.1),
        "measured_l2_a": np.full(N, 16.1),
        "measured_l3_a": np.full(N, 16.1),
        "measured_age_s": np.full(N, 1.0),
        "last_sent_a": np.full(N, 16.0),
    }
    out = enforce(site, cols, params=EnvelopeParams())
    sp = out.column("setpoint_a").to_numpy()
    assert sp == pytest.approx([16.0] * N)
    assert set(out.column("binding_node").to_pylist()) == {"F1"}
    again = enforce(site, cols | {"requested_a": sp}, params=EnvelopeParams())
    assert again.column("setpoint_a").to_numpy().tolist() == sp.tolist()


def test_nothing_rises_below_a_feeder_measured_over_by_a_charger_ignoring_its_setpoint() -> None:
    """cp0 was sent 16 A and draws 90 A (it ignores its profile); the others were sent 0. The
    feeder is over on what is held alone. Sizing only "to fit when followed" started the other
    four beside it (16 A each: 154 A counted on 80); now nothing below the feeder rises above
    what it was sent, through the envelope alone and through the allocator."""
    site = feeder_site()
    last = np.array([16.0, 0.0, 0.0, 0.0, 0.0])
    draw = np.array([90.0, 0.0, 0.0, 0.0, 0.0])
    cols: dict[str, Any] = {
        "requested_a": np.full(N, 32.0),
        "measured_l1_a": draw,
        "measured_l2_a": draw,
        "measured_l3_a": draw,
        "measured_age_s": np.full(N, 1.0),
        "last_sent_a": last,
    }
    out = enforce(site, cols, params=EnvelopeParams())
    sp = out.column("setpoint_a").to_numpy()
    assert np.all(sp <= last + 1e-9), sp
    assert sp[1:].tolist() == [0.0] * 4
    assert out.column("binding_node").to_pylist()[1:] == ["F1"] * 4
    alloc_cols = {k: v for k, v in cols.items() if k != "requested_a"}
    alloc_cols["on_since_s"] = np.where(last > 0, NOW - 3600.0, np.nan)
    alloc_cols["off_since_s"] = np.where(last > 0, np.nan, NOW - 3600.0)
    out = allocate(
        site,
        allocator_batch(site, **alloc_cols),
        node_batch(site, other_load_age_s=np.ones(2)),
        params=AllocatorParams(now_s=NOW).as_dict(),
    )
    sp = out.column("setpoint_a").to_numpy()
    assert np.all(sp <= last + 1e-9), (sp, out.column("reason").to_pylist())
