"""Requests posted over one connection are collected by ticket (veil.workers.websocket_client).

A connection answers requests in the order they were sent, whichever thread reads the replies: each
``post`` returns a ticket and ``collect(ticket)`` returns that request's reply, reading (and keeping) the
replies of earlier tickets on the way. So a peer fetch posted before a party's step no longer holds the
link's send lock for the whole step (``peer_openings._post_fetches``): another session's request over the
same link goes out meanwhile and each thread gets its own reply.
"""

from __future__ import annotations

import threading

import pytest

from veil.exceptions import ConnectionLostError
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.peer_openings import PeerFetchMessage, PeerOpenMessage, _collect_posted, _post_fetches
from veil.workers.websocket_client import WebsocketClientWorker

from worker_processes import websocket_sink


def _echo_ids(ws):
    """Answers each request with an ObjectsReply holding the request's own DeleteMessage ids (or its round
    for a fetch): every reply says which request it answers."""
    try:
        for data in ws:
            msg = deserialize(data)[0]
            answer = [msg.round] if type(msg) is PeerFetchMessage else list(msg.ids)
            ws.send(serialize(m.ObjectsReply(answer), sender="charlie"))
    except Exception:  # noqa: BLE001  (the client hung up)
        pass


@pytest.fixture
def charlie(hook):
    with websocket_sink(_echo_ids) as port:
        client = WebsocketClientWorker(hook, id="charlie", host="127.0.0.1", port=port, token="t" * 20, timeout=30)
        yield client
        client.close()


def _request(*ids) -> bytes:
    return serialize(m.DeleteMessage(list(ids)), sender="me")


def _answer(reply_bytes) -> list:
    return deserialize(reply_bytes)[0].objects


def test_each_ticket_gets_its_own_reply_in_any_order(charlie):
    first, second, third = (charlie.post(_request(k)) for k in (1, 2, 3))
    assert (first, second, third) == (1, 2, 3)
    assert _answer(charlie.collect(third)) == [3]  # reads 1 and 2 on the way, kept for their posters
    assert _answer(charlie.collect(first)) == [1]
    assert _answer(charlie.collect(second)) == [2]
    with pytest.raises(RuntimeError, match="not owed"):
        charlie.collect(second)  # each reply once
    with pytest.raises(RuntimeError, match="not owed"):
        charlie.collect(9)


def test_a_request_sent_while_a_post_is_owed_gets_its_own_reply(charlie):
    ticket = charlie.post(_request(7))
    assert _answer(charlie._recv_msg(_request(8))) == [8]  # the owed reply was read first and kept
    assert _answer(charlie.collect(ticket)) == [7]


def test_posts_from_several_threads_each_collect_their_own(charlie):
    errors, barrier = [], threading.Barrier(4)

    def poster(k):
        try:
            barrier.wait(10)
            for j in range(20):
                ticket = charlie.post(_request(1000 * k + j))
                assert _answer(charlie.collect(ticket)) == [1000 * k + j]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=poster, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_a_dropped_connection_loses_each_owed_ticket_once(hook):
    def answers_one_then_hangs_up(ws):
        ws.send(serialize(m.ObjectsReply([deserialize(ws.recv())[0].ids[0]]), sender="charlie"))
        ws.recv()
        ws.close()

    with websocket_sink(answers_one_then_hangs_up) as port:
        client = WebsocketClientWorker(hook, id="charlie", host="127.0.0.1", port=port, token="t" * 20, timeout=30)
        try:
            answered, lost = client.post(_request(1)), client.post(_request(2))
            assert _answer(client.collect(answered)) == [1]
            with pytest.raises(ConnectionLostError, match="charlie"):
                client.collect(lost)
            with pytest.raises(RuntimeError, match="not owed"):
                client.collect(lost)  # reported once
            assert client._lost_tickets == set() and client._early == {}
        finally:
            client.close()


def test_a_posted_peer_fetch_leaves_the_link_free_for_other_sessions(hook, charlie):
    """The party's fetch posted before its step: the link's send lock is free right after the post, another
    thread's request over the link is answered during the step, and the fetch's reply still reaches the round."""
    me = hook.local_worker
    msg = PeerOpenMessage("beaver_mask", (), {}, "r" * 32, ["me", "charlie"], [1, 2])
    posted: dict = {}
    _post_fetches(me, msg, frozenset({"charlie"}), posted)
    assert list(posted) == ["charlie"]
    lock = me._send_lock(charlie)
    taken = []

    def try_lock():
        got = lock.acquire(blocking=False)
        taken.append(got)
        if got:
            lock.release()

    other = threading.Thread(target=try_lock)
    other.start()
    other.join(10)
    assert taken == [True]  # (it was held until the fetch's reply was read: the whole step)
    answered = []
    other = threading.Thread(target=lambda: answered.append(me.send_msg(m.DeleteMessage([5]), charlie)))
    other.start()
    other.join(30)
    assert [r.objects for r in answered] == [[5]]  # another session's request over the link, meanwhile
    replies = _collect_posted(me, posted, 4096)
    assert replies["charlie"].objects == ["r" * 32] and posted == {}
