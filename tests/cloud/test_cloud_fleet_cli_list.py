"""``evcore cloud curtail --list --json`` prints one JSON document, a list of the held fleet
curtailments, ``[]`` when there are none (review A: one document per curtailment back to back,
which no JSON reader takes, and nothing at all for none). Real mTLS cloud on SQLite, real NATS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cloud_testkit import T0, run_evcore
from evcore.v1.fleet_api_pb2 import FleetCurtailment
from fleet_testkit import put_ten_charger_topologies, start_fleet_cloud

pytestmark = pytest.mark.timeout(120)


async def test_curtail_list_json_is_one_list(tmp_path: Path) -> None:
    f = await start_fleet_cloud(tmp_path, f"sqlite:{tmp_path / 'cloud-store'}", n_sites=2)
    try:
        await put_ten_charger_topologies(f)
        tls = ["--target", f"127.0.0.1:{f.port}", "--ca", str(tmp_path / "sites_CA.pem")]
        tls += ["--cert", str(tmp_path / "aggregator-1.crt")]
        tls += ["--key", str(tmp_path / "aggregator-1.key")]
        code, out, err = await run_evcore("cloud", "curtail", *tls, "--list", "--json")
        assert code == 0, err
        assert json.loads(out) == []
        async with f.channel("aggregator-1") as ch:
            for fid, max_kw in [("dso-1", 400.0), ("dso-2", 300.0)]:
                r = FleetCurtailment(
                    fleet_curtailment_id=fid, site_ids=f.sites, max_kw=max_kw, issuer="DSO"
                )
                r.start.FromSeconds(int(T0 + 600))
                r.end.FromSeconds(int(T0 + 7800))
                await f.fleet(ch).Curtail(r)
        code, out, err = await run_evcore("cloud", "curtail", *tls, "--list", "--json")
        assert code == 0, err
        listed = json.loads(out)
        assert isinstance(listed, list)
        assert sorted(c["curtailment"]["fleet_curtailment_id"] for c in listed) == [
            "dso-1",
            "dso-2",
        ]
        for c in listed:
            assert c["feasible"] is True and len(c["shares"]) == 2
        # The plain listing is unchanged: one block per curtailment.
        code, out, err = await run_evcore("cloud", "curtail", *tls, "--list")
        assert code == 0 and "dso-1 revision 1: ok" in out and "dso-2 revision 1: ok" in out, out
    finally:
        await f.close()
