"""get / copy / move / pointer chains / garbage collection."""

import gc

import pytest

import psutil
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError


def test_get_deletes_remotely(alice):
    p = torch.tensor([1.0, 2.0]).send(alice)
    oid = p.id_at_location
    assert oid in alice._objects
    assert torch.equal(p.get(), torch.tensor([1.0, 2.0]))
    assert oid not in alice._objects


def test_copy_is_independent(alice):
    p = torch.tensor([1.0, 2.0]).send(alice)
    c = p.copy()
    assert c.id_at_location != p.id_at_location
    p.add_(10)
    assert torch.equal(c.get(), torch.tensor([1.0, 2.0]))
    assert torch.equal(p.get(), torch.tensor([11.0, 12.0]))


def test_move_goes_worker_to_worker(alice, bob):
    me = alice.hook.local_worker
    x = torch.randn(1000)
    p = x.send(alice)
    sent_before = me.stats.bytes_sent
    q = p.move(bob)
    assert me.stats.bytes_sent - sent_before < 1000  # the 4 kB payload did not pass through us
    assert q.location is bob and len([o for o in alice._objects if o == p.id_at_location]) == 0
    assert torch.equal(q.get(), x)


def _network(worker) -> bool:
    return not isinstance(worker, sy.VirtualWorker)


def test_pointer_to_pointer(alice, bob):
    x = torch.tensor([1.0, 2.0, 3.0])
    pp = x.send(bob).send(alice)
    assert isinstance(alice._objects[pp.id_at_location], sy.PointerTensor)
    if _network(alice):
        # a network worker never acts on a peer for a client with its own (peer) rights: confused deputy
        with pytest.raises(PermissionDeniedError, match="pointer to another worker"):
            pp * 3
    else:
        assert torch.equal((pp * 3).get().get(), x * 3)
    inner = pp.get()
    assert isinstance(inner, sy.PointerTensor) and inner.location is bob
    assert torch.equal(inner.get(), x)


def test_remote_get_pulls_value_one_level_up(alice, bob):
    x = torch.tensor([4.0, 5.0])
    pp = x.send(bob).send(alice)
    if _network(alice):  # see test_pointer_to_pointer: refused, and nothing moved
        with pytest.raises(PermissionDeniedError, match="pointer to another worker"):
            pp.remote_get()
        assert torch.equal(pp.get().get(), x)
        return
    pp.remote_get()
    assert torch.equal(alice._objects[pp.id_at_location], x)
    assert torch.equal(pp.get(), x)


def _store_size(worker):
    worker.hook.local_worker.flush_deletes()
    return len(worker._objects)


def test_dropped_pointers_free_remote_objects(alice):
    gc.collect()  # earlier tests' pointers in reference cycles: freed now, not in the middle of the count
    base = _store_size(alice)
    p = torch.randn(3).send(alice)
    q = (p * 2 + 1).sum()
    ids = {p.id_at_location, q.id_at_location}
    assert _store_size(alice) == base + 2  # the intermediates are gone already
    assert ids <= set(alice._objects)
    del p, q
    gc.collect()
    assert _store_size(alice) == base
    assert not ids & set(alice._objects)


def test_garbage_collect_data_false_keeps_object(alice):
    p = torch.randn(3).send(alice, garbage_collect_data=False)
    oid = p.id_at_location
    del p
    gc.collect()
    alice.hook.local_worker.flush_deletes()
    assert oid in alice._objects


def test_ten_thousand_cycles_leave_store_and_memory_flat(alice):
    proc = psutil.Process()
    x = torch.randn(256)

    def cycle(n):
        for _ in range(n):
            p = x.send(alice)
            q = (p * 2).sum()
            del p, q

    cycle(500)  # warm caches and allocator
    gc.collect()
    base_objects = _store_size(alice)
    rss_before = proc.memory_info().rss
    cycle(10_000)
    gc.collect()
    assert _store_size(alice) == base_objects
    growth = proc.memory_info().rss - rss_before
    assert growth < 20 * 2**20, f"process memory grew by {growth / 2**20:.1f} MiB over 10,000 cycles"
