"""The small round trip's shortcuts (issue #19, helper rtt5) give what the general code gives.

Each shortcut is compared with the general path it stands for: the unrolled ``collect`` with the loop
(the same keys, so both fill and read one cache), a result pointer from a template's ``one`` with one
from ``PointerTensor.__new__`` (the same attributes), a skeleton-use frame of ``SkeletonFramer`` with
``serialize_skeleton`` (the same bytes), the turn lock's explicit acquire/release with its semantics.
Results are compared with plain PyTorch.
"""

import threading

import pytest
import torch

from veil.ids import new_id
from veil.messaging.skeleton_frames import SkeletonFramer, serialize_skeleton
from veil.tensors import remote_ops, shape_inference
from veil.tensors.pointer import PointerTensor
from veil.workers.cancellation import FairLock


def test_the_unrolled_collect_gives_the_loops_keys(alice):
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    p, q = x.send(alice), y.send(alice)
    g = torch.randn(3, 4, requires_grad=True).send(alice)
    for args in [(p, q), (p, p), (q, p), (p, 2.0), (p, 2), (p, True), (p, None), (p, torch.float64), (p, "x"),
                 (g, p), (p, g)]:
        tensors, key = shape_inference.collect(args, {})
        # the loop's answer: the same call with a third argument, the key's first five elements then
        loop_tensors, loop_key = shape_inference.collect(args + (1.5,), {})
        assert tensors == loop_tensors[:len(tensors)] and key == loop_key[:5], args
    # anything else still takes the loop (or the general path): a local tensor, kwargs, three arguments
    assert shape_inference.collect((p, x), {})[1] is not None
    assert shape_inference.collect((x, p), {})[0] == [x, p]
    assert shape_inference.collect((p, q), {"alpha": 2})[1][-3:] == ("alpha", int, 2)


def test_keys_of_different_calls_differ(alice):
    p, q = torch.randn(3, 4).send(alice), torch.randn(4, 3).send(alice)
    keys = [shape_inference.collect(args, {})[1] for args in [(p, p), (p, q), (q, p), (p, 2.0), (p, 2), (p, True)]]
    assert len(set(keys)) == len(keys)


def _fields(ptr):
    d = dict(ptr.__dict__)
    d.pop("_pid", None)  # the display id is drawn when first read
    return d


@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_result_pointer_has_the_attributes_new_gives_it(alice, requires_grad):
    x = torch.randn(3, 4, requires_grad=requires_grad)
    p = x.send(alice)
    r = p * 2  # one new tensor: made from the template's ``one``
    assert type(r) is PointerTensor and r.shape == (3, 4) and r.dtype == torch.float32
    assert r.requires_grad == requires_grad
    op = remote_ops._OPS_BY_FUNC.get(torch.Tensor.__mul__)
    assert shape_inference.infer(op, (p, 2), {}, [p], shape_inference.collect((p, 2), {})[1]).one is not None
    made = remote_ops._new_pointer(PointerTensor, r.location, r.id_at_location, r.owner, (3, 4), torch.float32,
                                   requires_grad, True, (), "", True)
    made.mark_freed()  # (a second pointer to r's object: it must not free it)
    expected = _fields(made)
    expected["_freed"] = False
    if requires_grad:  # a non-leaf of the remote graph: call() records its leaves
        expected["_leafs"] = r.__dict__["_leafs"]
    assert _fields(r) == expected
    assert torch.allclose(r.get(), x.detach() * 2)


def test_pointer_display_ids_are_drawn_once_and_differ(alice):
    p = torch.randn(2).send(alice)
    a, b = p + p, p + p
    assert "_pid" not in a.__dict__
    assert a.id == a.id and a.id != b.id and str(a.id) in repr(a)
    a.id = 12345
    assert a.id == 12345


def test_results_of_the_shortcut_match_pytorch(alice):
    x, y = torch.randn(8, 13), torch.randn(8, 13)
    p, q = x.send(alice), y.send(alice)
    for _ in range(3):  # the first call fills the cache, the next ones are answered from it
        assert torch.allclose((p + q).get(), x + y)
        assert torch.allclose((p * p).get(), x * x)
        assert torch.allclose((q - 1.5).get(), y - 1.5)
        assert torch.allclose(torch.matmul(p, q.t()).get(), x @ y.t())


