"""Virtual workers for the PySyft-compatibility tests (fresh ones per test)."""

from __future__ import annotations

import itertools

import pytest

import veil as sy

_n = itertools.count()


@pytest.fixture(autouse=True)
def _restore_default_hook(hook):
    """Tests that make their own TorchHook (the sandbox) must not change the session's default."""
    from veil.workers.registry import default_hook_context, set_default_hook_context

    before = default_hook_context()
    yield
    set_default_hook_context(before)


@pytest.fixture
def ws(hook):
    """bob, alice, james: the names of PySyft's tutorials (unique ids per test)."""
    k = next(_n)
    return tuple(sy.VirtualWorker(hook, id=f"{name}{k}") for name in ("bob", "alice", "james"))
