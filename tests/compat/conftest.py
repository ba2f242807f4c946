"""Virtual workers for the PySyft-compatibility tests (fresh ones per test)."""

from __future__ import annotations

import itertools

import pytest

import veil as sy

_n = itertools.count()


@pytest.fixture(autouse=True)
def _hooked(hook):
    """Every test here runs as PySyft's tutorials do, after ``hook = sy.TorchHook(torch)`` (tests/conftest.py's
    ``_keep_default_hook_context`` puts the default back after a test that makes its own)."""


@pytest.fixture
def ws(hook):
    """bob, alice, james: the names of PySyft's tutorials (unique ids per test)."""
    k = next(_n)
    return tuple(sy.VirtualWorker(hook, id=f"{name}{k}") for name in ("bob", "alice", "james"))
