"""Shared helpers for the OCPP tests: a small site, a running central system and a fleet."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evcore.clock import WallClock
from evcore.ocpp import CentralSystem, OcppEvent, TransactionEvent
from evcore.ocpp.server import TX_KEEP_S
from evcore.ocpp.v16 import iso
from evcore.sim.fleet import Fleet
from evcore.site import Site, load_site
from evcore.store.sqlite import sqlite_store
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

PASSWORDS = {
    "CPA": "password-of-cpa-16",
    "CPB": "password-of-cpb-201",
    "CPM": "password-of-cpm-multi",
    "CPC": "password-of-cpc-l2n",
    "CPD": "password-of-cpd-dc-50kw",
    "CPE": "password-of-cpe-dc-no-efficiency",
}

SITE: dict[str, Any] = {
    "site": {"id": "ocpp-test"},
    "nodes": [
        {"id": "grid", "kind": "grid", "phase_limit_a": 200.0},
        {"id": "F1", "parent": "grid", "phase_limit_a": 63.0},
    ],
    "chargers": [
        # 1.6, three-phase with phase rotation: charger L1 is site L2.
        {
            "id": "cp-a",
            "ocpp_id": "CPA",
            "parent": "F1",
            "wiring": "three_phase",
            "phases": ["L2", "L3", "L1"],
            "voltage_v": 230.0,
            "max_a": 32.0,
        },
        # 2.0.1, three-phase.
        {
            "id": "cp-b",
            "ocpp_id": "CPB",
            "parent": "F1",
            "wiring": "three_phase",
            "phases": ["L1", "L2", "L3"],
            "voltage_v": 230.0,
            "max_a": 32.0,
        },
        # 1.6 station with two EVSEs (one call queue).
        {
            "id": "cp-m1",
            "ocpp_id": "CPM",
            "evse_id": 1,
            "parent": "grid",
            "wiring": "three_phase",
            "phases": ["L1", "L2", "L3"],
            "voltage_v": 230.0,
            "max_a": 32.0,
        },
        {
            "id": "cp-m2",
            "ocpp_id": "CPM",
            "evse_id": 2,
            "parent": "grid",
            "wiring": "three_phase",
            "phases": ["L1", "L2", "L3"],
            "voltage_v": 230.0,
            "max_a": 32.0,
        },
        # single-phase charger on site L3.
        {
            "id": "cp-c",
            "ocpp_id": "CPC",
            "parent": "grid",
            "wiring": "line_to_neutral",
            "phases": ["L3"],
            "voltage_v": 230.0,
            "max_a": 32.0,
        },
    ],
    "ocpp": {
        "port": 0,
        "security_profile": 1,
        "credentials": dict(PASSWORDS),
        "sample_interval_s": 1,
        "call_timeout_s": 3,
        "data_transfer_vendor_ids": ["com.evcore"],
    },
}

VERSIONS = {"CPA": "1.6", "CPB": "2.0.1", "CPM": "1.6", "CPC": "2.0.1", "CPD": "2.0.1"}

#: A 50 kW DC charger (2.0.1), for the tests that need one.
DC_CHARGER: dict[str, Any] = {
    "id": "cp-d",
    "ocpp_id": "CPD",
    "parent": "grid",
    "kind": "dc",
    "wiring": "three_phase",
    "phases": ["L1", "L2", "L3"],
    "voltage_v": 230.0,
    "max_w": 50_000.0,
    "min_w": 5_000.0,
    "efficiency": 0.95,
    "aux_w": 200.0,
}


def make_site(*, extra_chargers: list[dict[str, Any]] | None = None, **ocpp_overrides: Any) -> Site:
    """The shared test site; ``extra_chargers`` need a password in ``PASSWORDS``."""
    data = copy.deepcopy(SITE)
    data["ocpp"].update(ocpp_overrides)
    for c in extra_chargers or ():
        data["chargers"].append(c)
        data["ocpp"]["credentials"][c["ocpp_id"]] = PASSWORDS[c["ocpp_id"]]
    return load_site(data)


@dataclass
class Rig:
    site: Site
    cs: CentralSystem
    fleet: Fleet
    events: list[OcppEvent] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"ws://127.0.0.1:{self.cs.port}/ocpp"

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def until(self, pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
        async def poll() -> None:
            while not pred():  # noqa: ASYNC110 - polls any predicate
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), timeout_s)


@asynccontextmanager
async def rig(
    *,
    connect: bool = True,
    versions: dict[str, str] | None = None,
    bus: Any = None,
    store: Any = None,
    extra_chargers: list[dict[str, Any]] | None = None,
    **ocpp: Any,
) -> AsyncIterator[Rig]:
    site = make_site(extra_chargers=extra_chargers, **ocpp)
    clock = WallClock()
    cs = CentralSystem(site, clock=clock, bus=bus, store=store)
    events: list[OcppEvent] = []
    cs.add_listener(events.append)
    await cs.start()
    fleet = Fleet(
        site,
        url=f"ws://127.0.0.1:{cs.port}/ocpp",
        clock=clock,
        version=versions or VERSIONS,
        passwords=PASSWORDS,
        apply_delay_s=0.1,
        tick_s=0.05,
        sample_interval_s=1.0,
        reconnect_delay_s=0.2,
    )
    r = Rig(site, cs, fleet, events)
    try:
        if connect:
            await fleet.start()
            await fleet.wait_connected()
            await r.until(lambda: all(s.boot_status == "Accepted" for s in fleet.stations.values()))
        yield r
    finally:
        await fleet.stop()
        await cs.stop()


def auth(ocpp_id: str, password: str | None = None) -> dict[str, str]:
    """The Basic auth header of ``ocpp_id`` (its password in ``PASSWORDS`` unless given)."""
    pw = PASSWORDS[ocpp_id] if password is None else password
    return {"Authorization": "Basic " + base64.b64encode(f"{ocpp_id}:{pw}".encode()).decode()}


async def raw_call(ws: Any, unique_id: str, action: str, payload: Any) -> list[Any]:
    """Send one CALL on a bare WebSocket and return its answer; the central system's own CALLs
    (the configuration at boot) go unanswered."""
    await ws.send(json.dumps([2, unique_id, action, payload]))
    while True:
        msg: list[Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if msg[0] != 2 and msg[1] == unique_id:
            return msg


def station_ws(base_url: str, ocpp_id: str, version: str) -> Any:
    """A bare WebSocket of ``ocpp_id`` to the central system at ``base_url`` (``ws://…/ocpp``),
    with its password, offering ``version`` (``"1.6"``, ``"2.0.1"`` or the subprotocol's name):
    ``await`` it or use it with ``async with``."""
    return connect(
        f"{base_url}/{ocpp_id}",
        subprotocols=[Subprotocol(version if version.startswith("ocpp") else "ocpp" + version)],
        additional_headers=auth(ocpp_id),
    )


class RawStation:
    """A station speaking raw OCPP-J frames over a real WebSocket: ``call`` sends a CALL and
    returns the answer frame; the central system's CALLs are answered with ``responder(action,
    payload)`` (``{"status": "Accepted"}`` by default) and kept in ``calls``."""

    def __init__(self, ws: Any, responder: Any = None) -> None:
        self.ws = ws
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._pending: dict[str, asyncio.Future[list[Any]]] = {}
        self._n = 0
        self.responder = responder or (lambda action, payload: {"status": "Accepted"})
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(
        cls, port: int, ocpp_id: str, version: str = "2.0.1", responder: Any = None
    ) -> RawStation:
        ws = await station_ws(f"ws://127.0.0.1:{port}/ocpp", ocpp_id, version)
        return cls(ws, responder)

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if msg[0] == 2:
                self.calls.append((msg[2], msg[3]))
                await self.ws.send(json.dumps([3, msg[1], self.responder(msg[2], msg[3])]))
            else:
                fut = self._pending.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    async def call(self, action: str, payload: dict[str, Any]) -> list[Any]:
        self._n += 1
        uid = f"raw-{self._n}"
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending[uid] = fut
        await self.ws.send(json.dumps([2, uid, action, payload]))
        return await asyncio.wait_for(fut, 5)

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


#: A 2.0.1 BootNotification.
BOOT_201: dict[str, Any] = {
    "chargingStation": {"vendorName": "V", "model": "M"},
    "reason": "PowerUp",
}
#: A 1.6 BootNotification.
BOOT_16: dict[str, Any] = {"chargePointVendor": "V", "chargePointModel": "M"}


@dataclass
class RawRig:
    """A running central system (no fleet) for raw stations, and every event it emitted."""

    cs: CentralSystem
    clock: WallClock
    events: list[Any] = field(default_factory=list)
    stations: list[RawStation] = field(default_factory=list)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def station(
        self, ocpp_id: str, version: str = "2.0.1", responder: Any = None
    ) -> RawStation:
        """A ``RawStation`` for ``ocpp_id``, booted (closed when the rig ends)."""
        st = await RawStation.open(self.cs.port, ocpp_id, version, responder)
        self.stations.append(st)
        answer = await st.call("BootNotification", BOOT_201 if version == "2.0.1" else BOOT_16)
        assert answer[0] == 3, answer
        return st


@asynccontextmanager
async def raw_csms(
    *,
    store: Any = None,
    bus: Any = None,
    tx_keep_s: float = TX_KEEP_S,
    extra_chargers: list[dict[str, Any]] | None = None,
    site: Site | None = None,
    **ocpp: Any,
) -> AsyncIterator[RawRig]:
    """A central system on the shared test site (``configure_on_boot`` off unless given), its
    events collected; stations come from ``RawRig.station``."""
    ocpp.setdefault("configure_on_boot", False)
    if site is None:
        site = make_site(extra_chargers=extra_chargers, **ocpp)
    clock = WallClock()
    cs = CentralSystem(site, clock=clock, bus=bus, store=store, tx_keep_s=tx_keep_s)
    r = RawRig(cs, clock)
    cs.add_listener(r.events.append)
    await cs.start()
    try:
        yield r
    finally:
        for st in r.stations:
            await st.close()
        await cs.stop()


def tx_event(
    tx_id: str, seq: int, event_type: str, trigger: str, at: float, **extra: Any
) -> dict[str, Any]:
    """A 2.0.1 TransactionEvent payload; ``extra`` adds fields (evse, meterValue, offline...)."""
    p: dict[str, Any] = {
        "eventType": event_type,
        "timestamp": iso(at),
        "triggerReason": trigger,
        "seqNo": seq,
        "transactionInfo": {"transactionId": tx_id},
    }
    p.update(extra)
    return p


def meter(at: float, wh: float, amps: float) -> list[dict[str, Any]]:
    """A 2.0.1 meterValue list: the energy register and the L1 current at ``at``."""
    return [
        {
            "timestamp": iso(at),
            "sampledValue": [
                {"value": wh, "measurand": "Energy.Active.Import.Register"},
                {"value": amps, "measurand": "Current.Import", "phase": "L1"},
            ],
        }
    ]


def one_session(tx_id: str, t: float) -> list[dict[str, Any]]:
    """A 2.0.1 session of ``tx_id`` on CPB's EVSE 1 from ``t``: Started, Updated, Ended."""
    evse = {"id": 1, "connectorId": 1}
    stopped = {"transactionId": tx_id, "stoppedReason": "EVDisconnected"}
    return [
        tx_event(tx_id, 0, "Started", "CablePluggedIn", t, evse=evse,
                 meterValue=meter(t, 1000, 16)),
        tx_event(tx_id, 1, "Updated", "MeterValuePeriodic", t + 60,
                 meterValue=meter(t + 60, 1500, 16)),
        tx_event(tx_id, 2, "Ended", "EVDeparted", t + 120, transactionInfo=stopped,
                 meterValue=meter(t + 120, 2000, 0)),
    ]  # fmt: skip


def starts_and_ends(events: list[Any], tx_id: str) -> list[str]:
    """The starts and ends of ``tx_id`` the listeners heard, in order."""
    return [
        e.kind
        for e in events
        if isinstance(e, TransactionEvent) and e.transaction_id == tx_id and e.kind != "updated"
    ]


def start_16(t: float, meter_start_wh: int, id_tag: str = "TAG1") -> dict[str, Any]:
    """A 1.6 StartTransaction payload on connector 1 at ``t``."""
    return {"connectorId": 1, "idTag": id_tag, "meterStart": meter_start_wh, "timestamp": iso(t)}


def stop_16(tx_id: int, t: float, meter_stop_wh: int) -> dict[str, Any]:
    """A 1.6 StopTransaction payload of ``tx_id`` at ``t``."""
    return {
        "transactionId": tx_id,
        "meterStop": meter_stop_wh,
        "timestamp": iso(t),
        "reason": "EVDisconnected",
    }


@asynccontextmanager
async def open_sqlite(tmp_path: Path) -> AsyncIterator[Any]:
    """An open embedded (SQLite) store under ``tmp_path``, closed at the end."""
    store = sqlite_store(tmp_path / "store", telemetry_retention_s=3600)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


class TcpRelay:
    """A TCP relay to ``port`` on a port of its own. ``uplink_rate``: the station's bytes reach
    the central system at that many bytes/s (in order: a pong sent after a frame comes after it);
    the other way at once. ``cut`` makes it drop every byte both ways while both connections stay
    open (a link gone silent)."""

    def __init__(self, port: int, uplink_rate: int | None = None) -> None:
        self.port = port
        self.rate = uplink_rate
        self.cut = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: int | None
    ) -> None:
        chunk = 65536 if rate is None else max(1, rate // 20)
        with contextlib.suppress(OSError):
            while data := await reader.read(chunk):
                if not self.cut:
                    writer.write(data)
                    await writer.drain()
                if rate is not None:
                    await asyncio.sleep(len(data) / rate)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, self.rate), self._pipe(up_reader, writer, None)
        )

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for w in self._writers:
            w.transport.abort()
        if self._server is not None:
            self._server.close()
