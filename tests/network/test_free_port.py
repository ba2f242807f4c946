"""free_port: a port handed out once is not handed out again, by this process or another of this user's
(two pytest-xdist processes picked one port within a worker's start-up, and both workers bound it: CI)."""

from __future__ import annotations

import subprocess
import sys

from veil.workers import websocket_launcher as launcher


def test_ports_handed_out_by_two_processes_never_coincide(monkeypatch, tmp_path):
    # a narrow range makes a collision certain without the shared reservation (400 draws from 1,200 ports)
    monkeypatch.setattr(launcher, "_LISTEN_LOW", 30000)
    monkeypatch.setattr(launcher, "_ephemeral_low", lambda: 31200)
    monkeypatch.setattr(launcher, "_GIVEN", set())
    monkeypatch.setattr(launcher.tempfile, "gettempdir", lambda: str(tmp_path))
    mine = {launcher.free_port() for _ in range(200)}
    assert len(mine) == 200 and all(30000 <= p < 31200 for p in mine)
    theirs = _ports_in_another_process_narrow(200, tmp_path)
    assert len(theirs) == 200
    assert not mine & theirs


def _ports_in_another_process_narrow(n: int, tmp) -> set[int]:
    code = ("import tempfile\n"
            f"tempfile.tempdir = {str(tmp)!r}\n"
            "from veil.workers import websocket_launcher as l\n"
            "l._LISTEN_LOW = 30000\n"
            "l._ephemeral_low = lambda: 31200\n"
            f"print(' '.join(str(l.free_port()) for _ in range({n})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {int(p) for p in out.split()}


def test_a_reservation_file_of_another_kind_is_not_trusted(monkeypatch, tmp_path):
    # a link where the file should be (another user's trap): the port is still handed out, nothing written
    target = tmp_path / "elsewhere"
    target.write_text("")
    monkeypatch.setattr(launcher.tempfile, "gettempdir", lambda: str(tmp_path))
    (tmp_path / f"veil-ports-{launcher.os.getuid()}").symlink_to(target)
    assert launcher._reserve(31234)
    assert target.read_text() == ""


def test_a_reservation_expires(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher.tempfile, "gettempdir", lambda: str(tmp_path))
    assert launcher._reserve(31235)
    assert not launcher._reserve(31235)  # another process asking within the window
    now = launcher.time.time()
    monkeypatch.setattr(launcher.time, "time", lambda: now + launcher._RESERVED_FOR_S + 1)
    assert launcher._reserve(31235)
