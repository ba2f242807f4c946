"""Constants and helpers of the governance tests (a module of its own: several conftest.py exist)."""

from __future__ import annotations

import os
import subprocess

import veil as sy
from veil.workers.websocket_launcher import start_worker

from tests.cli_batch import run_veil

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
    """``python -m veil.cli *args``, in the runner this test process shares (tests/cli_batch.py: a fresh
    process per command imported torch again, ~3 s each); only the flag gives the admin token."""
    return run_veil(list(args), env={**os.environ, "VEIL_ADMIN_TOKEN": ""}, cwd=os.getcwd(), timeout=timeout)
