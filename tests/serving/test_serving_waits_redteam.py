"""Red team of waiting ``pending``/``fetch`` (second pass), beyond test_serving_waits.py.

* One connection cannot hold more than one waiting request: a raw client that pipelines dozens of
  waiting fetches without reading a reply gets them served one at a time (the connection's loop), and
  an honest client is answered meanwhile; hanging up leaves nothing waiting (the next queries work).
* A stopped service answers another session's request id as unknown, whether or not that request is in
  a batch being computed (it said "not ready" for an id in computation: an oracle for guessed ids),
  while the submitting session still waits for its own.
* A wait never outlasts the worker's per-command limit: at the limit it answers "nothing yet" (it failed
  with CommandTimeoutError when ``--max-command-seconds`` was under ``MAX_WAIT``).
* A waiting fetch with a hostile request id (not an integer; an unhashable one was a bare TypeError) is refused.
"""

from __future__ import annotations

import pytest
import torch
from websockets.sync.client import connect

import veil as sy
from veil.exceptions import CommandCancelledError
from veil.ids import new_id
from veil.messaging.serde import deserialize, serialize
from veil.serving import ServiceClosedError, ServingError, protocol
from veil.workers.websocket_auth import handshake_headers

from serving_helpers import assert_query_ok, client_for, cluster, served_small_model  # noqa: F401  (fixtures)

FLOOD = 40


def test_one_connection_holds_one_wait_however_many_it_pipelines(cluster, client_for):
    model, expected = served_small_model(cluster, "wait-pipe")
    try:
        honest = client_for(cluster, (1, 4), (1, 2), name="wait-pipe", timeout=60)
        party = cluster.parties[0]
        frame = serialize(protocol.ServingMessage("fetch", "wait-pipe", [new_id(), protocol.MAX_WAIT]), sender="x")
        # close_timeout: the party reads this connection's frames in order, so the close frame waits behind the
        # queued waits; the hang-up below is the same a second later, not after websockets' default 10 s
        with connect(f"ws://{party.host}:{party.port}", additional_headers=handshake_headers(cluster.client_token),
                     max_size=None, open_timeout=30, close_timeout=1) as ws:
            for _ in range(FLOOD):  # sent at once, no reply read (the server reads at most a few ahead)
                ws.send(frame)
            for _ in range(3):  # answered while the flood's waits run one after another
                assert_query_ok(honest, expected)
            first = deserialize(ws.recv(timeout=30))[0]  # the flood's first reply: nothing, after its wait
            assert list(first.objects) == []
        # hung up with dozens of waits unserved: the party carries on
        for _ in range(2):
            assert_query_ok(honest, expected)
        assert_query_ok(client_for(cluster, (1, 4), (1, 2), name="wait-pipe"), expected)
    finally:
        model.stop()


def _in_process_service(hook, tag):
    party, owner = sy.VirtualWorker(hook, id=f"{tag}_party"), sy.VirtualWorker(hook, id=f"{tag}_owner")
    victim, thief = sy.VirtualWorker(hook, id=f"{tag}_victim"), sy.VirtualWorker(hook, id=f"{tag}_thief")
    protocol.call(owner, party, "open", "svc", [victim.id, thief.id], {"input_shape": [1, 3]})
    return party, owner, victim, thief


def test_a_stopped_service_does_not_tell_which_ids_are_in_computation(hook):
    party, owner, victim, thief = _in_process_service(hook, "wait_oracle")
    rid = new_id()
    protocol.call(victim, party, "submit", "svc", rid, torch.zeros(1, 3, dtype=torch.int64))
    assert protocol.call(owner, party, "claim", "svc", [rid], new_id()) == [1]  # in computation
    protocol.call(owner, party, "close", "svc", "stopped")
    for probe in (rid, new_id()):  # in computation, or never submitted: the same answer
        with pytest.raises(ServiceClosedError):
            protocol.call(thief, party, "fetch", "svc", probe, protocol.MAX_WAIT)
    assert protocol.call(victim, party, "fetch", "svc", rid, protocol.MAX_WAIT) == []  # its own: not ready yet
    protocol.call(owner, party, "fail", "svc", [rid], "stopped mid-batch")
    with pytest.raises(ServingError, match="stopped mid-batch"):
        protocol.call(victim, party, "fetch", "svc", rid, protocol.MAX_WAIT)