@pytest.mark.parametrize("prelude", [None, [], [new_id()], [new_id(), new_id(), 7]])
def test_the_framer_writes_serialize_skeletons_bytes(prelude):
    framer = SkeletonFramer("me")
    for k, ids, out in [(0, [new_id()], [new_id()]), (5, [new_id(), 3], []), (300, [2**64 - 1, 1], [new_id()])]:
        assert framer.use(prelude, k, ids, out) == serialize_skeleton("me", prelude, k, ids, out, None)


def test_the_framer_falls_back_for_preludes_msgpack_cannot_pack_natively():
    framer = SkeletonFramer("me")
    prelude = [["Tensor.add", [torch.ones(2)], {}, [5], False]]  # a deferred command with a tensor
    assert framer.use(prelude, 1, [2], [3]) == serialize_skeleton("me", prelude, 1, [2], [3], None)
    assert framer.use([4], 1, [2], [3]) == serialize_skeleton("me", [4], 1, [2], [3], None)  # still usable


def test_the_turn_lock_is_exclusive_and_hands_over_to_waiters():
    lock = FairLock()
    assert lock.try_acquire() and not lock.try_acquire()
    got = []
    waiter = threading.Thread(target=lambda: (lock.acquire(), got.append(1), lock.release()))
    waiter.start()
    while not lock._waiters:  # the waiter queued itself
        pass
    lock.release()  # handed over: still held for the waiter, so the fast path is refused meanwhile
    waiter.join()
    assert got == [1] and lock.try_acquire()
    lock.release()
    assert not lock._held


@pytest.mark.parametrize("prelude", [None, [new_id()]])
def test_a_decoded_skeleton_use_equals_the_general_decoders(prelude):
    from veil.messaging.serde import deserialize
    from veil.messaging.skeleton_frames import decode_skeleton_use

    data = serialize_skeleton("me", prelude, 3, [new_id(), 5], [new_id()], None)
    fast, general = decode_skeleton_use(data), deserialize(data)
    assert fast == general and type(fast[0]) is type(general[0])
    assert vars(fast[0]) == vars(general[0])


