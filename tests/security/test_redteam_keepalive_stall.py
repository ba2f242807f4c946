"""Red team: a peer that stops in the middle of a posted request's reply must not hold the keepalive thread.

One keepalive thread per process answers the server pings of every idle connection; when a posted request's
reply (a peer fetch posted before the step, a batch of deferred commands) starts arriving, it reads that reply
ahead. A hostile peer that sends the start of a frame and then nothing used to keep that thread in the read for
the whole reply timeout (120 s by default), every other connection's pings unanswered meanwhile (servers drop a
silent client after twice their ping interval). Now each read of a reply being received waits
``KEEPALIVE_READ_SECONDS`` at most; then the connection is dropped and the owed reply reported lost. A ping
ahead of a reply that is not sent yet (a long command) is no stall: that reply is still waited for.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time

import pytest

from veil.exceptions import ConnectionLostError
from veil.messaging import messages as m
from veil.messaging.serde import serialize
from veil.workers import websocket_client
from veil.workers.websocket_client import WebsocketClientWorker

from worker_processes import websocket_sink


def _stalls_mid_frame(ws, done):
    """A frame header announcing 4 KiB and 100 bytes of it, then nothing."""
    ws.socket.sendall(bytes((0x82, 126)) + (4096).to_bytes(2, "big") + b"x" * 100)
    done.wait(60)


def _pings_then_answers_late(ws, done):
    """A keepalive ping while the command still runs, its reply 1.5 s later."""
    ws.ping()
    time.sleep(1.5)
    ws.send(b"late reply")
    done.wait(60)


@pytest.fixture
def peer(hook, monkeypatch):
    """``peer(behaviour) -> WebsocketClientWorker`` with one request posted to a websockets server that answers
    it with ``behaviour(ws, done)``, once the answer's first bytes have arrived; each read of a reply being
    received bounded to 0.5 s."""
    monkeypatch.setattr(websocket_client, "KEEPALIVE_READ_SECONDS", 0.5)
    done = threading.Event()
    with contextlib.ExitStack() as stack:
        def start(behaviour):
            def handler(ws):
                try:
                    ws.recv()
                    behaviour(ws, done)
                except Exception:  # noqa: BLE001  (the client hung up)
                    pass

            port = stack.enter_context(websocket_sink(handler))
            client = WebsocketClientWorker(hook, id="stalling", host="127.0.0.1", port=port, token="t" * 20,
                                           timeout=60)
            stack.callback(client.close)
            assert client.post(serialize(m.OkReply(), sender="me")) == 1  # (its ticket: the tests collect 1)
            deadline = time.monotonic() + 10
            while not select.select([client._conn.sock], [], [], 0.1)[0]:
                assert time.monotonic() < deadline, "the peer never answered"
            return client

        yield start
        done.set()


def _keepalive(client) -> tuple[float, list]:
    """One keepalive pass over ``client`` as the keepalive loop makes it (which goes on to the next
    connection whatever it raised): (seconds it took, what it raised); a hang fails the test."""
    raised: list = []

    def run():
        try:
            client._keepalive()
        except Exception as e:  # noqa: BLE001
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(15)
    assert not thread.is_alive(), "the keepalive thread stayed in the reply (the 60 s reply timeout)"
    return time.monotonic() - t0, raised


def test_a_reply_stalled_mid_frame_drops_the_connection_instead_of_holding_the_keepalive(peer):
    client = peer(_stalls_mid_frame)
    took, raised = _keepalive(client)
    assert took < 5
    assert [type(e) for e in raised] == [ConnectionLostError]
    assert not client.connected  # dropped: the part of a frame read cannot be resumed
    with pytest.raises(ConnectionLostError, match="stalling.*sent ahead"):
        client.collect(1)  # the owed reply (the fresh client's first ticket) is reported lost, naming the worker


def test_a_ping_ahead_of_a_late_reply_is_no_stall(peer):
    client = peer(_pings_then_answers_late)
    took, raised = _keepalive(client)
    assert raised == [] and client.connected
    assert took >= 1.0  # it waited for the reply past the 0.5 s bound of a stalled frame
    assert bytes(client.collect(1)) == b"late reply"
