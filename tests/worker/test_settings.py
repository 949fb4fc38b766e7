"""Where sdq keeps its files when nothing says otherwise: the XDG base directories."""
from __future__ import annotations

from pathlib import Path

from sdq.worker.settings import Settings


def test_the_default_home_follows_xdg_data_home(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    settings = Settings.load(env)
    assert settings.home == tmp_path / "data" / "sdq"
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'sdq' / 'sdq.db'}"
    assert settings.storage_url == str(tmp_path / "data" / "sdq" / "images")


def test_sdq_home_wins_over_xdg_data_home(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "SDQ_HOME": str(tmp_path / "home")}
    assert Settings.load(env).home == tmp_path / "home"