OPERATORS = [
    ("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b), ("/", lambda a, b: a / b),
    ("@", lambda a, b: a @ b),
]


@pytest.mark.parametrize("name,op", OPERATORS)
def test_operators_match_pytorch_for_every_operand_kind(alice, name, op):
    x, y = torch.randn(4, 4), torch.randn(4, 4) + 3
    p, q = x.send(alice), y.send(alice)
    pairs = [(p, q, x, y), (p, p, x, x), (q, p, y, x),  # pointers (the operator's own path)
             (p, y, x, y), (y, p, y, x)]  # a local tensor on either side (torch's path)
    if name != "@":
        pairs += [(p, 2, x, 2), (p, 0.5, x, 0.5), (3, p, 3, x), (1.5, q, 1.5, y)]
    if name in "+*":  # (torch refuses to subtract or divide by a bool)
        pairs += [(p, True, x, True), (False, p, False, x)]
    for a, b, ea, eb in pairs:
        r = op(a, b)
        assert type(r) is PointerTensor, (name, type(a), type(b))
        assert torch.allclose(r.get(), op(ea, eb)), (name, type(a), type(b))


class _PassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_operators_send_what_torch_would_send(alice, monkeypatch):
    """The operator's path calls ``call`` with the op and arguments __torch_function__ gets from torch."""
    p, q = torch.randn(3).send(alice), torch.randn(3).send(alice)
    calls = []
    real = remote_ops.call
    monkeypatch.setattr(remote_ops, "call", lambda op, args, kwargs, location=None: (
        calls.append((op.name, args, kwargs)), real(op, args, kwargs, location))[1])
    for expr in (lambda: p + q, lambda: 2 + p, lambda: p * 3.0, lambda: 3 * p, lambda: p - q, lambda: p / 2):
        expr()
    via_operators = list(calls)
    calls.clear()
    with _PassThrough():  # a torch-function mode: torch's own path (the mode sees every op)
        for expr in (lambda: p + q, lambda: 2 + p, lambda: p * 3.0, lambda: 3 * p, lambda: p - q, lambda: p / 2):
            expr()
    assert via_operators == calls
    assert [c[0] for c in calls] == ["Tensor.add", "Tensor.add", "Tensor.mul", "Tensor.mul", "Tensor.sub",
                                     "Tensor.div"]


def test_operators_skip_torchs_dispatch_only_for_pointers_and_numbers(alice, monkeypatch):
    p = torch.randn(3).send(alice)
    seen = []
    real = PointerTensor.__torch_function__.__func__
    monkeypatch.setattr(PointerTensor, "__torch_function__", classmethod(
        lambda cls, func, types, args=(), kwargs=None: (seen.append(func), real(cls, func, types, args, kwargs))[1]))
    p + p
    p * 2
    assert seen == []  # the operators' own path
    p + torch.ones(3)
    assert seen == [torch.Tensor.add]  # a local tensor: torch's path, as before
    with pytest.raises(TypeError):
        p + "a"  # torch's own answer for operands it does not take


def test_protocol_arguments_carry_the_pointers_encoded_reference(alice, monkeypatch):
    """The party runtime's wire form of a step's arguments names each pointer's object as the
    plain-op path does (an ObjectRef already encoded): it decodes to the same ObjectRefs, and a
    request holding only such references packs without calling back into serde's encoder."""
    from veil.messaging import messages as m
    from veil.messaging import serde
    from veil.mpc.party import OpenMessage
    from veil.tensors.mpc_glue.runtime import _wire

    p, q = torch.randn(2, 3).send(alice), torch.randn(3).send(alice)
    args = (p, [q, (p, 3)], {"k": q, "n": 2})
    wired = _wire(args)
    want = (m.ObjectRef(p.id_at_location), [m.ObjectRef(q.id_at_location), (m.ObjectRef(p.id_at_location), 3)],
            {"k": m.ObjectRef(q.id_at_location), "n": 2})
    assert serde.decode_value(serde.encode_value(wired)) == want
    calls = []
    real_default = serde._default
    monkeypatch.setattr(serde, "_default", lambda obj: calls.append(type(obj)) or real_default(obj))
    data = serde.serialize(OpenMessage("beaver_mask", [_wire(p), _wire(q)], {}), sender="me")
    msg, _, _ = serde.deserialize(data, serde.DecodeContext())
    assert list(msg.args) == [m.ObjectRef(p.id_at_location), m.ObjectRef(q.id_at_location)] and calls == []
    # the encoder is still what a plain ObjectRef goes through (the check above would see it)
    serde.serialize(OpenMessage("beaver_mask", [m.ObjectRef(p.id_at_location)], {}), sender="me")
    assert calls == [m.ObjectRef]


def test_small_tensors_decode_without_warnings_and_own_their_memory():
    """Tensors below the adopt size are copied out of the frame (the frame's buffer may be reused)."""
    import warnings

    from veil.messaging import serde

    x = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    frame = bytearray(serde.encode_value([x, x.double()]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = serde.decode_value(bytes(frame))
    assert torch.equal(a, x) and torch.equal(b, x.double())
    a.add_(1)  # writable, and not the frame's memory
    assert torch.equal(serde.decode_value(bytes(frame))[0], x)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_pointer_meta_is_what_the_tensor_properties_say(alice, requires_grad):
    from veil.tensors.mpc_glue.runtime import WorkerRuntime
    from veil.tensors.pointer import pointer_meta

    p = torch.randn(2, 5, requires_grad=requires_grad).send(alice)
    q = (p * 2).detach() if requires_grad else p.long()
    for ptr in (p, q):
        assert pointer_meta(ptr) == (tuple(ptr.shape), ptr.dtype, ptr.requires_grad)
        assert WorkerRuntime().describe(ptr) == (tuple(ptr.shape), ptr.dtype)
