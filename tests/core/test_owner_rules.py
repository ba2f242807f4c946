"""Tags, search, private tensors, allowlist refusals: the worker is the owner's agent."""

import pytest
import torch

import veil as sy
from veil.exceptions import ObjectNotFoundError, OperationNotAllowedError, PermissionDeniedError
from veil.messaging import messages as m
from veil.messaging.serde import serialize


def test_tags_and_search(alice):
    x = torch.tensor([1.0, 2.0]).tag("#boston", "#data").describe("boston features")
    y = torch.tensor([3.0]).tag("#boston", "#target")
    px, py = x.send(alice), y.send(alice)
    found = alice.search(["#boston"]) if hasattr(alice, "search") else sy.search(alice, ["#boston"])
    assert {f.id_at_location for f in found} == {px.id_at_location, py.id_at_location}
    only = sy.search(alice, ["#boston", "#data"])
    assert len(only) == 1 and only[0].description == "boston features" and "#data" in only[0].tags
    assert torch.equal((only[0] * 2).get(), x * 2)
    assert sy.search(alice, ["#nothing"]) == []


def test_search_pointers_never_delete_owner_data(alice):
    oid = alice.load(torch.tensor([1.0, 2.0]), tags=("#owned",))
    ptrs = sy.search(alice, "#owned")
    ptrs[0].get()  # allowed (not private) but the owner's copy stays
    del ptrs
    alice.hook.local_worker.flush_deletes()
    assert oid in alice._objects


def test_private_tensor_get_refused_but_computation_allowed(alice):
    x = torch.tensor([1.0, 2.0, 3.0]).private_tensor(allowed_users=("hospital",))
    p = x.send(alice)
    assert torch.equal(alice._objects[p.id_at_location], x)
    with pytest.raises(PermissionDeniedError, match="private"):
        p.get()
    assert p.id_at_location in alice._objects  # a refused get loses nothing
    assert torch.equal((p * 2).get(), x * 2)  # results of computations are the requester's
    assert torch.equal(p.get(user="hospital"), x)


def test_owner_loaded_private_data(alice):
    oid = alice.load(torch.arange(4.0), tags=("#secret",), private=True)
    (ptr,) = sy.search(alice, ["#secret"])
    with pytest.raises(PermissionDeniedError):
        ptr.get()
    with pytest.raises(PermissionDeniedError):
        ptr.move(alice.hook.local_worker)
    assert torch.equal(ptr.sum().get(), torch.tensor(6.0))
    assert oid in alice._objects


def test_unknown_id_is_a_clear_error(alice):
    me = alice.hook.local_worker
    with pytest.raises(ObjectNotFoundError, match=r"123456789.*alice"):
        me.send_msg(m.GetObjectsMessage([123456789]), alice)
    with pytest.raises(ObjectNotFoundError):
        me.send_msg(m.CommandMessage("torch.add", (m.ObjectRef(42), 1), {}, [7]), alice)


@pytest.mark.parametrize(
    "op", ["torch.load", "os.system", "builtins.eval", "Tensor.__reduce_ex__", "Tensor.item", "__class__", "Tensor._cdata"]
)
def test_hostile_ops_are_refused_and_worker_keeps_serving(alice, op):
    me = alice.hook.local_worker
    p = torch.tensor([1.0]).send(alice)
    with pytest.raises(OperationNotAllowedError, match="allowlist"):
        me.send_msg(m.CommandMessage(op, (m.ObjectRef(p.id_at_location),), {}, [99]), alice)
    assert torch.equal((p + 1).get(), torch.tensor([2.0]))


def test_local_call_of_non_allowlisted_op_fails_before_sending(alice):
    p = torch.tensor([1.0, 2.0]).send(alice)
    with pytest.raises(OperationNotAllowedError, match="torch"):
        torch.fft.fft(p)


def test_ids_cannot_overwrite_existing_objects(alice):
    me = alice.hook.local_worker
    oid = alice.load(torch.tensor([7.0]))
    with pytest.raises(PermissionDeniedError, match="already in use"):
        me.send_msg(m.ObjectMessage([m.StoredObject(oid, torch.tensor([0.0]))]), alice)
    assert torch.equal(alice._objects[oid], torch.tensor([7.0]))


def test_garbage_bytes_get_an_error_reply(alice):
    from veil.messaging.serde import deserialize

    for junk in (b"", b"\x00", b"\xff" * 20, serialize(m.OkReply())[:-1], b"\x95\x02\x01"):
        reply, _, _ = deserialize(alice._recv_msg(junk))
        assert isinstance(reply, m.ErrorReply) and reply.error in ("SerializationError", "VersionMismatchError")
    p = torch.tensor([1.0]).send(alice)
    assert torch.equal(p.get(), torch.tensor([1.0]))


def test_unknown_wire_version_refused(alice):
    import msgpack

    from veil.messaging.serde import deserialize

    data = msgpack.packb([99, 4, "me", [], []])
    reply, _, _ = deserialize(alice._recv_msg(data))
    assert reply.error == "VersionMismatchError" and "99" in reply.message


def test_owner_data_cannot_be_modified_through_pointers(alice):
    original = torch.arange(6.0).view(2, 3)
    oid = alice.load(original.clone(), tags=("#ledger",))
    (ptr,) = sy.search(alice, "#ledger")
    attempts = [
        lambda: ptr.add_(1),
        lambda: ptr.__setitem__(0, 0.0),
        lambda: ptr.zero_(),
        lambda: torch.add(ptr, 1, out=ptr),
        lambda: ptr.mul_(0),
        lambda: torch.nn.functional.relu(ptr, inplace=True),
    ]
    for attempt in attempts:
        with pytest.raises(PermissionDeniedError, match="modify data the owner"):
            attempt()
    # views are copies: writing to them cannot reach the owner's tensor
    view = ptr[0:1]
    view.mul_(0)
    det = ptr.detach()
    det.fill_(-1)
    assert torch.equal(alice._objects[oid], original)
    assert torch.equal(view.get(), torch.zeros(1, 3)) and torch.equal((ptr * 1).get(), original)
