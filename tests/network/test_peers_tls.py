"""Worker-to-worker moves between network workers, and TLS."""

import shutil

import pytest
import torch

import veil as sy
from veil.exceptions import ObjectNotFoundError, WorkerNotFoundError
from veil.messaging import messages as m
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_launcher import free_port

from network_helpers import OTHER, PEER, TOKEN, base_args, self_signed_cert


def test_move_goes_directly_and_is_audited(peered, connect, hook, tmp_path):
    alice, bob = connect(peered["alice"]), connect(peered["bob"])
    x = torch.randn(10_000)
    p = x.send(alice)
    sent = hook.local_worker.stats.bytes_sent
    q = p.move(bob)
    assert hook.local_worker.stats.bytes_sent - sent < 1000 and q.location is bob
    assert torch.equal((q * 1).get(), x)  # the mover (this client) can use it on bob...
    intruder = connect(peered["bob"], token=OTHER, id="bob-intruder")
    with pytest.raises(ObjectNotFoundError):  # ...and, once claimed, nobody else can name it
        hook.local_worker.send_msg(m.GetObjectsMessage([q.id_at_location]), intruder)
    assert torch.equal(q.get(), x)
    alice.close()
    peered["alice"].stop()
    db = OwnerDB.in_dir(tmp_path / "alice")
    moves = [r for r in db.audit_entries() if r["action"] == "move"]
    db.close()
    assert moves and moves[0]["outcome"] == "allowed" and moves[0]["detail"] == "to bob"


def test_move_to_unconfigured_worker_is_refused(peered, connect, hook):
    alice = connect(peered["alice"])
    stranger = sy.VirtualWorker(hook, id="carol")
    p = torch.ones(2).send(alice)
    with pytest.raises(WorkerNotFoundError, match="no peer 'carol'.*--peer"):
        p.move(stranger)
    assert torch.equal(p.get(), torch.ones(2))  # a refused move loses nothing


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(spawn, connect, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    wp = spawn("alice", base_args(["--cert", str(cert), "--key", str(key)]))
    assert any("wss://" in line for line in wp.output)
    alice = connect(wp, secure=True, cafile=str(cert))
    assert torch.equal((torch.tensor([1.0, 2.0]).send(alice) * 3).get(), torch.tensor([3.0, 6.0]))
    from veil.exceptions import ConnectionLostError

    with pytest.raises(ConnectionLostError):  # plain ws:// to a TLS port fails cleanly
        connect(wp, id="alice-plain", connect_timeout=3)
    assert TOKEN
