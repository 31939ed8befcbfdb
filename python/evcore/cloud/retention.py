"""The cloud's retention: telemetry batches older than ``[retention] telemetry_days`` and each
site's plans below its newest ``plans_keep``, deleted now and then by the serve process.

It never deletes audit records (the chain is the record, and the cloud's copy is the outside
witness of every edge's chain), topologies or fleet curtailments. Deletes go in batches of
``batch_rows``, each its own short transaction on the store's worker thread, so an upload waits
for at most one batch, never for a whole purge.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from evcore.clock import Clock
from evcore.cloud.config import CloudRetention
from evcore.cloud.store import CloudStore
from evcore.store.base import StoreError

log = logging.getLogger("evcore.cloud")

DAY_S = 86400.0


@dataclass(frozen=True)
class PurgeResult:
    telemetry_batches: int  # telemetry rows deleted
    plans: int  # plan rows deleted
    transactions: int  # delete transactions it took


async def purge_once(store: CloudStore, retention: CloudRetention, *, now_s: float) -> PurgeResult:
    """One purge on ``now_s``: site by site, ``batch_rows`` at a time until nothing is left."""
    rows = retention.batch_rows
    telemetry = plans = transactions = 0
    if retention.telemetry_days > 0:
        before_s = now_s - retention.telemetry_days * DAY_S
        for site in await store.telemetry_sites():
            while True:
                n = await store.purge_telemetry_batch(site, before_s=before_s, rows=rows)
                telemetry += n
                transactions += 1
                await asyncio.sleep(0)  # let uploads waiting on the loop queue behind this batch
                if n < rows:
                    break
    if retention.plans_keep > 0:
        for site in await store.plan_sites():
            while True:
                n = await store.purge_plans_batch(site, keep=retention.plans_keep, rows=rows)
                plans += n
                transactions += 1
                await asyncio.sleep(0)
                if n < rows:
                    break
    return PurgeResult(telemetry, plans, transactions)


async def run_retention(store: CloudStore, clock: Clock, retention: CloudRetention) -> None:
    """Purge now and then every ``retention.every_s`` until cancelled (the server owns it); a
    failed purge is logged and retried at the next round, whatever failed it: only an outage
    was caught, so any other error (a statement the database refuses: a trigger, a permission
    the cloud's role lacks, a damaged file) ended the task for good, silently, and the server's
    stop re-raised it."""
    while True:
        try:
            done = await purge_once(store, retention, now_s=clock.now())
        except (StoreError, OSError) as exc:
            log.warning(
                "cloud: retention purge failed (%s); retrying in %.0f s", exc, retention.every_s
            )
        except Exception as exc:
            log.error(
                "cloud: retention purge failed (%r); retrying in %.0f s",
                exc,
                retention.every_s,
                exc_info=exc,
            )
        else:
            if done.telemetry_batches or done.plans:
                log.info(
                    "cloud: retention removed %d telemetry batches, %d plans (%d transactions)",
                    done.telemetry_batches,
                    done.plans,
                    done.transactions,
                )
        await clock.sleep(retention.every_s)
