"""``evcore cloud serve`` with a CA file it cannot use (``[tls] client_ca_file``, ``[fleet]
operator_ca_file``: missing, or no PEM certificate in it) says so naming the key and the file and
exits 2; its configuration errors go to stderr (review: a missing CA file ended in a traceback,
the server being built outside the CLI's error handling; the errors it did say went to stdout).
The command runs as a child process; it fails before it opens the store or the bus."""

from __future__ import annotations

from pathlib import Path

import pytest
from cloud_testkit import make_certs, run_evcore

FLEET = (
    '[bus]\nurls = ["nats://127.0.0.1:4222"]\noutbox_dir = "outbox"\n'
    '[fleet]\noperator_ca_file = "{ca}"\n[[fleet.operators]]\ncommon_name = "ops"\n'
    'roles = ["viewer"]\n'
)


def _config(tmp_path: Path, tls: dict[str, str], extra: str = "") -> Path:
    config = tmp_path / "cloud.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\n[store]\nurl = "sqlite:store"\n[tls]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in tls.items())
        + extra
    )
    return config


async def _serve(config: Path) -> tuple[int, str, str]:
    return await run_evcore("cloud", "serve", "--config", str(config), timeout_s=60)


@pytest.mark.parametrize("what", ["missing", "not-pem"])
async def test_a_sites_ca_it_cannot_use_is_named_with_exit_2(tmp_path: Path, what: str) -> None:
    tls, _, _ = make_certs(tmp_path / "certs")
    ca = tmp_path / "sites-ca.pem"
    if what == "not-pem":
        ca.write_text("not a certificate\n")
    config = _config(tmp_path, {**tls, "client_ca_file": str(ca)})
    code, out, err = await _serve(config)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert "[tls].client_ca_file" in err and str(ca) in err
    said = "No such file or directory" if what == "missing" else "holds no PEM CA certificate"
    assert said in err
    assert out == ""  # said on stderr


@pytest.mark.parametrize("what", ["missing", "not-pem"])
async def test_an_operator_ca_it_cannot_use_is_named_with_exit_2(tmp_path: Path, what: str) -> None:
    tls, _, _ = make_certs(tmp_path / "certs")
    ca = tmp_path / "operators-ca.pem"
    if what == "not-pem":
        ca.write_text("not a certificate\n")
    config = _config(tmp_path, tls, FLEET.format(ca=ca))
    code, out, err = await _serve(config)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert "[fleet].operator_ca_file" in err and str(ca) in err
    said = "No such file or directory" if what == "missing" else "holds no PEM CA certificate"
    assert said in err
    assert out == ""


async def test_a_config_error_goes_to_stderr(tmp_path: Path) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text('listen = "127.0.0.1"\ninsecure = true\n[store]\nurl = "sqlite:store"\n')
    code, out, err = await _serve(config)
    assert code == 2, (out, err)
    assert "listen" in err and str(config) in err
    assert out == ""


async def test_a_sites_outbox_it_cannot_open_is_named_with_exit_2(tmp_path: Path) -> None:
    """``[bus] sites`` whose outbox directory is a file: the site's bus cannot be opened at
    start; said on stderr naming the site and the outbox, exit 2 (it ended in a traceback)."""
    tls, _, _ = make_certs(tmp_path / "certs")
    (tmp_path / "outbox").write_text("a file where the outbox directory goes\n")
    bus = '[bus]\nurls = ["nats://127.0.0.1:4222"]\noutbox_dir = "outbox"\nsites = ["s1"]\n'
    config = _config(tmp_path, tls, bus)
    code, out, err = await _serve(config)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert "s1" in err and "outbox" in err and str(config) in err, err
