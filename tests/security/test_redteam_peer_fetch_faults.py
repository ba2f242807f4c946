"""Red team, peer fetches under faults (veil/workers/peer_openings.py): a party process killed while another
party's fetch waits on it, and a round one scientist starts but never completes, holding a peer link
that other sessions' rounds need.

Four ``veil worker`` processes of their own (a, b, c parties, d the crypto provider; all peered), which
wait ``WAIT`` seconds for a round's shares and fetches: b is killed by the first test, so they are not
the module cluster of test_redteam_peer_openings.py. After each attack the surviving parties still
serve a peer-opened product equal to torch's, and nothing was stored under the attacked round's ids.
"""

from __future__ import annotations

import signal

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.tensors.mpc_glue.runtime import enable_peer_openings
from veil.workers.peer_openings import PeerOpenMessage

from network_helpers import TOKEN
from test_redteam_peer_openings import _peer_token, _start, new_round
from worker_processes import peer_mesh_args, spawn_all, spawned_workers

NAMES = ("a", "b", "c", "d")
WAIT = 30  # seconds a worker waits for a round's shares and fetches (longer than a product on a loaded box)


@pytest.fixture(scope="module")
def quad(hook):
    """name -> (process, scientist connection), peer openings enabled on a, b, c."""
    from veil.workers.websocket_launcher import free_port

    from veil.tensors.mpc_glue import runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VEIL_PEER_WAIT_SECONDS", str(WAIT))
        mp.setattr(runtime, "PEER_MIN_ELEMENTS", 0)
        ports = {n: free_port() for n in NAMES}
        conns = {}
        spawning = spawned_workers()
        spawn = next(spawning)
        try:
            specs = {}
            for n in NAMES:
                specs[n] = (["--token", TOKEN, *peer_mesh_args(n, ports, _peer_token)], ports[n])
            procs = spawn_all(spawn, specs)
            conns = {n: _connect(hook, procs[n]) for n in NAMES}
            yield {n: (procs[n], conns[n]) for n in NAMES}
        finally:
            for c in conns.values():
                enable_peer_openings(c, enabled=False)
                c.close()
            next(spawning, None)


def _connect(hook, proc):
    conn = sy.WebsocketClientWorker(hook, id=proc.id, host="127.0.0.1", port=proc.port, token=TOKEN, timeout=120)
    if proc.id != "d":
        enable_peer_openings(conn)
    return conn


def _product(parties, cp):
    a, b = torch.randint(-1000, 1000, (16, 8)), torch.randint(-1000, 1000, (16, 8))
    z = a.share(*parties, crypto_provider=cp) * b.share(*parties, crypto_provider=cp)
    assert torch.equal(z.get(), a * b)


def _dangling_round(hook, conn, parties):
    """A beaver_mask round sent to ``conn``'s worker only (its other parties never hear of it): that worker
    publishes, then its fetch waits at the next party. (thread, errors, ids)."""
    x = torch.arange(6, dtype=torch.int64).send(conn)
    ids, errors = [new_id(), new_id()], {}
    msg = PeerOpenMessage("beaver_mask", (m.ObjectRef(x.id_at_location),) * 4, {}, new_round(), list(parties), ids)
    return _start(hook, conn, msg, errors, "round"), errors, ids, x


def _nothing_at(hook, conn, ids):
    for oid in ids:
        with pytest.raises(VeilError):
            sy.PointerTensor(conn, oid, hook.local_worker, (6,), torch.int64).get()


def test_a_round_one_scientist_never_completes_does_not_hold_other_sessions_rounds(hook, quad):
    """Eve (a scientist session of her own on a) starts a round naming a and c that she never sends to c:
    a's fetch waits at c. Sam's product between a and c (another session) must not wait for Eve's round:
    it ends, correct, while Eve's round is still waiting (it would wait ``WAIT`` s; Eve then leaves, which
    ends her round at once: her call fails, and her session's objects go with it)."""
    eve = sy.WebsocketClientWorker(hook, id=f"a-eve-{new_id()}", host="127.0.0.1", port=quad["a"][0].port,
                                   token=TOKEN, timeout=120)
    try:
        thread, errors, _ids, _x = _dangling_round(hook, eve, ["a", "c"])
        _product([quad["a"][1], quad["c"][1]], quad["d"][1])  # Sam: the module's sessions
        pending = thread.is_alive()
    finally:
        eve.close()
    thread.join(120)
    assert pending  # Sam's round did not wait for Eve's
    assert not thread.is_alive() and "round" in errors, errors
    _product([quad["a"][1], quad["c"][1]], quad["d"][1])  # a and c still serve


def test_a_party_killed_while_a_fetch_waits_on_it_ends_the_round_cleanly(hook, quad):
    """a's round names b, whose orchestrator never reaches it: a's fetch waits at b, and b is killed (-9).
    a's round fails (it does not hang past its wait), stores nothing, and a keeps serving: a peer-opened
    product of a and c (d dealing) equals torch's."""
    _product([quad["a"][1], quad["c"][1]], quad["d"][1])  # a's links are up before the attack
    thread, errors, ids, _x = _dangling_round(hook, quad["a"][1], ["a", "b"])
    quad["b"][0].proc.send_signal(signal.SIGKILL)
    quad["b"][0].proc.wait(30)
    thread.join(120)
    assert not thread.is_alive() and "round" in errors, errors
    _nothing_at(hook, quad["a"][1], ids)
    _product([quad["a"][1], quad["c"][1]], quad["d"][1])
    _product([quad["c"][1], quad["a"][1]], quad["d"][1])
