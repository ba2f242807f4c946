"""One remote-handle type (veil/tensors/handle.py) under every handle kind."""

import gc
import importlib

import pytest
import torch

import veil as sy
from veil.tensors.handle import HANDLE_KINDS, RemoteHandle, fetch_all
from veil.tensors.pointer import PointerTensor


def _flush(hook, worker):
    """Sends what the local worker queued for ``worker`` (only there: other tests' workers may be gone)."""
    from veil.messaging import messages as m

    hook.local_worker.send_msg(m.DeleteMessage([]), worker)


def _cls(path):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_every_handle_kind_is_in_the_table_and_uses_the_base():
    for kind, row in HANDLE_KINDS.items():
        cls = _cls(row.cls)
        assert issubclass(cls, RemoteHandle), row.cls
        assert cls.HANDLE_KIND == kind
        assert row.get and row.release
    # and every RemoteHandle subclass has a row (a new kind cannot skip the table)
    import veil.dp.remote  # noqa: F401
    import veil.he.remote  # noqa: F401
    import veil.plans.remote  # noqa: F401

    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    kinds = {s.HANDLE_KIND for s in subclasses(RemoteHandle) if s.__module__.startswith("veil.")}
    assert kinds == set(HANDLE_KINDS)


def test_he_pointer_is_freed_through_the_deletion_queue(hook):
    from veil.he.remote import HEPointer

    w = sy.VirtualWorker(hook, id="handle-he")
    pub, priv = sy.he.paillier.keygen(n_length=512)
    ptr = torch.tensor([1.0, 2.0]).encrypt(protocol="paillier", public_key=pub).send(w)
    assert isinstance(ptr, HEPointer) and isinstance(ptr, RemoteHandle)
    assert repr(ptr).startswith("[HEPointer paillier (2,) | ") and f"handle-he:{ptr.id_at_location}]" in repr(ptr)
    total = ptr + ptr  # a new handle; both free themselves when dropped
    before = len(w.monitor)
    assert torch.allclose(total.get().decrypt(priv), torch.tensor([2.0, 4.0]), atol=1e-4)
    assert len(w.monitor) == before - 1  # .get() took the result
    del ptr
    gc.collect()
    _flush(hook, w)
    assert len(w.monitor) == before - 2  # the ciphertext went through the same queue as tensor pointers


def test_plan_pointer_and_dp_handle_free_their_plan_once(hook):
    w = sy.VirtualWorker(hook, id="handle-plan")

    @sy.func2plan(args_shape=[(2,)])
    def double(x):
        return x * 2

    ptr = double.send(w)
    assert isinstance(ptr, RemoteHandle) and ptr.HANDLE_KIND == "plan"
    assert repr(ptr).startswith("[PlanPointer ") and f"handle-plan:{ptr.id_at_location}]" in repr(ptr)
    assert torch.equal(ptr(torch.tensor([1.0, 3.0]).send(w)).get(), torch.tensor([2.0, 6.0]))
    gc.collect()
    _flush(hook, w)
    n = len(w.monitor)
    stand_in = ptr._handle
    del ptr
    gc.collect()
    _flush(hook, w)
    assert len(w.monitor) == n  # the stand-in still names the plan: it stays usable
    del stand_in
    gc.collect()
    _flush(hook, w)
    assert len(w.monitor) == n - 1


def test_fetch_all_one_round_trip_and_same_worker_only(hook):
    a = sy.VirtualWorker(hook, id="handle-a")
    b = sy.VirtualWorker(hook, id="handle-b")
    x, y = torch.tensor([1.0]).send(a), torch.tensor([2.0]).send(a)
    z = torch.tensor([3.0]).send(b)
    with pytest.raises(ValueError, match="same worker"):
        fetch_all([x, z])
    values = fetch_all([x, y])
    assert [float(v) for v in values] == [1.0, 2.0]
    assert x.__dict__["_freed"] and y.__dict__["_freed"]
    assert len(a.monitor) == 0
    assert isinstance(z, PointerTensor) and isinstance(z, RemoteHandle)
    assert z.tag("#t").describe("d").tags == ("#t",) and z.description == "d"
