"""``evcore bench bus``: what the control path pays to publish, and how fast events get through.

Cases (each against a reference in the same process, interleaved, ratio = reference / ours):

* ``inprocess-deliver``: in-process bus, publish → subscriber handler latency; reference: a bare
  ``asyncio.Queue`` hand-off between two tasks (the least any in-process bus can cost).
* ``inprocess-publish`` (100 and 10,000 distinct subjects): what one ``publish`` costs the caller on
  the in-process bus (a telemetry sample to one of N chargers, the default streams, five live
  subscriptions of which two match), per message over blocks of 50; reference: the least an
  in-process bus must do for the same message (serialise it and put it on the two matching
  subscribers' ``asyncio.Queue``s). Every subject is published once before timing (steady state:
  each charger reports every second). ``uncached_median_s`` is the same bus with its per-subject
  route cache off (``route_cache_size=0``: every publish resolves its subject, the cost of a cache
  miss), measured interleaved in the same run.
* ``nats-critical-accept``: time until ``publish(critical=True)`` returns (fsynced into the disk
  outbox); reference: awaiting JetStream's acknowledgement of the same publish (what a naive edge
  would wait for — and could not do at all while the broker is down).
* ``nats-critical-accept-batch100``: a decision's 100 setpoints through ``publish_many`` (one
  commit, one fsync), per setpoint; same reference.
* ``nats-audit-e2e``: critical publish → durable consumer handler, per message; reference: raw
  ``js.publish`` + a raw pull consumer on the same server.
* ``nats-telemetry-accept``: ``publish`` of a meter sample (returns after queueing); reference:
  ``nc.publish`` of the same bytes (buffered client write).
* ``nats-outbox-drain`` (backlogs of 1,000 and 10,000): a backlog of critical events accepted in one
  ``publish_many`` and drained by the pump until JetStream stored all, per event; reference: the
  same events sent with raw ``js.publish_async`` in windows of 64 (no disk), per event. Shows what
  the outbox costs per event and whether the drain stays linear in the backlog.
* ``nats-events-drain`` (same backlogs): normal events (status) through the pipelined sender until
  all were acknowledged; same reference with windows of 128.

Every case checks delivery: ``lost`` and ``duplicates`` must be 0. NATS cases need a server
(``--url``, default nats://127.0.0.1:4222) and are skipped with a note when none answers.
Expected cost: constant per message (drain time linear in the backlog); single publishes are
dominated by the fsync (outbox) and the loopback round trip (JetStream acks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from evcore.bus import BusConfig, BusMessage, InProcessBus, Subjects
from evcore.bus.natsbus import NatsBus
from evcore.clock import WallClock
from evcore.v1 import audit_pb2, meter_pb2


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def _case(name: str, ours: list[float], ref: list[float], **extra: Any) -> dict[str, Any]:
    med, rmed = statistics.median(ours), statistics.median(ref)
    return {
        "name": name,
        "messages": len(ours),
        "median_s": med,
        "p99_s": _p99(ours),
        "reference_median_s": rmed,
        "reference_p99_s": _p99(ref),
        "ratio": rmed / med if med > 0 else float("inf"),
        **extra,
    }


async def _interleave(
    n: int, ours: Callable[[int], Awaitable[float]], ref: Callable[[int], Awaitable[float]]
) -> tuple[list[float], list[float]]:
    a: list[float] = []
    b: list[float] = []
    for i in range(n):
        if i % 2:
            a.append(await ours(i))
            b.append(await ref(i))
        else:
            b.append(await ref(i))
            a.append(await ours(i))
    return a, b


async def inprocess_deliver(n: int) -> dict[str, Any]:
    bus = InProcessBus("bench", clock=WallClock())
    await bus.start()
    s = Subjects("bench")
    got: asyncio.Queue[float] = asyncio.Queue()
    received: list[str] = []

    async def handler(m: BusMessage) -> None:
        received.append(m.event_id)
        got.put_nowait(time.perf_counter())

    await bus.subscribe(s.status(), handler)
    q: asyncio.Queue[float] = asyncio.Queue()
    out: asyncio.Queue[float] = asyncio.Queue()

    async def relay() -> None:
        while True:
            await q.get()
            out.put_nowait(time.perf_counter())

    relay_task = asyncio.create_task(relay())
    payload = meter_pb2.MeterSample(charger_id="C1", power_w=7400).SerializeToString()

    async def ours(i: int) -> float:
        t0 = time.perf_counter()
        await bus.publish(s.status("C1"), payload, event_id=f"e{i}")
        return await got.get() - t0

    async def ref(i: int) -> float:
        t0 = time.perf_counter()
        q.put_nowait(t0)
        return await out.get() - t0

    for i in range(50):  # warm-up
        await ours(-i - 1)
        await ref(0)
    received.clear()
    a, b = await _interleave(n, ours, ref)
    relay_task.cancel()
    await bus.close()
    want = [f"e{i}" for i in range(n)]
    return _case(
        "inprocess-deliver",
        a,
        b,
        lost=len(set(want) - set(received)),
        duplicates=len(received) - len(set(received)),
    )


async def inprocess_publish(n: int, chargers: int) -> dict[str, Any]:
    block = 50
    blocks = max(30, n // block)
    site = "bench-pub"
    s = Subjects(site)
    subjects = [s.telemetry(f"C{i}") for i in range(chargers)]
    sample = meter_pb2.MeterSample(charger_id="C1", power_w=7400, current_a=[10.0, 10.0, 10.0])

    async def make(**kw: Any) -> tuple[InProcessBus, list[int]]:
        bus = InProcessBus(site, clock=WallClock(), **kw)
        await bus.start()
        counts = [0]

        async def handler(m: BusMessage) -> None:
            counts[0] += 1

        async def other(m: BusMessage) -> None:
            pass

        await bus.subscribe(s.telemetry(), handler)  # the edge's state
        await bus.subscribe(s.all, handler)  # a recorder of the whole site
        for pattern in (s.status(), s.transaction(), s.setpoint()):
            await bus.subscribe(pattern, other)
        return bus, counts

    cached, got = await make()
    try:
        uncached, got_uncached = await make(route_cache_size=0)
    except TypeError:  # a bus without the route cache
        uncached, got_uncached = None, [0]
    queues: list[asyncio.Queue[bytes]] = [asyncio.Queue(), asyncio.Queue()]
    sent = [0, 0]
    k = [0]

    def drained(counts: list[int], which: int) -> Callable[[], bool]:
        return lambda: counts[0] >= 2 * sent[which]

    async def timed(bus: InProcessBus, counts: list[int], which: int) -> float:
        t0 = time.perf_counter()
        for _ in range(block):
            i = k[0]
            k[0] += 1
            await bus.publish(subjects[i % chargers], sample, event_id=f"p{i}")
        dt = (time.perf_counter() - t0) / block
        sent[which] += block
        # Let the subscribers catch up (not timed): nothing may be dropped or lost.
        await _wait(drained(counts, which), 10.0)
        return dt

    async def ours(i: int) -> float:
        return await timed(cached, got, 0)

    async def ref(i: int) -> float:
        t0 = time.perf_counter()
        for _ in range(block):
            data = sample.SerializeToString()
            for q in queues:
                q.put_nowait(data)
        dt = (time.perf_counter() - t0) / block
        for q in queues:
            while not q.empty():
                q.get_nowait()
        return dt

    unc: list[float] = []

    async def ours_then_uncached(i: int) -> float:
        dt = await ours(i)
        if uncached is not None:
            unc.append(await timed(uncached, got_uncached, 1))
        return dt

    # Warm-up: every subject once (steady state), then a few timed blocks thrown away.
    for bus, counts, which in ((cached, got, 0), (uncached, got_uncached, 1)):
        if bus is None:
            continue
        for j, subject in enumerate(subjects):
            await bus.publish(subject, sample, event_id=f"w{j}")
            sent[which] += 1
            if j % 500 == 499:
                await _wait(drained(counts, which), 10.0)
        await _wait(drained(counts, which), 10.0)
    for i in range(5):
        await ours_then_uncached(i)
        await ref(i)
    unc.clear()
    a, b = await _interleave(blocks, ours_then_uncached, ref)
    stats = cached.stats
    await cached.close()
    if uncached is not None:
        await uncached.close()
    extra: dict[str, Any] = {}
    if unc:
        extra["uncached_median_s"] = statistics.median(unc)
        extra["uncached_p99_s"] = _p99(unc)
    return _case(
        f"inprocess-publish-{chargers}",
        a,
        b,
        chargers=chargers,
        block=block,
        lost=2 * sent[0] - got[0],
        duplicates=0,
        slow_consumer_dropped=stats.slow_consumer_dropped,
        **extra,
    )


async def nats_cases(
    url: str, n: int, workdir: Path, backlogs: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    import nats
    from nats.js import api as jsapi

    site = f"bench-{uuid.uuid4().hex[:8]}"
    cfg = BusConfig(kind="nats", urls=(url,), connect_timeout_s=2.0, reconnect_wait_s=0.1)
    bus = NatsBus(site, cfg, clock=WallClock(), outbox_path=workdir / "outbox.sqlite")
    await bus.start()
    if not bus.connected:
        await bus.close()
        raise ConnectionError(f"no NATS server at {url}")
    s = Subjects(site)
    nc = await nats.connect(url)
    js = nc.jetstream()
    ref_stream = f"BENCHREF_{site}"
    await js.add_stream(jsapi.StreamConfig(name=ref_stream, subjects=[f"benchref.{site}.>"]))
    cases: list[dict[str, Any]] = []
    try:
        rec = audit_pb2.AuditRecord(seq=1, decision_id="d", trigger="tick", inputs_digest="0" * 64)
        data = rec.SerializeToString()

        # 1. accept latency of a critical publish vs waiting for JetStream's ack.
        async def accept(i: int) -> float:
            t0 = time.perf_counter()
            await bus.publish(s.audit, data, event_id=f"acc-{i}")
            return time.perf_counter() - t0

        async def js_ack(i: int) -> float:
            t0 = time.perf_counter()
            await js.publish(f"benchref.{site}.audit", data, headers={"Nats-Msg-Id": f"r{i}"})
            return time.perf_counter() - t0

        for i in range(20):
            await accept(-i - 1)
            await js_ack(-i - 1)
        a, b = await _interleave(n, accept, js_ack)
        assert await bus.flush(timeout_s=30)
        info = await js.stream_info(bus.streams[0].name)
        stored = int(info.state.messages)
        cases.append(
            _case(
                "nats-critical-accept",
                a,
                b,
                lost=n + 20 - stored,
                duplicates=max(0, stored - n - 20),
            )
        )

        # 1b. a decision's 100 setpoints in one publish_many (one fsync), per setpoint.
        batch = 100
        sp = data

        async def accept_batch(i: int) -> float:
            items = [(s.setpoint(f"C{k}"), sp, f"b{i}/C{k}") for k in range(batch)]
            t0 = time.perf_counter()
            await bus.publish_many(items)
            return (time.perf_counter() - t0) / batch

        reps = max(10, n // 50)
        a, b = await _interleave(reps, accept_batch, js_ack)
        assert await bus.flush(timeout_s=30)
        info = await js.stream_info(bus.streams[0].name)
        stored_b = int(info.state.messages) - stored
        cases.append(
            _case(
                "nats-critical-accept-batch100",
                a,
                b,
                lost=reps * batch - stored_b,
                duplicates=max(0, stored_b - reps * batch),
            )
        )

        # 2. end to end: critical publish -> durable consumer.
        arrivals: dict[str, float] = {}
        dup = 0

        async def on_audit(m: BusMessage) -> None:
            nonlocal dup
            if m.event_id in arrivals:
                dup += 1
            arrivals[m.event_id] = time.perf_counter()

        await bus.consume(s.audit, durable="bench", handler=on_audit)
        await _wait(lambda: len(arrivals) >= stored, 30)
        sub = await js.pull_subscribe(
            f"benchref.{site}.audit", durable="benchref", stream=ref_stream
        )
        drained = 0
        while drained < n + 20:
            for m in await sub.fetch(256, timeout=5):
                await m.ack()
                drained += 1

        async def e2e(i: int) -> float:
            eid = f"e2e-{i}"
            t0 = time.perf_counter()
            await bus.publish(s.audit, data, event_id=eid)
            await _wait(lambda: eid in arrivals, 10)
            return arrivals[eid] - t0

        async def e2e_ref(i: int) -> float:
            t0 = time.perf_counter()
            await js.publish(f"benchref.{site}.audit", data, headers={"Nats-Msg-Id": f"x{i}"})
            while True:
                msgs = await sub.fetch(1, timeout=5)
                if msgs:
                    await msgs[0].ack()
                    return time.perf_counter() - t0

        m_e2e = max(30, n // 10)
        a, b = await _interleave(m_e2e, e2e, e2e_ref)
        missing = sum(1 for i in range(m_e2e) if f"e2e-{i}" not in arrivals)
        cases.append(_case("nats-audit-e2e", a, b, lost=missing, duplicates=dup))

        # 3. telemetry publish accept vs raw core publish.
        sample = meter_pb2.MeterSample(charger_id="C1", power_w=7400).SerializeToString()

        async def tele(i: int) -> float:
            t0 = time.perf_counter()
            await bus.publish(s.telemetry(f"C{i % 50}"), sample)
            return time.perf_counter() - t0

        async def raw(i: int) -> float:
            t0 = time.perf_counter()
            await nc.publish(f"benchraw.{site}.t.C{i % 50}", sample)
            return time.perf_counter() - t0

        a, b = await _interleave(n, tele, raw)
        await bus.flush(timeout_s=30)
        cases.append(
            _case(
                "nats-telemetry-accept",
                a,
                b,
                lost=0,
                duplicates=0,
                telemetry_dropped=bus.stats.telemetry_dropped,
            )
        )
        # 4. draining a backlog (outbox pump; pipelined sender) vs raw pipelined publishes.
        for backlog, reps in backlogs:
            for critical in (True, False):
                cases.append(
                    await _drain_case(bus, js, site, ref_stream, backlog, reps, critical, data)
                )
    finally:
        await bus.delete_streams()
        await bus.close()
        await js.delete_stream(ref_stream)
        await nc.close()
    return cases


async def _stored(js: Any, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def _drain_case(
    bus: NatsBus,
    js: Any,
    site: str,
    ref_stream: str,
    backlog: int,
    reps: int,
    critical: bool,
    data: bytes,
) -> dict[str, Any]:
    s = Subjects(site)
    events = bus.streams[0].name
    tag = "outbox" if critical else "events"
    window = 64 if critical else 128

    async def ours(i: int) -> float:
        if critical:
            items = [(s.audit, data, f"{tag}-{backlog}-{i}-{k}") for k in range(backlog)]
        target = bus.stats.sent + backlog
        t0 = time.perf_counter()
        if critical:
            await bus.publish_many(items)
        else:
            for k in range(backlog):
                await bus.publish(s.status(f"C{k % 50}"), data, event_id=f"{tag}-{backlog}-{i}-{k}")
        # Polls finely (0.5 ms) so the figure is the drain, not a coarse poll interval.
        while bus.stats.sent < target or bus.outbox.pending:  # noqa: ASYNC110
            await asyncio.sleep(0.0005)
        return (time.perf_counter() - t0) / backlog

    async def ref(i: int) -> float:
        t0 = time.perf_counter()
        for start in range(0, backlog, window):
            futs = [
                await js.publish_async(
                    f"benchref.{site}.drain",
                    data,
                    stream=ref_stream,
                    headers={"Nats-Msg-Id": f"{tag}-ref-{backlog}-{i}-{k}"},
                )
                for k in range(start, min(backlog, start + window))
            ]
            await asyncio.gather(*futs)
        return (time.perf_counter() - t0) / backlog

    await ours(-1)  # warm-up
    await ref(-1)
    before = await _stored(js, events)
    a, b = await _interleave(reps, ours, ref)
    stored = await _stored(js, events) - before
    want = backlog * reps
    return _case(
        f"nats-{tag}-drain",
        a,
        b,
        messages=want,
        backlog=backlog,
        repetitions=reps,
        lost=max(0, want - stored),
        duplicates=max(0, stored - want),
    )


async def _wait(pred: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while not pred():
        if time.perf_counter() > deadline:
            raise TimeoutError("benchmark delivery timed out")
        await asyncio.sleep(0)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    n = 60 if args.quick else args.messages
    backlogs = [(200, 3)] if args.quick else [(1000, 30), (10000, 30)]
    cases = [await inprocess_deliver(n)]
    for chargers in (100, 10_000):
        cases.append(await inprocess_publish(n, chargers))
    if not args.no_nats:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                cases += await nats_cases(args.url, n, Path(tmp), backlogs)
            except (ConnectionError, OSError, TimeoutError) as exc:
                print(f"bench bus: NATS cases skipped: {exc}", file=sys.stderr)
    return cases


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="evcore bench bus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print a JSON array of cases")
    ap.add_argument("--quick", action="store_true", help="smoke run (few messages)")
    ap.add_argument("--messages", type=int, default=2000, help="messages per case")
    ap.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS server for NATS cases")
    ap.add_argument("--no-nats", action="store_true", help="only the in-process case")
    args = ap.parse_args(argv)
    cases = asyncio.run(run(args))
    bad = [c["name"] for c in cases if c.get("lost") or c.get("duplicates")]
    if args.json:
        print(json.dumps(cases, indent=1))
    else:
        for c in cases:
            print(
                f"{c['name']:30s} n={c['messages']:5d} median {c['median_s'] * 1e6:8.1f} us "
                f"p99 {c['p99_s'] * 1e6:8.1f} us  ref {c['reference_median_s'] * 1e6:8.1f} us"
                f"  ratio {c['ratio']:.2f}  lost {c['lost']} dup {c['duplicates']}"
            )
    if bad:
        print(f"bench bus: delivery check failed in {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
