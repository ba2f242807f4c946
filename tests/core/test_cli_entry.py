"""The installed ``veil`` command is veil.cli.entry: main() with the interpreter's exit collection spared."""

from __future__ import annotations

import gc
import tomllib
from pathlib import Path

import veil.cli as cli

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_command_runs_entry():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["veil"] == "veil.cli:entry"


def test_entry_runs_main_and_registers_the_exit_freeze(monkeypatch):
    registered, ran = [], []
    monkeypatch.setattr("atexit.register", registered.append)
    monkeypatch.setattr(cli, "main", lambda: ran.append(1) or 7)
    assert cli.entry() == 7 and ran == [1]
    assert registered == [cli._spare_the_exit_collection]
    frozen = gc.get_freeze_count()
    try:
        registered[0]()  # what runs at exit: collect, then freeze what is alive
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
