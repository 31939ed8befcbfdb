"""Delete the evcore streams that earlier test runs left on the shared test nats-server.

JetStream reserves each stream's max_bytes out of the server's storage (a site's TELEMETRY stream
reserves 1 GiB by default): some sixty streams left by interrupted or leaking test runs fill a
60 GB server, and every test that then makes a site's streams finds them refused (the bus never
reports connected). Only streams named ``EVCORE_*`` created more than ``--older-min`` minutes ago
are deleted (every test makes its own streams under a fresh site id and lasts seconds), so a test
run going on beside this keeps its streams. Never fails the CI: a server that cannot be reached is
reported and skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys


async def clean(url: str, older_min: float) -> int:
    import nats

    try:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    except Exception as exc:  # the tests will say it better
        print(
            f"clean_nats_streams: {url} not reachable ({exc!r}); nothing cleaned", file=sys.stderr
        )
        return 0
    js = nc.jetstream()
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=older_min)
    deleted = 0
    reserved = 0
    try:
        for info in await js.streams_info():
            name = info.config.name or ""
            if not name.startswith("EVCORE_"):
                continue
            if info.created is None or _utc(info.created) > cutoff:
                continue
            await js.delete_stream(name)
            deleted += 1
            reserved += max(0, info.config.max_bytes or 0)
    finally:
        await nc.close()
    print(
        f"clean_nats_streams: deleted {deleted} evcore stream(s) older than {older_min:g} min "
        f"({reserved / 2**30:.1f} GiB of reserved storage freed)"
    )
    return deleted


def _utc(t: object) -> dt.datetime:
    if isinstance(t, dt.datetime):
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return dt.datetime.fromisoformat(str(t).replace("Z", "+00:00"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="nats://127.0.0.1:4222")
    ap.add_argument("--older-min", type=float, default=10.0)
    args = ap.parse_args()
    asyncio.run(clean(args.url, args.older_min))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
