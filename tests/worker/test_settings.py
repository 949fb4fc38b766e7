"""Where sdq keeps its files when nothing says otherwise: the XDG base directories."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdq.core.settings import Settings, SettingsError


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


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("on", True), ("TRUE", True),
                                                 ("0", False), ("off", False), ("no", False)])
def test_compile_reads_the_usual_switch_spellings(tmp_path: Path, value: str, expected: bool) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path), "SDQ_COMPILE": value}
    assert Settings.load(env).compile is expected


def test_a_compile_value_that_is_no_switch_is_refused_not_read_as_off(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"SDQ_COMPILE: expected one of .* got 'maybe'"):
        Settings.load({"XDG_CONFIG_HOME": str(tmp_path), "SDQ_COMPILE": "maybe"})
    config = tmp_path / "sdq" / "config.toml"
    config.parent.mkdir()
    config.write_text('compile = "fast"\n')
    with pytest.raises(SettingsError, match=rf"{config}: compile: expected one of .* got 'fast'"):
        Settings.load({"XDG_CONFIG_HOME": str(tmp_path)})


def test_lora_and_embedding_folders_come_from_the_environment(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path),
           "SDQ_LORA_DIR": f"{tmp_path / 'a'}{os.pathsep}{os.pathsep}~/loras",
           "SDQ_EMBEDDINGS_DIR": str(tmp_path / "emb")}
    settings = Settings.load(env)
    assert settings.lora_dir == (tmp_path / "a", Path("~/loras").expanduser())
    assert settings.embeddings_dir == tmp_path / "emb"
    assert (Settings.load({"XDG_CONFIG_HOME": str(tmp_path)}).lora_dir,
            Settings.load({"XDG_CONFIG_HOME": str(tmp_path)}).embeddings_dir) == ((), None)
