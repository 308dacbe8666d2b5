"""build.py's own checks: it runs before any environment exists, so it is tested from here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_build():
    spec = importlib.util.spec_from_file_location("zeroavatar_build_script", ROOT / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_disk_is_named_before_pip_fails_halfway(tmp_path: Path) -> None:
    build = load_build()
    not_yet = tmp_path / "venv" / "not" / "made"
    assert build.disk_space_problem([not_yet, tmp_path], 1) is None
    message = build.disk_space_problem([not_yet, tmp_path], 10 ** 18)
    assert message is not None
    assert str(not_yet) in message and str(tmp_path) in message
    assert "GB free" in message and "build.py setup" in message


def test_the_engine_gets_an_absolute_anny_cache_path(monkeypatch, tmp_path: Path) -> None:
    """The engine runs in each job's folder: a relative cache path would build a new cache there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZEROAVATAR_ANNY_CACHE", "relative/anny")
    assert load_build().dev_env()["ZEROAVATAR_ANNY_CACHE"] == str(tmp_path.resolve() / "relative" / "anny")
    monkeypatch.delenv("ZEROAVATAR_ANNY_CACHE")
    assert load_build().dev_env()["ZEROAVATAR_ANNY_CACHE"] == str(ROOT / ".cache" / "anny")
