"""Owner data cannot be written through any argument position (ATen schemas decide),
and errors on owner data carry no values. Runs against virtual and network workers."""

import secrets

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.exceptions import PermissionDeniedError, ProtectedDataError, RemoteExecutionError
from veil.messaging import messages as m
from veil.workers import owner_guard


def _owned(worker, value, **kw):
    """Loads ``value`` as owner data under a fresh tag; returns (id, pointer)."""
    tag = "#w" + secrets.token_hex(4)
    oid = worker.load(value.clone(), tags=(tag,), **kw)
    (ptr,) = sy.search(worker, [tag])
    return oid, ptr


def _unchanged(worker, oid, expected):
    held = worker._objects[oid]
    assert held.dtype == expected.dtype and torch.equal(held.view(torch.uint8), expected.view(torch.uint8))


WEIGHT = torch.arange(12.0).reshape(4, 3) * 7 - 20  # rows with norms far above 1
STATS = torch.tensor([0.5, -1.5, 2.5])


def test_embedding_max_norm_cannot_renormalize_owner_rows(alice):
    oid, w = _owned(alice, WEIGHT)
    idx = torch.tensor([0, 1, 3]).send(alice)
    with pytest.raises(PermissionDeniedError, match="embedding_renorm_"):
        F.embedding(idx, w, max_norm=1.0)
    with pytest.raises(PermissionDeniedError):
        F.embedding(idx, weight=w, max_norm=1.0)
    _unchanged(alice, oid, WEIGHT)
    # reading is fine: the plain lookup works and matches torch
    assert torch.equal(F.embedding(idx, w).get(), F.embedding(torch.tensor([0, 1, 3]), WEIGHT))


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_batch_norm_training_cannot_overwrite_owner_running_stats(alice, which):
    oid, owner = _owned(alice, STATS.abs() if which == "running_var" else STATS)
    x = torch.randn(8, 3).send(alice)
    other = torch.ones(3).send(alice)
    stats = {"running_mean": owner, "running_var": other} if which == "running_mean" else \
        {"running_mean": other, "running_var": owner}
    with pytest.raises(PermissionDeniedError, match="batch_norm"):
        F.batch_norm(x, training=True, **stats)
    _unchanged(alice, oid, STATS.abs() if which == "running_var" else STATS)
    # evaluation mode only reads the statistics: allowed
    F.batch_norm(x, training=False, **stats).get()
    _unchanged(alice, oid, STATS.abs() if which == "running_var" else STATS)


def test_grad_setter_with_owner_value_is_refused(alice):
    oid, owner = _owned(alice, WEIGHT)
    own = torch.zeros(4, 3).send(alice)
    with pytest.raises(PermissionDeniedError, match="grad"):
        own.grad = owner
    me = alice.hook.local_worker
    with pytest.raises(PermissionDeniedError):
        me.send_msg(m.CommandMessage("Tensor.grad.__set__", (m.ObjectRef(own.id_at_location),
                                                             m.ObjectRef(owner.id_at_location)), {}, []), alice)
    with pytest.raises(PermissionDeniedError):
        owner.grad = torch.zeros(4, 3).send(alice)
    _unchanged(alice, oid, WEIGHT)


def test_data_setter_is_not_reachable(alice):
    oid, owner = _owned(alice, WEIGHT)
    own = torch.zeros(4, 3).send(alice)
    me = alice.hook.local_worker
    with pytest.raises((PermissionDeniedError, sy.exceptions.OperationNotAllowedError)):
        me.send_msg(m.CommandMessage("Tensor.data.__set__", (m.ObjectRef(own.id_at_location),
                                                             m.ObjectRef(owner.id_at_location)), {}, []), alice)
    _unchanged(alice, oid, WEIGHT)


@pytest.mark.parametrize("attack", ["add_", "out", "inplace", "setitem", "copy_", "view_then_write", "t_", "zero_"])
def test_classic_writes_stay_refused(alice, attack):
    oid, owner = _owned(alice, WEIGHT)
    x = torch.ones(4, 3).send(alice)
    with pytest.raises(PermissionDeniedError):
        if attack == "add_":
            owner.add_(1)
        elif attack == "out":
            torch.add(x, 1, out=owner)
        elif attack == "inplace":
            F.relu(owner, inplace=True)
        elif attack == "setitem":
            owner[0] = 5.0
        elif attack == "copy_":
            owner.copy_(x)
        elif attack == "t_":
            owner.t_()
        elif attack == "zero_":
            owner.zero_()
        else:
            v = owner[1:3]  # a view is stored as a copy: writing it is allowed and cannot reach the owner
            v.add_(100)
            raise PermissionDeniedError("the view was a copy")
    _unchanged(alice, oid, WEIGHT)


