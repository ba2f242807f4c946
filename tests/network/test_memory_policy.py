"""``veil worker`` keeps freed memory for its next requests (glibc); off with VEIL_KEEP_FREED_MEMORY=0."""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys

import pytest

from veil import cli
from veil.workers import memory_policy


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc(), reason="glibc malloc settings")
def test_applies_in_a_fresh_process_and_can_be_turned_off():
    code = "from veil.workers.memory_policy import keep_freed_memory as k; print(k())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "VEIL_KEEP_FREED_MEMORY": "0"})
    assert on.stdout.strip() == "True" and off.stdout.strip() == "False"


def test_the_worker_command_applies_it_before_serving(monkeypatch):
    calls = []
    monkeypatch.setattr(memory_policy, "keep_freed_memory", lambda: calls.append("policy") or True)
    import veil.workers.websocket_cli as wcli

    monkeypatch.setattr(wcli, "run", lambda args: calls.append("run") or 0)
    monkeypatch.setattr(memory_policy, "limit_address_space", lambda mb: calls.append(("cap", mb)))
    assert cli._worker(argparse.Namespace(max_memory_mb=512.0)) == 0
    assert calls == ["policy", ("cap", 512.0), "run"]


def test_the_address_space_cap_refuses_a_given_value_below_the_process_but_never_the_default(monkeypatch):
    import resource

    set_to = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: set_to.append(value))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    with pytest.raises(ValueError, match="too small"):
        memory_policy.limit_address_space(1)  # an owner's 1 MiB: below what the process maps
    assert set_to == []
    monkeypatch.setattr(memory_policy, "physical_memory_mb", lambda: 1.0)  # a machine smaller than the process
    assert memory_policy.limit_address_space(None) is None and set_to == []  # the default starts anyway
    assert memory_policy.limit_address_space(0) is None and set_to == []  # 0: no cap
    monkeypatch.setattr(memory_policy, "physical_memory_mb", lambda: float(1 << 20))  # 1 TiB
    assert memory_policy.limit_address_space(None) == float(1 << 20)
    assert set_to and set_to[0][0] == 1 << 40
