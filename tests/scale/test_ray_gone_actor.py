"""A Ray-hosted client whose Ray was shut down is a lost worker, not a bare exception.

Found when the suite first ran on two pytest-xdist processes: a pointer to a Ray client from an earlier test
(its Ray since shut down) queued its deletion in the session's local worker, and the next unrelated
``flush_deletes()`` raised Ray's bare ``Exception("Failed to submit task to actor ... Can't find actor")``:
submitting to an actor of a Ray that is gone fails before ``ray.get``, outside the errors veil translated.
A fake actor stands in for Ray here (no cluster start), with a VirtualWorker answering its requests.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

import veil as sy
import veil.federated.ray_transport as ray_transport
from veil.exceptions import ConnectionLostError


class _ActorOfAGoneRay:
    """``actor.recv.remote(id, data)`` answered by a VirtualWorker until ``gone``; then Ray's submit error."""

    def __init__(self, server):
        self.server, self.gone = server, False
        self.recv = SimpleNamespace(remote=self._remote)

    def _remote(self, client_id, data):
        if self.gone:
            raise Exception("Failed to submit task to actor ActorID(1b6a) due to b\"Can't find actor 1b6a. "
                            "It might be dead or it's from a different cluster\"")
        return self.server._recv_msg(data)  # the "object ref" the fake ray.get hands back


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray_transport, "_ray", lambda: SimpleNamespace(get=lambda ref, timeout: ref,
                                                                        exceptions=ray.exceptions))


def test_a_client_of_a_ray_that_is_gone_is_a_lost_worker(hook, fake_ray):
    server = sy.VirtualWorker(hook, id="ray-gone-server")
    actor = _ActorOfAGoneRay(server)
    client = ray_transport.RayClientWorker(hook, id="ray-gone-client", actor=actor)
    me = hook.local_worker
    p = torch.tensor([1.5, -2.0]).send(client)
    assert torch.equal((p * 2).get(), torch.tensor([3.0, -4.0]))  # it served while its Ray was up
    actor.gone = True
    del p
    gc.collect()  # its deletion is now owed to a client that cannot be reached
    me.flush_deletes()  # deletions alone owed to a lost worker raise nothing
    with pytest.raises(ConnectionLostError, match="Ray actor") as info:
        torch.tensor([3.0]).send(client)
    assert "\n" not in str(info.value)
    me.flush_deletes()  # and leave nothing behind that fails a later flush
