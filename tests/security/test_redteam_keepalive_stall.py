"""Red team: a peer that stops in the middle of a posted request's reply must not hold the keepalive thread.

One keepalive thread per process answers the server pings of every idle connection; when a posted request's
reply (a peer fetch posted before the step, a batch of deferred commands) starts arriving, it reads that reply
ahead. A hostile peer that sends the start of a frame and then nothing used to keep that thread in the read for
the whole reply timeout (120 s by default), every other connection's pings unanswered meanwhile (servers drop a
silent client after twice their ping interval). Now each read there waits ``KEEPALIVE_READ_SECONDS`` at most;
then the connection is dropped and the owed reply reported lost to whoever collects it.
"""

from __future__ import annotations

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


@pytest.fixture
def stalling_peer():
    """A websockets server that answers the first request with a frame header announcing 4 KiB and 100
    bytes of it, then sends nothing more (keeping the connection open until the test ends)."""
    done = threading.Event()

    def handler(ws):
        try:
            ws.recv()
            ws.socket.sendall(bytes((0x82, 126)) + (4096).to_bytes(2, "big") + b"x" * 100)
            done.wait(60)
        except Exception:  # noqa: BLE001  (the client hung up)
            pass

    with websocket_sink(handler) as port:
        yield port
        done.set()


def test_a_reply_stalled_mid_frame_drops_the_connection_instead_of_holding_the_keepalive(hook, stalling_peer,
                                                                                        monkeypatch):
    monkeypatch.setattr(websocket_client, "KEEPALIVE_READ_SECONDS", 0.5)
    peer = WebsocketClientWorker(hook, id="stalling", host="127.0.0.1", port=stalling_peer, token="t" * 20,
                                 timeout=60)
    try:
        peer.post(serialize(m.OkReply(), sender="me"))
        deadline = time.monotonic() + 10
        while not select.select([peer._conn.sock], [], [], 0.1)[0]:  # the reply's first bytes arrived
            assert time.monotonic() < deadline, "the stalling peer never answered"
        raised: list = []

        def keepalive():  # as the keepalive loop calls it (which goes on to the next connection)
            try:
                peer._keepalive()
            except Exception as e:  # noqa: BLE001
                raised.append(e)

        ran = threading.Thread(target=keepalive, daemon=True)
        t0 = time.monotonic()
        ran.start()
        ran.join(15)
        assert not ran.is_alive(), "the keepalive thread stayed in the stalled reply (the 60 s reply timeout)"
        assert time.monotonic() - t0 < 5
        assert [type(e) for e in raised] == [ConnectionLostError]
        assert not peer.connected  # dropped: the part of a frame read cannot be resumed
        with pytest.raises(ConnectionLostError, match="stalling.*sent ahead"):
            peer.collect()  # the owed reply is reported lost, naming the worker
    finally:
        peer.close()
