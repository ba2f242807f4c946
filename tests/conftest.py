"""Shared fixtures. Core scenarios take ``workers`` so they run against every worker kind.

``WORKER_KINDS`` lists the kinds; the network-worker suite adds "websocket".
"""

from __future__ import annotations

import os

import pytest
import torch

import veil as sy

WORKER_KINDS = ["virtual"]


@pytest.fixture(scope="session")
def hook():
    return sy.TorchHook(torch)


def _make_virtual(hook, name):
    return sy.VirtualWorker(hook, id=name)


WORKER_FACTORIES = {"virtual": _make_virtual}


@pytest.fixture(params=WORKER_KINDS)
def make_worker(request, hook):
    """Returns ``factory(name) -> worker`` for the parametrized kind; cleans up after."""
    made = []
    factory = WORKER_FACTORIES[request.param]

    def make(name):
        w = factory(hook, name)
        made.append(w)
        return w

    yield make
    for w in made:
        close = getattr(w, "close", None)
        if close is not None:
            close()


@pytest.fixture
def alice(make_worker):
    return make_worker("alice")


@pytest.fixture
def bob(make_worker):
    return make_worker("bob")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VEIL_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow test: set VEIL_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
