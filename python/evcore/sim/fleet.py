"""A fleet of simulated stations for one site file: one :class:`SimChargePoint` per OCPP identity.

Owns building the simulators from the site's chargers (EVSEs of one station share one simulator)
and the fleet-wide view the site physics needs: every charger's terminal currents, in the site
file's charger order. Talks to the central system only through the simulators' sockets.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from evcore.clock import Clock
from evcore.sim.chargepoint import SimChargePoint, SimConnector
from evcore.sim.ev import EV


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def connector_for(spec: Any) -> SimConnector:
    """A simulated connector with the electrical data of one site charger."""
    kind = _get(spec, "kind", "ac") or "ac"
    return SimConnector(
        evse_id=int(_get(spec, "evse_id", 1) or 1),
        connector_id=int(_get(spec, "connector_id", 1) or 1),
        kind=kind,
        wiring=_get(spec, "wiring", "three_phase"),
        voltage_v=float(_get(spec, "voltage_v", 230.0) or 230.0),
        max_a=float(_get(spec, "max_a", 32.0) or 32.0),
        steps_a=tuple(_get(spec, "steps_a", ()) or ()) or None,
        max_w=float(_get(spec, "max_w", 50_000.0) or 50_000.0),
        min_w=float(_get(spec, "min_w", 0.0) or 0.0),
        efficiency=float(_get(spec, "efficiency", 0.95) or 0.95),
        aux_w=float(_get(spec, "aux_w", 0.0) or 0.0),
        charger_id=_get(spec, "id"),
    )


class Fleet:
    """Simulated stations for every charger of ``site``, connecting to ``url`` + ``/{ocpp_id}``."""

    def __init__(
        self,
        site: Any,
        *,
        url: str,
        clock: Clock,
        version: str | Mapping[str, str] = "1.6",
        passwords: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        apply_delay_s: float = 1.0,
        tick_s: float = 0.1,
        sample_interval_s: float = 10.0,
        reconnect_delay_s: float = 1.0,
    ) -> None:
        self.site = site
        self.clock = clock
        specs = list(_get(site, "chargers") or [])
        self.charger_ids: list[str] = [_get(s, "id") for s in specs]
        grouped: dict[str, list[SimConnector]] = {}
        self._where: dict[str, tuple[str, int]] = {}
        for spec in specs:
            ocpp_id = _get(spec, "ocpp_id") or _get(spec, "id")
            conn = connector_for(spec)
            grouped.setdefault(ocpp_id, []).append(conn)
            self._where[_get(spec, "id")] = (ocpp_id, conn.evse_id)
        self.stations: dict[str, SimChargePoint] = {}
        for ocpp_id, conns in grouped.items():
            v = version if isinstance(version, str) else version.get(ocpp_id, "1.6")
            self.stations[ocpp_id] = SimChargePoint(
                ocpp_id,
                conns,
                url=f"{url.rstrip('/')}/{quote(ocpp_id, safe='')}",
                clock=clock,
                version=v,
                password=(passwords or {}).get(ocpp_id),
                ssl_context=ssl_context,
                apply_delay_s=apply_delay_s,
                tick_s=tick_s,
                sample_interval_s=sample_interval_s,
                reconnect_delay_s=reconnect_delay_s,
            )

    def station(self, charger_id: str) -> tuple[SimChargePoint, int]:
        ocpp_id, evse = self._where[charger_id]
        return self.stations[ocpp_id], evse

    def connector(self, charger_id: str) -> SimConnector:
        sim, evse = self.station(charger_id)
        return sim.connectors[evse]

    async def start(self) -> None:
        for sim in self.stations.values():
            await sim.start()

    async def stop(self) -> None:
        await asyncio.gather(*(sim.stop() for sim in self.stations.values()))

    async def wait_connected(self, timeout_s: float = 10.0) -> None:
        await asyncio.gather(*(s.wait_connected(timeout_s) for s in self.stations.values()))

    def plug_in(self, charger_id: str, ev: EV, *, id_tag: str = "EVCORE-SIM") -> None:
        sim, evse = self.station(charger_id)
        sim.plug_in(evse, ev, id_tag=id_tag)

    def unplug(self, charger_id: str) -> None:
        sim, evse = self.station(charger_id)
        sim.unplug(evse)

    def terminal_currents(self) -> npt.NDArray[np.float64]:
        """(chargers, 3) terminal currents in A, in the site file's charger order."""
        out = np.zeros((len(self.charger_ids), 3))
        for i, cid in enumerate(self.charger_ids):
            out[i] = self.connector(cid).terminal_a
        return out
