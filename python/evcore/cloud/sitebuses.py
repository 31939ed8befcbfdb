"""One bus per site for the cloud process, shared by everything in it that talks to that site.

The audit consumers read each site's audit over its bus; the fleet's grid publisher sends each
site its curtailments over it. Each opened its own: two buses per site on one outbox file
(``<outbox_dir>/<site>.sqlite``), each counting only the entries it saw, so once one pump sent
and removed the leftover entries the other counted them pending for good and polled the empty
file a hundred times a second (its ``flush`` never drained), and a second NATS connection per
site besides. Here every site's bus is opened once, all over one NATS connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evcore.clock import Clock

if TYPE_CHECKING:
    from evcore.bus.api import Bus
    from evcore.bus.natsbus import NatsConnection


#: What a site's bus raises when its outbox (one SQLite file per site) cannot be opened or
#: written: a path that cannot be opened or created, a full disk, an I/O error, a lock held too
#: long. An outage of that site's bus, not a bug.
OUTBOX_FAILURES: tuple[type[Exception], ...] = (OSError, sqlite3.OperationalError)


class SiteBusUnavailable(Exception):
    """A site's bus cannot take a message now (its outbox cannot be opened or written); the
    message names the site and the outbox. Over gRPC: UNAVAILABLE (evcore.cloud.status)."""


def outbox_of(bus: object) -> str:
    """``"outbox <path>"`` of a bus with an outbox file, else ``"its bus"``."""
    outbox = getattr(bus, "outbox", None)
    path = getattr(outbox, "path", None)
    return f"outbox {path}" if path is not None else "its bus"


class SiteBuses:
    """Started buses by site id (``get``), opened on first use from the ``[bus]`` section, over
    one NATS connection when it is NATS; ``close`` closes them all and the connection."""

    def __init__(self, bus_section: Mapping[str, Any], clock: Clock) -> None:
        from evcore.bus import parse_bus_config

        self._section = bus_section
        self._clock = clock
        self._buses: dict[str, Bus] = {}
        # One lock per site: a bus that takes its connect timeout to start (the broker away)
        # holds back no other site's (a curtailment's decrease to another site included).
        self._locks: dict[str, asyncio.Lock] = {}
        self._shared: NatsConnection | None = None
        cfg = parse_bus_config(bus_section)
        if cfg.kind == "nats":
            from evcore.bus.natsbus import NatsConnection as Shared

            self._shared = Shared(cfg)

    async def get(self, site_id: str) -> Bus:
        """The site's started bus; ``SiteBusUnavailable`` when it cannot be started (its outbox
        cannot be opened)."""
        bus = self._buses.get(site_id)
        if bus is not None:
            return bus
        async with self._locks.setdefault(site_id, asyncio.Lock()):
            bus = self._buses.get(site_id)
            if bus is None:
                from evcore.bus import bus_from_config

                bus = bus_from_config(self._section, site_id, self._clock, connection=self._shared)
                try:
                    await bus.start()
                except OUTBOX_FAILURES as exc:
                    # Tried again on the next call; the outbox's worker thread goes now.
                    outbox = getattr(bus, "outbox", None)
                    if outbox is not None:
                        with contextlib.suppress(Exception):
                            await outbox.close()
                    raise SiteBusUnavailable(
                        f"bus of site {site_id!r} unavailable: {outbox_of(bus)} cannot be "
                        f"opened: {exc}"
                    ) from exc
                self._buses[site_id] = bus
            return bus

    def sites(self) -> list[str]:
        return sorted(self._buses)

    async def close(self) -> None:
        buses, self._buses = list(self._buses.values()), {}
        for bus in buses:
            await bus.close()
        if self._shared is not None:
            await self._shared.close()
            self._shared = None
