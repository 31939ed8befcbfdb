"""An operator's ``--ca`` with more than one CA (a rotation of the cloud's server CA: the new and
the old both trusted): a PEM bundle of them, or ``--ca`` repeated, trusts every one. Before,
a repeated ``--ca`` kept only the last, without a word: with the server's CA given first the
command could not connect. Real mTLS cloud with its FleetApi (SQLite, real NATS); the real
command as a process (``cloud_testkit.run_evcore``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cloud_testkit import _load_cert_helpers, run_evcore
from fleet_testkit import start_fleet_cloud

pytestmark = pytest.mark.timeout(120)


def _cas(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The CA of the cloud's server certificate (start_fleet_cloud's sites' CA), another CA,
    and a bundle of both (the other first)."""
    server_ca = tmp_path / "sites_CA.pem"
    (tmp_path / "other").mkdir()
    other = Path(_load_cert_helpers().CertAuthority(tmp_path / "other", "another CA").ca_path)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.read_bytes() + server_ca.read_bytes())
    return server_ca, other, bundle


async def test_every_ca_of_a_bundle_or_of_repeated_options_is_trusted(tmp_path: Path) -> None:
    f = await start_fleet_cloud(tmp_path, f"sqlite:{tmp_path / 'cloud-store'}", n_sites=1)
    try:
        server_ca, other, bundle = _cas(tmp_path)
        ident = ["--cert", str(tmp_path / "viewer-1.crt"), "--key", str(tmp_path / "viewer-1.key")]
        target = ["--target", f"127.0.0.1:{f.port}", "--timeout", "5"]

        async def sites(*ca: str) -> tuple[int, str]:
            code, _, err = await run_evcore("cloud", "sites", *target, *ca, *ident, "--json")
            return code, err

        # The server's CA alone, and the other CA alone (no trust: refused at the handshake).
        assert (await sites("--ca", str(server_ca)))[0] == 0
        code, err = await sites("--ca", str(other))
        assert code == 2 and "UNAVAILABLE" in err, err
        # Both: one bundle file, or the option once per CA, in either order.
        assert await sites("--ca", str(bundle)) == (0, "")
        for first, second in ((other, server_ca), (server_ca, other)):
            code, err = await sites("--ca", str(first), "--ca", str(second))
            assert code == 0, f"--ca {first} --ca {second}: {err}"
        # A file that is not there is named, as before.
        code, err = await sites("--ca", str(server_ca), "--ca", str(tmp_path / "gone.pem"))
        assert code == 2 and "--ca" in err and "gone.pem" in err, err
    finally:
        await f.close()