@pytest.mark.parametrize("rid", [[1], {"a": 1}, None, "7", 1.5])
def test_a_hostile_request_id_is_refused_and_changes_nothing(hook, rid):
    party, owner, victim, thief = _in_process_service(hook, f"wait_rid{abs(hash(str(rid))) % 1000}")
    mine = new_id()
    protocol.call(victim, party, "submit", "svc", mine, torch.ones(1, 3, dtype=torch.int64))
    with pytest.raises(ServingError, match="request id"):
        protocol.call(thief, party, "fetch", "svc", rid, protocol.MAX_WAIT)
    assert [r for r, *_ in protocol.call(owner, party, "pending", "svc")] == [mine]  # nothing changed


def test_a_wait_ends_within_the_workers_command_limit_with_an_answer(hook):
    """An owner whose ``--max-command-seconds`` is under ``MAX_WAIT``: a waiting fetch answers "nothing yet" at
    the limit instead of failing with CommandTimeoutError (the client would report the query failed)."""
    from veil.workers import cancellation

    party, owner, victim, thief = _in_process_service(hook, "wait_limit")
    token = cancellation.CancelToken(seconds=0.2)
    token.start()
    msg = protocol.ServingMessage("fetch", "svc", [new_id(), protocol.MAX_WAIT])
    with cancellation.running(token):
        reply = protocol._handle_serving(party, msg, victim.id)
    assert list(reply.objects) == []
    hung_up = cancellation.CancelToken()  # no limit; the client hangs up: the wait stops with the cancellation
    hung_up.start()
    hung_up.cancel("the client hung up")
    with cancellation.running(hung_up), pytest.raises(CommandCancelledError):
        protocol._handle_serving(party, protocol.ServingMessage("fetch", "svc", [new_id(), 0.5]), victim.id)


def test_queued_input_bytes_are_bounded_per_connection_and_per_service(hook, monkeypatch):
    """A request's batch dimension is the client's: 32 requests of one 256 MiB message each were kept queued per
    connection. Bytes are bounded too (small bounds here: the same checks as the 64 MiB / 1 GiB defaults)."""
    monkeypatch.setattr(protocol, "MAX_SESSION_BYTES", 3 * 24 * 8)  # three 8-row requests of [*, 3] int64
    monkeypatch.setattr(protocol, "MAX_PENDING_BYTES", 5 * 24 * 8)
    party, owner, victim, thief = _in_process_service(hook, "wait_bytes")
    rows = torch.zeros(8, 3, dtype=torch.int64)
    with pytest.raises(ServingError, match="MiB"):  # one request larger than a connection's share
        protocol.call(thief, party, "submit", "svc", new_id(), torch.zeros(4 * 8, 3, dtype=torch.int64))
    for _ in range(3):
        protocol.call(thief, party, "submit", "svc", new_id(), rows)
    with pytest.raises(ServingError, match="MiB"):
        protocol.call(thief, party, "submit", "svc", new_id(), rows)
    for _ in range(2):  # the service's bound: the victim gets what the thief left
        protocol.call(victim, party, "submit", "svc", new_id(), rows)
    with pytest.raises(ServingError, match="busy"):
        protocol.call(victim, party, "submit", "svc", new_id(), rows)
    queued = protocol.call(owner, party, "pending", "svc")
    assert len(queued) == 5 and all(size == 8 for _, size, _ in queued)
    rids = [r for r, *_ in queued[:3]]  # claimed into a batch: no longer queued, room again
    assert protocol.call(owner, party, "claim", "svc", rids, new_id()) == [8, 8, 8]
    protocol.call(victim, party, "submit", "svc", new_id(), rows)
