"""Pipelining: commands needing no reply ride on the next message; results are unchanged."""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from veil.exceptions import ObjectNotFoundError, RemoteExecutionError


@pytest.fixture
def piped(alice):
    alice.pipelining = True
    yield alice
    alice.pipelining = False


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 1))


def test_pipelined_training_matches_local_with_fewer_messages(piped):
    local, remote = _mlp(), _mlp()
    x, y = torch.randn(32, 13), torch.randn(32, 1)
    lopt, ropt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (local, remote))
    remote.send(piped)
    px, py = x.send(piped), y.send(piped)
    me = piped.hook.local_worker
    me.stats.reset()
    for i in range(0, 32, 8):
        lopt.zero_grad()
        F.mse_loss(local(x[i:i + 8]), y[i:i + 8]).backward()
        lopt.step()
        ropt.zero_grad()
        F.mse_loss(remote(px[i:i + 8]), py[i:i + 8]).backward()
        ropt.step()
    assert me.stats.messages <= 4 * 8  # unpipelined: ~20 per step for this model
    remote.get()
    for a, b in zip(local.parameters(), remote.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_deferred_error_surfaces_at_next_synchronous_call(piped):
    p = torch.tensor([1.0, 2.0]).send(piped)
    q = torch.tensor([1.0, 2.0, 3.0]).send(piped)
    bad = p.clone()
    bad.__dict__["_meta"] = ((3,), torch.float32, False)  # lie about the shape: meta says fine
    torch.add(bad, q)  # deferred: no error yet
    with pytest.raises((RemoteExecutionError, ObjectNotFoundError), match="deferred command"):
        (p * 2).get()
    assert torch.equal((p + 1).get(), torch.tensor([2.0, 3.0]))  # the worker keeps serving


def test_pipelined_pointers_are_still_garbage_collected(piped):
    me = piped.hook.local_worker
    me.flush_deletes()
    base = len(piped._objects)
    x = torch.randn(64)
    for _ in range(300):
        p = x.send(piped)
        q = (p * 2 + 1).sum()
        del p, q
    gc.collect()
    me.flush_deletes()
    assert len(piped._objects) == base