def test_owner_values_leave_no_trace_in_error_text(alice):
    secret = torch.tensor([123456789, 987654])
    oid, owner = _owned(alice, secret)
    idx = torch.tensor([0, 1]).send(alice)
    with pytest.raises(ProtectedDataError) as err:
        torch.index_select(idx, 0, owner)  # torch's IndexError may quote the index
    text = str(err.value)
    assert "123456789" not in text and "987654" not in text and "index_select" in text
    with pytest.raises(ProtectedDataError) as err:
        owner.reshape(7)  # shape errors quote the size
    assert "failed on protected data" in str(err.value)
    _unchanged(alice, oid, secret)
    # policy errors keep their own (value-free) text and type
    with pytest.raises(PermissionDeniedError, match="would modify"):
        owner.add_(1)
    # the same failure on the client's own data keeps the detailed text
    # (pipelined: the error of the client's own command surfaces at the next synchronization, naming the op)
    with pytest.raises(RemoteExecutionError, match="index_select.*index"):
        torch.index_select(idx, 0, torch.tensor([5]).send(alice)).get()


def test_schema_table_lists_batch_norm():
    assert "running_mean" in owner_guard.UNDECLARED_WRITES["aten::native_batch_norm"][0]
    # every write the schema declares is found (embedding_renorm_ writes self, add.out writes out)
    assert [n for _, n, _ in owner_guard._written_positions(torch.ops.aten.embedding_renorm_.default)] == ["self"]
    assert [n for _, n, _ in owner_guard._written_positions(torch.ops.aten.add.out)] == ["out"]
    assert owner_guard._written_positions(torch.ops.aten.add.Tensor) == ()


def test_set_with_owner_source_is_refused_in_process():
    owner = WEIGHT.clone()
    protected = {owner.untyped_storage().data_ptr()}
    own = torch.zeros(2)
    with pytest.raises(PermissionDeniedError):
        with owner_guard.refuse_writes("Tensor.set_", protected, "w"):
            own.set_(owner)
    assert own.untyped_storage().data_ptr() != owner.untyped_storage().data_ptr()


@pytest.mark.parametrize("op", ["Tensor.add_", "Tensor.mul_", "Tensor.zero_"])
def test_a_command_refused_for_a_taken_return_id_writes_nothing(alice, op):
    """Finding: an in-place op sent with a return id already in use ran (writing into its input), then
    failed to store its result: a refused command had changed the requester's data. The ids are checked
    before the op runs now."""
    mine = torch.tensor([1.0, 2.0, 3.0]).send(alice)
    taken = torch.tensor([9.0]).send(alice)
    me = alice.hook.local_worker
    args = (m.ObjectRef(mine.id_at_location),) + ((2.0,) if op != "Tensor.zero_" else ())
    with pytest.raises(PermissionDeniedError, match="already in use"):
        me.send_msg(m.CommandMessage(op, args, {}, [taken.id_at_location]), alice)
    with pytest.raises(sy.exceptions.VeilError, match="positive integer"):
        me.send_msg(m.CommandMessage(op, args, {}, [-5]), alice)
    assert torch.equal(mine.get(), torch.tensor([1.0, 2.0, 3.0]))  # untouched, and the worker still serves
    assert torch.equal(taken.get(), torch.tensor([9.0]))
    # the same op with the in-place marker 0 runs, and matches torch
    fresh = torch.tensor([1.0, 2.0, 3.0]).send(alice)
    me.send_msg(m.CommandMessage(op, (m.ObjectRef(fresh.id_at_location),) + args[1:], {}, [0]), alice)
    expected = torch.tensor([1.0, 2.0, 3.0])
    getattr(expected, op.split(".")[1])(*args[1:])
    assert torch.equal(fresh.get(), expected)
