"""Electric vehicle model for the charge point simulator.

Owns one vehicle's battery and onboard charger: capacity, state of charge, onboard current limit and
how many phases it draws on (a single-phase car on a three-phase charger draws on the charger's L1
only), and a CC-CV taper near full. Pure arithmetic on the time step it is given; no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

#: IEC 61851: below 6 A the pilot does not allow charging.
MIN_PILOT_A = 6.0


@dataclass
class EV:
    capacity_kwh: float = 60.0
    soc: float = 0.3  # fraction 0..1
    onboard_limit_a: float = 32.0  # AC, per phase
    phases: int = 3  # 1 = single-phase onboard charger
    #: State of charge where constant current ends and the CV taper begins.
    taper_start_soc: float = 0.8
    target_soc: float = 1.0
    #: DC: highest power the battery accepts in constant-current phase.
    max_dc_power_w: float = 150_000.0
    #: Lowest current the taper goes to before the car stops (A per phase).
    taper_floor_a: float = 1.0
    #: DC: lowest fraction of ``max_dc_power_w`` the taper goes to before the battery is full
    #: (the in-process twin's 10 %). Without a floor the taper fell in proportion to the energy
    #: still missing and a DC car never reached its target (the depot's DC buses ended
    #: 0.06-0.35 kWh short, counted as missed).
    dc_taper_floor: float = 0.1

    def __post_init__(self) -> None:
        if self.capacity_kwh <= 0:
            raise ValueError(f"EV capacity_kwh must be > 0, got {self.capacity_kwh}")
        if not 0.0 <= self.soc <= 1.0:
            raise ValueError(f"EV soc must be within [0, 1], got {self.soc}")
        if self.phases not in (1, 2, 3):
            raise ValueError(f"EV phases must be 1, 2 or 3, got {self.phases}")
        if not 0.0 < self.taper_start_soc <= 1.0:
            raise ValueError(
                f"EV taper_start_soc must be within (0, 1], got {self.taper_start_soc}"
            )

    @property
    def full(self) -> bool:
        return self.soc >= self.target_soc - 1e-9

    def _taper(self) -> float:
        """Fraction of the constant-current limit the battery accepts now (1 in CC, → 0 at full)."""
        if self.full:
            return 0.0
        if self.soc <= self.taper_start_soc:
            return 1.0
        span = max(1e-9, self.target_soc - self.taper_start_soc)
        return max(0.0, (self.target_soc - self.soc) / span)

    def ac_draw_a(self, offered_a: float) -> float:
        """Current per phase the car draws when the pilot offers ``offered_a``."""
        if offered_a < MIN_PILOT_A or self.full:
            return 0.0
        accept = max(self.taper_floor_a, self.onboard_limit_a * self._taper())
        return min(offered_a, self.onboard_limit_a, accept)

    def dc_draw_w(self, offered_w: float) -> float:
        if offered_w <= 0 or self.full:
            return 0.0
        return min(offered_w, self.max_dc_power_w * max(self.dc_taper_floor, self._taper()))

    @property
    def room_wh(self) -> float:
        """Energy the battery still takes before its target (Wh)."""
        return max(0.0, (self.target_soc - self.soc) * self.capacity_kwh * 1000.0)

    def add_energy(self, energy_wh: float) -> None:
        self.soc = min(1.0, self.soc + energy_wh / 1000.0 / self.capacity_kwh)

    @property
    def soc_percent(self) -> float:
        return self.soc * 100.0
