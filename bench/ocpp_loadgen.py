"""Load generator for ``bench_ocpp``: many OCPP 1.6 charge points in ONE separate process.

Each charger connects, boots, then sends MeterValues once a second (``spread``: sends spread
evenly over the second; ``aligned``: all chargers send at the same instant) and measures the time
from send to CALLRESULT. Prints one JSON object with the latency figures and lost-message count.
This is a measuring tool, not control code: it uses the wall clock directly on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol


def _iso(t: float) -> str:
    return (
        datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


_TEMPLATE = (
    '[2,"%s","MeterValues",{"connectorId":1,"meterValue":[{"timestamp":"%s","sampledValue":['
    '{"value":"%.1f","measurand":"Energy.Active.Import.Register","unit":"Wh","context":"Sample.Periodic"},'
    '{"value":"%.1f","measurand":"Power.Active.Import","unit":"W","context":"Sample.Periodic"},'
    '{"value":"32.0","measurand":"Current.Offered","unit":"A","context":"Sample.Periodic"},'
    '{"value":"%.2f","measurand":"Current.Import","phase":"L1","unit":"A","context":"Sample.Periodic"},'
    '{"value":"%.2f","measurand":"Current.Import","phase":"L2","unit":"A","context":"Sample.Periodic"},'
    '{"value":"%.2f","measurand":"Current.Import","phase":"L3","unit":"A","context":"Sample.Periodic"}'
    "]}]}]"
)
_ts_cache: dict[int, str] = {}


def meter_values_frame(uid: str, register_wh: float, current_a: float) -> str:
    """The same frame as ``meter_values`` but formatted from a template (the load generator must
    spend as little CPU per message as possible: it shares the machine with the server)."""
    now = time.time()
    sec = int(now)
    ts = _ts_cache.get(sec)
    if ts is None:
        _ts_cache.clear()
        ts = _ts_cache[sec] = _iso(sec)
    p = current_a * 230.0 * 3
    return _TEMPLATE % (uid, ts, register_wh, p, current_a, current_a, current_a)


def meter_values(register_wh: float, current_a: float) -> dict[str, Any]:
    p = current_a * 230.0 * 3
    sampled = [
        {
            "value": f"{register_wh:.1f}",
            "measurand": "Energy.Active.Import.Register",
            "unit": "Wh",
            "context": "Sample.Periodic",
        },
        {
            "value": f"{p:.1f}",
            "measurand": "Power.Active.Import",
            "unit": "W",
            "context": "Sample.Periodic",
        },
        {
            "value": "32.0",
            "measurand": "Current.Offered",
            "unit": "A",
            "context": "Sample.Periodic",
        },
    ]
    for ph in ("L1", "L2", "L3"):
        sampled.append(
            {
                "value": f"{current_a:.2f}",
                "measurand": "Current.Import",
                "phase": ph,
                "unit": "A",
                "context": "Sample.Periodic",
            }
        )
    return {
        "connectorId": 1,
        "meterValue": [{"timestamp": _iso(time.time()), "sampledValue": sampled}],
    }


class Charger:
    def __init__(self, ocpp_id: str, ws: ClientConnection) -> None:
        self.ocpp_id = ocpp_id
        self.ws = ws
        self.pending: dict[str, float] = {}
        self.latencies: list[float] = []
        self.sent_at: list[float] = []
        self.errors = 0
        self.seq = 0

    async def receive(self) -> None:
        async for raw in self.ws:
            now = time.perf_counter()
            if isinstance(raw, str) and raw.startswith('[3,"'):
                end = raw.index('"', 4)
                sent = self.pending.pop(raw[4:end], None)
                if sent is not None:
                    self.latencies.append(now - sent)
                    self.sent_at.append(sent)
                continue
            msg = json.loads(raw)
            if msg[0] == 2:  # a CALL from the CSMS: answer it so it is not left waiting
                await self.ws.send(json.dumps([4, msg[1], "NotImplemented", "", {}]))
                continue
            sent = self.pending.pop(msg[1], None)
            if sent is None:
                continue
            if msg[0] == 3:
                self.latencies.append(now - sent)
                self.sent_at.append(sent)
            else:
                self.errors += 1

    async def send_meter_values(self, register_wh: float, current_a: float) -> str:
        self.seq += 1
        uid = f"{self.ocpp_id}-{self.seq}"
        frame = meter_values_frame(uid, register_wh, current_a)
        self.pending[uid] = time.perf_counter()
        await self.ws.send(frame)
        return uid

    async def call(self, action: str, payload: dict[str, Any]) -> str:
        self.seq += 1
        uid = f"{self.ocpp_id}-{self.seq}"
        self.pending[uid] = time.perf_counter()
        await self.ws.send(json.dumps([2, uid, action, payload], separators=(",", ":")))
        return uid


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ids = [args.id_format.format(i) for i in range(args.chargers)]
    sem = asyncio.Semaphore(args.connect_concurrency)
    chargers: list[Charger] = []
    receivers: list[asyncio.Task[None]] = []

    async def open_one(ocpp_id: str) -> None:
        headers = {}
        if args.password:
            tok = base64.b64encode(f"{ocpp_id}:{args.password}".encode()).decode()
            headers["Authorization"] = f"Basic {tok}"
        async with sem:
            ws = await connect(
                f"{args.url}/{ocpp_id}",
                subprotocols=[Subprotocol("ocpp1.6")],
                additional_headers=headers,
                compression=None,
                ping_interval=None,
                open_timeout=60,
                max_queue=None,
            )
            ch = Charger(ocpp_id, ws)
            receivers.append(asyncio.create_task(ch.receive()))
            await ch.call(
                "BootNotification", {"chargePointVendor": "bench", "chargePointModel": "lg"}
            )
            chargers.append(ch)

    t_connect = time.perf_counter()
    await asyncio.gather(*(open_one(i) for i in ids))
    # wait for boot answers
    deadline = time.perf_counter() + 30
    while any(ch.pending for ch in chargers) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    connect_s = time.perf_counter() - t_connect
    for ch in chargers:
        ch.latencies.clear()
        ch.sent_at.clear()

    n = len(chargers)
    start = time.perf_counter() + 0.5
    sent = 0
    warm = args.warmup

    async def drive(k: int, ch: Charger) -> None:
        nonlocal sent
        offset = (k / n) if args.mode == "spread" else 0.0
        register = 1_000_000.0 + k
        for second in range(args.duration):
            at = start + second + offset
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            register += 5.0
            uid = await ch.send_meter_values(register, 10.0 + (k % 7))
            if second < warm:
                ch.pending[uid] = -1e18  # marker: measured but excluded as warm-up
            sent += 1

    await asyncio.gather(*(drive(k, ch) for k, ch in enumerate(chargers)))
    deadline = time.perf_counter() + args.drain
    while any(ch.pending for ch in chargers) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - start
    lat = sorted(x for ch in chargers for x in ch.latencies if x < 1e9)
    # The worst latency of the messages sent in each second (where a tail comes from).
    by_second: dict[int, float] = {}
    for ch in chargers:
        for sent_at, x in zip(ch.sent_at, ch.latencies, strict=True):
            if x < 1e9:
                k = int(sent_at - start)
                by_second[k] = max(by_second.get(k, 0.0), x)
    lost = sum(len(ch.pending) for ch in chargers)
    errors = sum(ch.errors for ch in chargers)
    for ch in chargers:
        await ch.ws.close()
    for t in receivers:
        t.cancel()
    await asyncio.gather(*receivers, return_exceptions=True)

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {
        "chargers": n,
        "mode": args.mode,
        "sent": sent,
        "answered": sent - lost - errors,
        "measured": len(lat),
        "lost": lost,
        "errors": errors,
        "p50_s": q(0.50),
        "p99_s": q(0.99),
        "max_s": lat[-1] if lat else float("nan"),
        "msg_per_s": (sent - lost) / elapsed if elapsed > 0 else 0.0,
        "connect_s": connect_s,
        "loadgen_cpu_s": time.process_time(),
        "max_by_second_s": [round(by_second.get(k, 0.0), 4) for k in range(args.duration)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="ws://host:port/prefix (the id is appended)")
    p.add_argument("--chargers", type=int, default=1000)
    p.add_argument("--mode", choices=("spread", "aligned"), default="spread")
    p.add_argument("--duration", type=int, default=15, help="seconds of sending")
    p.add_argument("--warmup", type=int, default=2, help="first seconds not measured")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to wait for late answers")
    p.add_argument("--password", default=None)
    p.add_argument("--id-format", default="CP{:04d}")
    p.add_argument("--connect-concurrency", type=int, default=100)
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
