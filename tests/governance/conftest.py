"""Fixtures for governance tests: real ``veil worker`` processes with dataset policies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import veil as sy
from veil.workers.websocket_launcher import start_worker

TOKEN = "gov-scientist-token"
OTHER = "gov-other-token"
ADMIN = "gov-admin-token"
PEER = "gov-peer-token"
BOSTON = str(__import__("pathlib").Path(sy.__file__).parent / "datasets" / "data" / "boston_housing.csv")


def worker_args(policy: str, extra: list[str] = ()) -> list[str]:
    return ["--token", TOKEN, "--user", f"other={OTHER}", "--admin-token", ADMIN,
            "--dataset", f"boston={BOSTON}:target=MEDV", "--policy", policy, *extra]


def console_url(wp) -> str:
    for line in wp.output:
        if "owner console on " in line:
            return line.split("owner console on ", 1)[1].split()[0]
    raise AssertionError("no console line in:\n" + "\n".join(wp.output))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "veil.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "VEIL_ADMIN_TOKEN": ""})


@pytest.fixture
def spawn():
    procs = []

    def start(worker_id: str, args: list[str], port: int = 0):
        wp = start_worker(worker_id, args, port=port)
        procs.append(wp)
        return wp

    yield start
    for wp in procs:
        wp.kill()


@pytest.fixture
def connect(hook):
    made = []

    def make(wp, token: str = TOKEN, **kwargs):
        c = sy.WebsocketClientWorker(hook, id=kwargs.pop("id", wp.id), host="127.0.0.1", port=wp.port,
                                     token=token, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
