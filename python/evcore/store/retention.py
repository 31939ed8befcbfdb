"""Telemetry retention as a task the edge runs in its TaskGroup: purge on the edge's clock.

It only deletes telemetry older than ``[store] telemetry_retention_s`` (and processed event ids
older than ``processed_ids_keep_s``); it never touches sessions, transactions, setpoints or the
audit chain.
"""

from __future__ import annotations

import logging

from evcore.clock import Clock
from evcore.store.base import Store, StoreError

log = logging.getLogger("evcore.store")


async def run_retention(
    store: Store,
    clock: Clock,
    *,
    every_s: float = 3600.0,
    processed_ids_keep_s: float = 7 * 24 * 3600.0,
) -> None:
    """Purge now and then every ``every_s`` until cancelled; a failed purge is logged and retried
    at the next round (retention must never stop the edge)."""
    if not every_s > 0:
        raise ValueError(f"run_retention: every_s must be > 0, got {every_s!r}")
    while True:
        now = clock.now()
        try:
            removed = await store.purge_expired(now)
            removed_ids = await store.purge_processed(now - processed_ids_keep_s)
        except (StoreError, OSError) as exc:
            log.warning("store: retention purge failed (%s); retrying in %.0f s", exc, every_s)
        else:
            if removed or removed_ids:
                log.info(
                    "store: retention removed %d telemetry rows, %d processed ids",
                    removed,
                    removed_ids,
                )
        await clock.sleep(every_s)
