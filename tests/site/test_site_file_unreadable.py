"""A site file that cannot be read as TOML text (not UTF-8, a directory) is a
``SiteConfigError`` naming the file and what is wrong, and ``evcore site check`` says so and exits 1
(review A: tomllib's UnicodeDecodeError and open's IsADirectoryError ended in tracebacks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from evcore.cli import main as evcore_main
from evcore.site import SiteConfigError, load_site


def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[site]\nid = "caf\xe9"\n')
    return path


def _a_directory(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("make", "said"),
    [(_not_utf8, "not UTF-8"), (_a_directory, "Is a directory")],
    ids=["not-utf8", "directory"],
)
def test_an_unreadable_site_file_is_a_site_config_error(
    tmp_path: Path, make: Callable[[Path], Path], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path)
    with pytest.raises(SiteConfigError) as info:
        load_site(path)
    assert str(path) in str(info.value) and said in str(info.value)
    assert info.value.field == "file"
    assert evcore_main(["site", "check", str(path)]) == 2  # as evcore edge
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
