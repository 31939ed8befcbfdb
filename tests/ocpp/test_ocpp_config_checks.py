"""``[ocpp]`` keys are checked for kind and range (not kind alone), every error naming
``[ocpp].key`` and the value; TLS files are relative to the site file's folder, like every
other file a site file names, and a missing one is named with its key and path."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from evcore.clock import WallClock
from evcore.ocpp import CentralSystem, OcppConfigError, parse_ocpp_section
from evcore.ocpp.config import DEFAULT_MEASURANDS
from evcore.site import load_site
from ocpp_certs import CertAuthority
from ocpp_testsite import PASSWORDS
from test_ocpp.client import check_connection

pytestmark = pytest.mark.timeout(60)

#: Each was accepted, kind-checked only. call_timeout_s = nan made every CALL count as timed
#: out at once (every station answer dropped); bools passed as integers (port = true was 1).
REFUSED: list[tuple[str, Any]] = [
    ("call_timeout_s", math.nan),
    ("call_timeout_s", math.inf),
    ("call_timeout_s", 0),
    ("call_timeout_s", True),
    ("max_clock_skew_s", -1),
    ("max_clock_skew_s", math.nan),
    ("max_clock_skew_s", math.inf),
    ("heartbeat_interval_s", -5),
    ("heartbeat_interval_s", 0),
    ("heartbeat_interval_s", True),
    ("sample_interval_s", True),
    ("stack_level", -3),
    ("stack_level", True),
    ("measurands", [1, 2]),
    ("measurands", []),
    ("measurands", "Current.Import"),
    ("measurands", [""]),
    ("measurands", ["Current.Import,SoC"]),
    ("measurands", ["Current.Import "]),
    ("data_transfer_vendor_ids", [1]),
    ("data_transfer_vendor_ids", "com.evcore"),
    ("data_transfer_vendor_ids", ["x" * 256]),
    ("host", ""),
    ("host", 1),
    ("port", True),
    ("port", -1),
    ("port", 65536),
    ("security_profile", True),
    ("security_profile", 1.0),
    ("security_profile", 4),
    ("queue_bound", True),
    ("queue_bound", 1.5),
    ("store_batch_window_s", math.nan),
    ("whole_amperes", "no"),
    ("configure_on_boot", 1),
    ("gc_tuning", "true"),
    ("path_prefix", "ocpp"),
    ("tls_cert", ""),
    ("credentials_file", 5),
]


@pytest.mark.parametrize(("key", "value"), REFUSED, ids=lambda v: repr(v)[:20])
def test_each_key_is_range_checked_and_the_error_names_it(key: str, value: Any) -> None:
    with pytest.raises(OcppConfigError) as exc:
        parse_ocpp_section({key: value})
    message = str(exc.value)
    assert message.startswith(f"[ocpp].{key}"), message
    assert repr(value)[:40] in message, message


def test_a_station_profile_of_true_is_not_profile_1() -> None:
    for bad in (True, 1.0, 4):
        with pytest.raises(OcppConfigError, match=r"\[ocpp\]\.credentials\.CP1\.security_profile"):
            parse_ocpp_section(
                {"credentials": {"CP1": {"password": "x" * 16, "security_profile": bad}}}
            )


def test_defaults_and_edges_of_the_ranges_are_kept() -> None:
    cfg = parse_ocpp_section(None)
    assert (cfg.host, cfg.port, cfg.path_prefix, cfg.security_profile) == (
        "127.0.0.1",
        9000,
        "/ocpp",
        1,
    )
    assert cfg.measurands == DEFAULT_MEASURANDS and cfg.data_transfer_vendor_ids == ()
    assert (cfg.sample_interval_s, cfg.heartbeat_interval_s, cfg.queue_bound) == (10, 300, 32)
    assert (cfg.call_timeout_s, cfg.max_clock_skew_s, cfg.stack_level) == (30.0, 300.0, 1)
    assert (cfg.whole_amperes, cfg.configure_on_boot, cfg.gc_tuning) == (True, True, False)
    assert cfg.store_batch_window_s == 0.005 and cfg.max_frame_bytes == 16 * 2**20
    edge = parse_ocpp_section(
        {
            "port": 0,
            "path_prefix": "/",
            "security_profile": 0,
            "heartbeat_interval_s": 1,
            "stack_level": 0,
            "max_clock_skew_s": 0,
            "call_timeout_s": 2,
            "measurands": ["SoC"],
            "data_transfer_vendor_ids": [],
            "queue_bound": 1,
        }
    )
    assert (edge.port, edge.path_prefix, edge.heartbeat_interval_s, edge.stack_level) == (
        0,
        "",
        1,
        0,
    )
    assert edge.call_timeout_s == 2.0 and isinstance(edge.call_timeout_s, float)
    assert edge.max_clock_skew_s == 0.0 and edge.measurands == ("SoC",)
    vendors = parse_ocpp_section({"data_transfer_vendor_ids": ["com.evcore", "Acme, Inc."]})
    assert vendors.data_transfer_vendor_ids == ("com.evcore", "Acme, Inc.")


def test_tls_paths_are_relative_to_the_site_files_folder(tmp_path: Path) -> None:
    cfg = parse_ocpp_section(
        {
            "security_profile": 3,
            "tls_cert": "a.crt",
            "tls_key": "/abs/a.key",
            "tls_client_ca": "ca",
        },
        base_dir=tmp_path,
    )
    assert cfg.tls_cert == str(tmp_path / "a.crt")
    assert cfg.tls_key == "/abs/a.key"
    assert cfg.tls_client_ca == str(tmp_path / "ca")


def _site_file(folder: Path, ocpp: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.toml"
    path.write_text(
        '[site]\nid = "tls-site"\n\n'
        '[[nodes]]\nid = "grid"\nkind = "grid"\nphase_limit_a = 63.0\n\n'
        '[[chargers]]\nid = "cp-a"\nocpp_id = "CPA"\nparent = "grid"\nwiring = "three_phase"\n'
        'phases = ["L1", "L2", "L3"]\nvoltage_v = 230.0\nmax_a = 32.0\n\n'
        f'[ocpp]\nport = 0\ncredentials = {{ CPA = "{PASSWORDS["CPA"]}" }}\n{ocpp}'
    )
    return path


async def test_a_site_with_relative_tls_files_serves_tls_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_dir = tmp_path / "etc"
    (site_dir / "tls").mkdir(parents=True)
    pki = CertAuthority(site_dir / "tls")
    cert, key = pki.issue("csms.local", server=True)
    rel_cert, rel_key = (Path(p).relative_to(site_dir).as_posix() for p in (cert, key))
    path = _site_file(
        site_dir, f'security_profile = 2\ntls_cert = "{rel_cert}"\ntls_key = "{rel_key}"\n'
    )
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a service's working directory is rarely the site's folder
    cs = CentralSystem(load_site(path), clock=WallClock())
    await cs.start()
    try:
        res = await check_connection(
            f"wss://127.0.0.1:{cs.port}/ocpp",
            "CPA",
            ocpp="1.6",
            password=PASSWORDS["CPA"],
            ca=str(pki.ca_path),
            timeout=5,
        )
        assert res.boot_notification["status"] == "Accepted"
    finally:
        await cs.stop()


def test_a_missing_tls_file_is_named_with_its_key_and_path_at_load(tmp_path: Path) -> None:
    pki = CertAuthority(tmp_path)
    cert, key = pki.issue("csms.local", server=True)
    site_dir = tmp_path / "site"
    path = _site_file(site_dir, f'security_profile = 2\ntls_cert = "csms.crt"\ntls_key = "{key}"\n')
    missing = str(site_dir / "csms.crt")
    with pytest.raises(
        OcppConfigError, match=re.escape(f"[ocpp].tls_cert: no such file {missing!r}")
    ):
        CentralSystem(load_site(path), clock=WallClock())
    path = _site_file(site_dir, f'security_profile = 2\ntls_cert = "{cert}"\ntls_key = "k.pem"\n')
    with pytest.raises(OcppConfigError, match=re.escape("[ocpp].tls_key: no such file")):
        CentralSystem(load_site(path), clock=WallClock())


async def test_a_tls_file_that_does_not_load_is_named(tmp_path: Path) -> None:
    pki = CertAuthority(tmp_path)
    _, key = pki.issue("csms.local", server=True)
    # The key given as the certificate: OpenSSL's bare "[SSL] PEM lib" before.
    path = _site_file(
        tmp_path / "site", f'security_profile = 2\ntls_cert = "{key}"\ntls_key = "{key}"\n'
    )
    cs = CentralSystem(load_site(path), clock=WallClock())
    with pytest.raises(
        OcppConfigError, match=r"\[ocpp\]\.tls_cert, \[ocpp\]\.tls_key: cannot load"
    ):
        await cs.start()
    await cs.stop()
