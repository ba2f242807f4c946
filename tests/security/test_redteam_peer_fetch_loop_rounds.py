"""Red team, peer fetches served on a network worker's event loop, second file: fetches parked for two
sessions' rounds, a flood of parked and refused fetches beside honest rounds, and refusals made on the loop
audited by the handler thread (test_redteam_peer_fetch_loop_net.py has the module's account of the attacks,
its helpers and the other tests)."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers.peer_openings import PeerOpenMessage
from veil.workers.peer_rounds import MAX_WAITING_PER_PEER

from network_helpers import TOKEN
from test_redteam_peer_fetch import GOOD, ZEROS, _ask, _frame, _raw, _stored
from test_redteam_peer_fetch_loop_net import ENDED, _close_all, _counted, _Fetcher, _message, _recovers, _wait_for
from test_redteam_peer_openings import (  # noqa: F401  (fixtures: cluster and its sink charlie)
    REPLIES, _as, _honest_product, _peer_token, _start, _stored_before, _unchanged, cluster, new_round, sink)


def _two_rounds(hook, cluster):
    """Two orchestrator sessions at bob, each with a beaver_mask round with the sink charlie whose outputs
    are its own x (x - 0): (orchestrator, round id, ids, message, x, its pointers) each."""
    out = []
    for k in range(2):
        orchestrator = _as(hook, cluster["bob"][0], TOKEN, f"orchestrator{k}")
        x = torch.full((6,), 100 + k, dtype=torch.int64)
        xp, zp = x.send(orchestrator), torch.zeros(6, dtype=torch.int64).send(orchestrator)
        round_id, ids = new_round(), [new_id(), new_id()]
        REPLIES[round_id] = GOOD
        refs = (m.ObjectRef(xp.id_at_location),) * 2 + (m.ObjectRef(zp.id_at_location),) * 2
        out.append((orchestrator, round_id, ids, PeerOpenMessage("beaver_mask", refs, {}, round_id,
                                                                 ["bob", "charlie"], ids), x, (xp, zp)))
    return out


def test_fetches_parked_for_rounds_of_two_sessions_each_get_their_own_rounds_share(hook, cluster):
    """charlie parks fetches for two rounds that two orchestrator sessions at bob have not started, and dave
    one for each; the rounds then come in the other order. Every change of a round wakes every parked
    fetch: each of charlie's takes its own round's share (that session's x), once; dave's are refused;
    each session stores what was published to it."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][0]
    rounds = _two_rounds(hook, cluster)
    fetchers = {k: _Fetcher(bob, "charlie", rounds[k][1], retry_busy=True) for k in range(2)}
    daves = [_Fetcher(bob, "dave", rounds[k][1], retry_busy=True) for k in range(2)]
    errors, threads = {}, []
    try:
        for f in (*fetchers.values(), *daves):
            f.start()
        _wait_for(lambda: all(f.not_yet for f in (*fetchers.values(), *daves)), "every fetch parked")
        for k in (1, 0):
            orchestrator, _round_id, _ids, msg, _x, _ptrs = rounds[k]
            threads.append(_start(hook, orchestrator, msg, errors, f"bob{k}"))
        for f in (*fetchers.values(), *daves):
            f.join(120)
        for t in threads:
            t.join(120)
        assert not errors, errors
        for k, (orchestrator, _round_id, ids, _msg, x, _ptrs) in enumerate(rounds):
            reply = fetchers[k].reply
            assert type(reply) is m.ObjectsReply, _message(reply)
            assert all(torch.equal(t, x) for t in reply.objects), (k, reply.objects)
            _stored(hook, orchestrator, ids, x + GOOD[0])
        for f in daves:
            assert type(f.reply) is m.ErrorReply and any(w in f.reply.message for w in ("not a reader",) + ENDED), \
                _message(f.reply)
    finally:
        _close_all(r[0] for r in rounds)
    _recovers(hook, cluster)
    _unchanged(cluster, stored)


def test_a_flood_of_parked_and_refused_fetches_does_not_stall_honest_rounds(hook, cluster):
    """charlie and dave keep fetching rounds that never come over ``MAX_WAITING_PER_PEER + 2`` connections
    each, at once (their slots full: parked fetches, and "too many" refusals going to the handler thread,
    again and again), while the scientist runs peer-opened products between alice and bob and reads its
    object back: the products equal torch's. Afterwards the slots come back."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][0]
    stop = threading.Event()
    counts = {"not yet": 0, "too many": 0, "other": []}
    lock = threading.Lock()

    def flood(peer):
        conn = _raw(bob, _peer_token(peer))
        try:
            while not stop.is_set():
                reply = _ask(conn, _frame(new_round()))
                with lock:
                    if type(reply) is m.OkReply:
                        counts["not yet"] += 1
                    elif type(reply) is m.ErrorReply and "too many" in reply.message:
                        counts["too many"] += 1
                    else:
                        counts["other"].append(reply)
        finally:
            conn.close()

    threads = [threading.Thread(target=flood, args=(peer,), daemon=True)
               for peer in ("charlie", "dave") for _ in range(MAX_WAITING_PER_PEER + 2)]
    try:
        for t in threads:
            t.start()
        _wait_for(lambda: counts["too many"] and counts["not yet"], "the flood parked and was refused")
        for _ in range(2):
            _honest_product(cluster)
            assert torch.equal(stored[1].copy().get(), stored[0])
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not counts["other"], counts["other"][:3]
    _recovers(hook, cluster)
    _unchanged(cluster, stored)


def _masked(opcode: int, payload: bytes) -> bytes:
    """One whole client frame (FIN, masked), to write raw with others in one segment."""
    import secrets

    mask, n = secrets.token_bytes(4), len(payload)
    head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.slow  # waits for the refusal summary window to close (~12 s)
def test_refusals_made_on_the_loop_are_audited_by_the_handler_thread(hook, sink, tmp_path):
    """A worker "erin" keeping its audit log under --data-dir runs a round with the sink charlie. dave (a peer,
    no reader) parks two fetches before it exists, woken when it is published and refused on the loop; charlie
    takes the share and fetches again; after the round ended dave fetches it over 30 connections, each
    writing the fetch, a close frame and a FIN at once. Every refusal made on the loop reaches the handler
    thread, which audits it: one row for each of dave's and for charlie's second fetch, and no share left."""
    import sqlite3

    from worker_processes import spawned_workers

    spawning = spawned_workers()
    spawn = next(spawning)
    sci = None
    try:
        erin = spawn("erin", ["--token", TOKEN, "--data-dir", str(tmp_path), "--peer", f"charlie=127.0.0.1:{sink}",
                              "--peer-token", f"charlie={_peer_token('erin')}",
                              "--accept-peer", f"charlie={_peer_token('charlie')}",
                              "--accept-peer", f"dave={_peer_token('dave')}"])
        sci = sy.WebsocketClientWorker(hook, id="erin", host="127.0.0.1", port=erin.port, token=TOKEN, timeout=120)
        db = sqlite3.connect(str(tmp_path / "veil-worker.sqlite3"))

        def refusals(peer: str) -> list:
            return [r[0] for r in db.execute("SELECT detail FROM audit WHERE action = 'peer_fetch' AND outcome = "
                                             "'refused' AND principal = ? ORDER BY seq", (peer,))]

        x = torch.arange(6, dtype=torch.int64).send(sci)
        round_id, ids = new_round(), [new_id(), new_id()]
        REPLIES[round_id] = GOOD
        msg = PeerOpenMessage("beaver_mask", (m.ObjectRef(x.id_at_location),) * 4, {}, round_id, ["erin", "charlie"],
                              ids)
        daves = [_Fetcher(erin, "dave", round_id) for _ in range(2)]
        for f in daves:
            f.start()
        _wait_for(lambda: all(f.not_yet for f in daves), "dave's fetches parked")
        errors = {}
        thread = _start(hook, sci, msg, errors, "erin")
        # charlie takes the share only once dave's fetches were answered: the round stays open until then (a
        # dave between two slices when a quick round ended was told "ended" instead, under load)
        _wait_for(lambda: all(f.reply is not None for f in daves), "dave's fetches answered")
        charlie = _Fetcher(erin, "charlie", round_id)
        charlie.start()
        for f in (*daves, charlie):
            f.join(120)
        thread.join(120)
        assert not errors, errors
        assert type(charlie.reply) is m.ObjectsReply and all(torch.equal(t, ZEROS) for t in charlie.reply.objects)
        assert all(type(f.reply) is m.ErrorReply and "not a reader" in f.reply.message for f in daves), \
            [_message(f.reply) for f in daves]
        again = _raw(erin, _peer_token("charlie"))
        try:
            reply = _ask(again, _frame(round_id))
        finally:
            again.close()
        assert type(reply) is m.ErrorReply and any(w in reply.message for w in ("already took",) + ENDED), reply
        burst = _masked(0x2, _frame(round_id)) + _masked(0x8, (1000).to_bytes(2, "big"))
        for _ in range(30):
            conn = _raw(erin, _peer_token("dave"))
            conn.sock.sendall(burst)
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.close()
        # past a burst a user's refusals are counted in one summary row per window (refusal_rows.py)
        _wait_for(lambda: _counted(refusals("dave")) >= 32, "dave's refusals audited")
        _wait_for(lambda: refusals("charlie"), "charlie's refusal audited")
        dave = refusals("dave")
        assert _counted(dave) == 32 and all("not a reader" in d for d in dave[:2]), dave
        assert all(any(w in d for w in ENDED) for d in dave[2:]), dave
        assert len(refusals("charlie")) == 1, refusals("charlie")
        for oid in ids:  # erin stored what was published, summed
            assert torch.equal(sy.PointerTensor(sci, oid, hook.local_worker, (6,), torch.int64).get(), GOOD[0])
    finally:
        if sci is not None:
            sci.close()
        next(spawning, None)
