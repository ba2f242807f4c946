"""The client's shape cache (tensors/shape_inference.py): a cached template must never answer a
different call. Each test first fills the cache with one call, then makes calls that differ only
in what the key must tell apart, and compares every result with plain PyTorch."""

import pytest
import torch

from veil.tensors import shape_inference
from veil.tensors.pointer import PointerTensor


@pytest.fixture(autouse=True)
def _fresh_cache():
    shape_inference.clear_cache()
    yield
    shape_inference.clear_cache()


def test_slices_with_other_bounds_get_their_own_shapes(alice):
    x = torch.arange(40.0).reshape(10, 4)
    p = x.send(alice)
    cases = [slice(0, 8), slice(0, 4), slice(8, 16), slice(0, 8, 3), slice(None, 8), slice(-3, None),
             slice(0, None, 2), slice(5, 2)]
    for s in cases * 2:  # twice: the second round is answered from the cache
        r = p[s]
        assert type(r) is PointerTensor and r.shape == x[s].shape, s
        assert torch.equal(r.get(), x[s]), s


def test_slice_bound_types_are_part_of_the_key(alice):
    x = torch.arange(10.0)
    p = x.send(alice)
    assert p[1:3].shape == (2,)
    assert p[True:3].shape == x[True:3].shape  # True == 1 but a different type: its own entry
    key_int = shape_inference.collect((p, slice(1, 3)), {})[1]
    key_bool = shape_inference.collect((p, slice(True, 3)), {})[1]
    key_none = shape_inference.collect((p, slice(1, 3, None)), {})[1]
    assert key_int != key_bool and key_int == key_none


def test_a_slice_never_shares_a_key_with_plain_values(alice):
    p = torch.arange(10.0).send(alice)
    as_slice = shape_inference.collect((p, slice(1, 3)), {})[1]
    as_tuple = shape_inference.collect((p, (int, 1, int, 3, type(None), None)), {})[1]
    assert as_slice != as_tuple


def test_slices_of_non_plain_bounds_take_the_general_path(alice):
    p = torch.arange(10.0).send(alice)
    tensors, key = shape_inference.collect((p, slice(torch.tensor(1), 3)), {})
    assert key is None or key[0] != "flat"  # a tensor bound is never keyed by its value


def test_commands_with_local_tensors_count_their_bytes_in_the_queue(alice):
    me = alice.hook.local_worker
    me.flush(alice)
    p = torch.zeros(1000).send(alice)
    me.flush(alice)
    q = p + torch.ones(1000)  # a local tensor rides with the deferred command
    entry = me._pending_deletes[id(alice)]
    assert entry[2] == 4000
    r = q * 2  # pointers only: no bytes
    assert me._pending_deletes[id(alice)][2] == 4000
    assert torch.equal(r.get(), torch.full((1000,), 2.0))
