"""Red team (finding of session 43, fixed): which parties a truncation hands the whole opened ``c`` (``PartyRuntime.in_process``).

``finish_truncation`` (veil/mpc/truncation.py) gives ``c`` itself to party 0 and to every party
``WorkerRuntime.in_process`` calls "in this process"; other parties get only its packed top bits
(README threat model: a peer worker cannot learn "the opened c of a truncation unless it is the first
party"). ``WorkerRuntime.in_process`` is ``not waits_on_network(location)``, i.e. "not a
WebsocketClientWorker and no ``concurrent_requests``": a worker handle whose party lives in another
process over any other transport -- ``RayClientWorker``, the coordinator's handle on a client hosted in
a Ray actor (another process) -- is taken for an in-process party and sent the whole ``c`` (64x the
bytes of the top bits, and more than the documented guarantee allows).
"""

from __future__ import annotations

import secrets

import torch

import veil as sy
import veil.mpc.truncation as truncation
from veil.federated.ray_transport import RayClientWorker
from veil.mpc.runtime import runtime_of
from veil.tensors.pointer import PointerTensor

N = 64


def _pointers(worker, me):
    return tuple(PointerTensor(worker, 1000 + k, me, (N,), torch.int64) for k in range(3))


def _steps(monkeypatch, pairs):
    seen = {}

    def spy(name, *args, **kwargs):
        for p, (_, q, _) in pairs.items():
            if args[1] is q:
                seen[p] = (name, args[0])
        return None

    monkeypatch.setattr(truncation, "run_party", spy)
    c = torch.randint(-2**62, 2**62, (N,))
    truncation.finish_truncation(c, pairs, 1 << 16)
    return c, seen


def test_a_party_in_a_ray_actor_is_not_taken_for_an_in_process_party(hook):
    me = hook.local_worker
    ray_party = RayClientWorker(hook, f"s43-ray-{secrets.token_hex(3)}", actor=None)  # no call is made
    ptr = PointerTensor(ray_party, 4242, me, (N,), torch.int64)
    assert not runtime_of(ptr).in_process(ptr), "a Ray actor's client lives in another process"


def test_a_remote_non_first_party_gets_only_the_top_bits_of_c(hook, monkeypatch):
    me = hook.local_worker
    first = sy.VirtualWorker(hook, id=f"s43-p0-{secrets.token_hex(3)}")
    virtual = sy.VirtualWorker(hook, id=f"s43-p1-{secrets.token_hex(3)}")
    ray_party = RayClientWorker(hook, f"s43-ray-{secrets.token_hex(3)}", actor=None)
    pairs = {"p0": _pointers(first, me), "p1": _pointers(virtual, me), "p2": _pointers(ray_party, me)}
    c, seen = _steps(monkeypatch, pairs)
    assert seen["p0"][0] == "trunc_finish" and seen["p0"][1] is c
    assert seen["p1"][0] == "trunc_finish" and seen["p1"][1] is c  # in this process: c itself (by design)
    name, value = seen["p2"]
    assert name == "trunc_finish_bits" and value is not c and value.dtype == torch.uint8, \
        "a party in another process (Ray actor) was sent the whole opened c"
