"""A cloud.toml that cannot be read as TOML text (not UTF-8, a directory) is a
``CloudConfigError`` naming the file, and ``evcore cloud serve`` says so and exits 2 (review A:
tomllib's UnicodeDecodeError ended ``evcore cloud serve`` in a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cloud_testkit import run_evcore
from evcore.cloud import CloudConfig, CloudConfigError


def _files(tmp_path: Path) -> list[tuple[Path, str]]:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'listen = "127.0.0.1:0"\n# caf\xe9\n[store]\nurl = "sqlite:s"\n')
    directory = tmp_path / "cloud.toml"
    directory.mkdir()
    return [(latin1, "not UTF-8"), (directory, "Is a directory")]


def test_an_unreadable_cloud_toml_is_a_cloud_config_error(tmp_path: Path) -> None:
    for path, said in _files(tmp_path):
        with pytest.raises(CloudConfigError) as info:
            CloudConfig.from_file(path)
        assert str(path) in str(info.value) and said in str(info.value), path


async def test_cloud_serve_says_what_is_wrong_with_an_unreadable_config(tmp_path: Path) -> None:
    for path, said in _files(tmp_path):
        code, out, err = await run_evcore("cloud", "serve", "--config", str(path), timeout_s=30)
        # Config errors go to stderr, nothing to stdout.
        assert code == 2 and said in err and "Traceback" not in err, (path, out, err)
        assert out == "", (path, out)
