"""``[bus] sites = [...]``: a site that reaches the cloud without being listed is named in the
cloud's log, once, with the key to change (before: nothing; the cloud made none of its streams,
read none of its audit over the bus, and said nothing). The real ``evcore cloud serve`` runs as a
process on the shared nats-server (127.0.0.1:4222), on a real SQLite cloud store."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import nats
import pytest
from cloud_testkit import chain, cloud_serve
from evcore.cloud import open_cloud_store

pytestmark = pytest.mark.timeout(90)
NATS_URL = "nats://127.0.0.1:4222"


async def _stream_exists(name: str) -> bool:
    nc = await nats.connect(NATS_URL, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await nc.jetstream().stream_info(name)
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await nc.close()
    return True


async def test_a_site_not_in_bus_sites_is_named_with_the_key_once(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    listed, unlisted = f"listed-{tag}", f"other-{tag}"
    config = tmp_path / "cloud.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\ninsecure = true\n[store]\nurl = "sqlite:store"\n'
        f'[bus]\nurl = "{NATS_URL}"\nsites = ["{listed}"]\ndiscover_s = 0.2\n'
        'outbox_dir = "outbox"\n'
    )
    async with cloud_serve(config) as proc:
        store = open_cloud_store(f"sqlite:{tmp_path / 'store'}")
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert "CloudApi on port" in line, line
            # Both sites reach the cloud (their first record stored, as an upload stores it).
            records = chain(1)
            await store.put_audit(listed, records, now_s=1.0)
            await store.put_audit(unlisted, records, now_s=1.0)
            await asyncio.sleep(2.0)  # ten rounds of discover_s
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err_bytes = await asyncio.wait_for(proc.communicate(), 30)
            await store.close()
    err = err_bytes.decode()
    said = [ln for ln in err.splitlines() if "is not in [bus] sites" in ln]
    assert len(said) == 1, err[-3000:]
    assert f"site '{unlisted}'" in said[0] and str(config) in said[0], said[0]
    assert "ERROR" in said[0] and 'sites = "*"' in said[0], said[0]
    assert f"'{listed}'" not in said[0]
    assert proc.returncode == 0, err[-3000:]
    # What the message says: the listed site's streams were made, the unlisted site's were not
    # (the run's streams are deleted when it ends: tests/conftest.py).
    assert await _stream_exists(f"EVCORE_{listed}_EVENTS")
    assert not await _stream_exists(f"EVCORE_{unlisted}_EVENTS")
