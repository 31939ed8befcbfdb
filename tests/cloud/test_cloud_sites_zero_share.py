"""``evcore cloud sites`` tells a site's 0 kW share from a cancel, over the real mTLS socket
(SQLite and PostgreSQL). Before: ``SiteFleetShare.site_max_kw`` was 0 both for a signal holding
the site at 0 kW and for one cancelling its curtailment, and the command printed "cancel" for
both: a site held at nothing looked free to draw. ``site_cancel`` (field 17) now says which.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cloud_testkit import T0, run_evcore
from evcore.cloud.fleet_cli import _print_sites
from evcore.v1.fleet_api_pb2 import (
    FleetCurtailment,
    ListSitesRequest,
    ListSitesResponse,
    SiteFleetShare,
    SiteStatus,
)
from fleet_testkit import FleetCloud, site_table, topology
from test_cloud_fleet_sites import fleet  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(120)


async def test_a_zero_kw_share_is_shown_as_0_kw_not_as_a_cancel(
    fleet: FleetCloud,  # noqa: F811
    tmp_path: Path,
) -> None:
    f = fleet
    a, b, _ = f.sites
    for site in (a, b):  # no other load: a floor of 0 kW
        async with f.channel(site) as ch:
            await f.cloud(ch).PutTopology(
                topology(site_table(site, power_limit_kw=300.0, other_load_a=0.0))
            )
    req = FleetCurtailment(fleet_curtailment_id="blackstart", site_ids=[a, b], max_kw=0.0)
    req.start.FromSeconds(int(T0))
    req.end.FromSeconds(int(T0 + 3600))
    async with f.channel("aggregator-1") as ch:
        res = await f.fleet(ch).Curtail(req)
    assert {sh.site_id: sh.max_kw for sh in res.shares} == {a: 0.0, b: 0.0}
    async with f.channel("viewer-1") as ch:
        listed = await f.fleet(ch).ListSites(ListSitesRequest(site_ids=[a]))
    [fs] = listed.sites[0].fleet_shares
    assert (fs.site_revision, fs.site_max_kw, fs.site_cancel) == (1, 0.0, False)
    code, out, err = await run_evcore(
        "cloud",
        "sites",
        "--site",
        a,
        "--target",
        f"127.0.0.1:{f.port}",
        "--ca",
        str(tmp_path / "sites_CA.pem"),
        "--cert",
        str(tmp_path / "viewer-1.crt"),
        "--key",
        str(tmp_path / "viewer-1.key"),
    )
    assert code == 0, err
    assert "site has r1 (0.000 kW)" in out, out
    assert "cancel" not in out, out


def test_a_cancel_signal_is_shown_as_a_cancel(capsys: pytest.CaptureFixture[str]) -> None:
    """(The display alone: a fleet curtailment's newest signal to a site is a cancel while it is
    active only in passing, e.g. a site dropped by a re-split.)"""
    fs = SiteFleetShare(fleet_curtailment_id="f1", revision=2, site_revision=2, site_cancel=True)
    _print_sites(
        ListSitesResponse(sites=[SiteStatus(site_id="s1", fleet_shares=[fs])]), as_json=False
    )
    assert "site has r2 (cancel)" in capsys.readouterr().out
