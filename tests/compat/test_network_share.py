"""Part 10's remote sharing between network workers: each data worker shares its own values
through its peer connection; the coordinator's session can use (and only it can claim) the shares."""

from __future__ import annotations

import pytest
import torch

import veil as sy
from veil.exceptions import ObjectNotFoundError
from veil.messaging import messages as m
from veil.workers.websocket_launcher import free_port, start_worker

TOKEN, OTHER, PEER = "compat-scientist-token", "compat-other-token", "compat-peer-token"


@pytest.fixture
def peered_workers():
    ports = {"bob": free_port(), "alice": free_port()}
    procs = []
    try:
        for name, other in (("bob", "alice"), ("alice", "bob")):
            args = ["--token", TOKEN, "--user", f"other={OTHER}", "--peer", f"{other}=127.0.0.1:{ports[other]}",
                    "--peer-token", f"{other}={PEER}", "--accept-peer", f"{other}={PEER}"]
            procs.append(start_worker(name, args, port=ports[name], ready_timeout=180))  # slow CI machines
        yield procs
    finally:
        for p in procs:
            p.kill()


def test_remote_share_between_network_workers(hook, peered_workers):
    clients = [sy.WebsocketClientWorker(hook, id=p.id, host="127.0.0.1", port=p.port, token=TOKEN)
               for p in peered_workers]
    bob, alice = clients
    try:
        a, b = torch.tensor([1.5, -2.0]), torch.tensor([0.25, 4.0])
        dealer = sy.LocalDealer()
        sa = a.send(bob).fix_precision().share(bob, alice, crypto_provider=dealer).get()
        sb = b.send(alice).fix_precision().share(bob, alice, crypto_provider=dealer).get()
        total = sa + sb
        alice.flush()  # share-local ops ride on the next request: send them now, so the use (the claim) happened
        # another scientist on alice cannot name the share bob placed there for us (we claimed it by using it)
        intruder = sy.WebsocketClientWorker(hook, id="alice-intruder", host="127.0.0.1",
                                            port=peered_workers[1].port, token=OTHER)
        try:
            with pytest.raises(ObjectNotFoundError):
                hook.local_worker.send_msg(m.GetObjectsMessage([sa.child.child[alice.id].id_at_location]),
                                           intruder)
        finally:
            intruder.close()
        assert torch.allclose(total.get().float_precision(), a + b)
    finally:
        for c in clients:
            c.close()
