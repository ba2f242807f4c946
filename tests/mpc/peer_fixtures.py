"""Fixtures of the peer-opening tests: 2 or 3 network parties with peer openings on, and a dealer worker."""

import pytest

from veil.tensors.mpc_glue.runtime import enable_peer_openings


@pytest.fixture(params=[2, 3], ids=["2party", "3party"])
def parties(request, connect_websocket, monkeypatch):
    from veil.tensors.mpc_glue import runtime

    monkeypatch.setattr(runtime, "PEER_MIN_ELEMENTS", 0)  # the small openings of these tests go party to party too
    ws = [connect_websocket(n) for n in ("alice", "bob", "charlie")[: request.param]]
    enable_peer_openings(*ws)
    yield ws
    enable_peer_openings(*ws, enabled=False)


@pytest.fixture
def cp(connect_websocket):
    return connect_websocket("dave")
