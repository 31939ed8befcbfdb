"""One validator for ``[api]``, ``[cloud]``, ``[metrics]`` and cloud.toml's sections
(``evcore.site.sections``): the same mistake gets the same wording, naming ``[section].key``,
wherever it is made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from evcore.api import ApiConfig
from evcore.cloud import CloudConfig
from evcore.edge.cloudlink import CloudLinkConfig
from evcore.metrics import MetricsConfig

CLOUD_OK = {"store": {"url": "sqlite:x"}, "insecure": True}


def _error(parse: Any, *args: Any) -> str:
    with pytest.raises(ValueError) as info:
        parse(*args)
    return str(info.value)


def _each_section(tmp_path: Path) -> dict[str, Any]:
    """Per section, a parser taking the keys to put into an otherwise valid section."""
    (tmp_path / "ca.pem").write_text("x")
    link = {"url": "cloud:7443", "insecure": True}
    return {
        "[api]": lambda extra: ApiConfig.from_section(extra, tmp_path),
        "[cloud]": lambda extra: CloudLinkConfig.from_section({**link, **extra}, tmp_path),
        "[metrics]": lambda extra: MetricsConfig.from_section({"listen": "h:1", **extra}),
        "[retention]": lambda extra: CloudConfig.from_table({**CLOUD_OK, "retention": extra}),
    }


def test_an_unknown_key_is_named_the_same_way_in_every_section(tmp_path: Path) -> None:
    for name, parse in _each_section(tmp_path).items():
        said = _error(parse, {"colour": 1})
        assert said.startswith(f"{name}.colour: unknown key; known keys: "), said
    said = _error(lambda: CloudConfig.from_table({**CLOUD_OK, "lisen": "x:1", "colour": 1}))
    assert said.startswith("colour: unknown key (also lisen); known keys: "), said


def test_a_wrong_value_is_named_the_same_way_in_every_section(tmp_path: Path) -> None:
    cases = {
        "[api]": ({"reflection": "yes"}, "[api].reflection must be true or false, got 'yes'"),
        "[cloud]": ({"plans": 1}, "[cloud].plans must be true or false, got 1"),
        "[retention]": (
            {"every_s": float("inf")},
            "[retention].every_s must be a number > 0, got inf",
        ),
    }
    sections = _each_section(tmp_path)
    for name, (extra, words) in cases.items():
        assert _error(sections[name], extra) == words
    assert _error(lambda: sections["[cloud]"]({"batch": 2.5})) == (
        "[cloud].batch must be an integer in [1, 100000], got 2.5"
    )
    said = _error(lambda: CloudConfig.from_table({**CLOUD_OK, "stop_grace_s": -1}))
    assert said == "stop_grace_s must be a number >= 0, got -1"


@pytest.mark.parametrize(
    ("where", "value", "words"),
    [
        ("[api]", "localhost:http", "[api].listen: port must be a number from 0 to 65535"),
        ("[api]", "::1:50051", "[api].listen: an IPv6 host goes in brackets"),
        ("cloud.toml", "0.0.0.0:700000", "listen: port must be a number from 0 to 65535"),
        ("[cloud]", "cloud:0", "[cloud].url: port must be a number from 1 to 65535"),
        ("[metrics]", "9464", "[metrics].listen: expected 'host:port'"),
    ],
)
def test_every_host_port_is_checked_by_one_parser(
    tmp_path: Path, where: str, value: str, words: str
) -> None:
    """Before, [api] listen and cloud.toml's listen were only checked for a ':' (a bad port
    surfaced at bind), and [cloud] url had a checker of its own."""
    parse = {
        "[api]": lambda: ApiConfig.from_section({"listen": value}, tmp_path),
        "cloud.toml": lambda: CloudConfig.from_table({**CLOUD_OK, "listen": value}),
        "[cloud]": lambda: CloudLinkConfig.from_section({"url": value, "insecure": True}, tmp_path),
        "[metrics]": lambda: MetricsConfig.from_section({"listen": value}),
    }[where]
    assert words in _error(parse)


def test_listen_addresses_that_were_good_still_are(tmp_path: Path) -> None:
    assert ApiConfig.from_section({"listen": "[::1]:0"}, tmp_path).listen == "[::1]:0"
    cfg = CloudConfig.from_table({**CLOUD_OK, "listen": "0.0.0.0:50061"})
    assert cfg.listen == "0.0.0.0:50061" and cfg.stop_grace_s == 5.0 and cfg.reflection


def test_paths_are_taken_from_the_file_directory_and_checked_where_they_must_exist(
    tmp_path: Path,
) -> None:
    (tmp_path / "ca.pem").write_text("x")
    tls = {"cert_file": "ca.pem", "key_file": "/abs/key.pem"}
    api = ApiConfig.from_section({"tls": tls}, tmp_path)
    assert api.tls is not None
    assert (api.tls.cert_file, api.tls.key_file) == (tmp_path / "ca.pem", Path("/abs/key.pem"))
    said = _error(lambda: ApiConfig.from_section({"tls": {"cert_file": "c"}}, tmp_path))
    assert said == "[api.tls].key_file: missing"
    files = {"ca_file": "ca.pem", "cert_file": "ca.pem", "key_file": "nope.pem"}
    said = _error(lambda: CloudLinkConfig.from_section({"url": "c:1", **files}, tmp_path))
    assert said == f"[cloud].key_file: no such file {str(tmp_path / 'nope.pem')!r}"
    # A disabled [cloud] section is not checked past its key names: its files may not exist yet.
    off = {"url": "c:1", "enabled": False, **files}
    assert CloudLinkConfig.from_section(off, tmp_path) is None
    assert "[cloud].colour: unknown key" in _error(
        lambda: CloudLinkConfig.from_section({**off, "colour": 1}, tmp_path)
    )
