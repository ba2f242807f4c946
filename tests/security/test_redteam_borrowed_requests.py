"""Red team: in-process requests decoded in place (``veil.workers.virtual.borrows_only``).

A VirtualWorker normally copies a large request's tensors once so that nothing it stores shares the
requester's memory. A request made only of protocol steps that read their tensors and return fresh
ones (``veil.mpc.party.BORROWS``: a Beaver combine with the opened e and f, a truncation finish with
the opened c) skips that copy. A hostile requester tries to get the skip for a request that writes
into or keeps its tensors (an in-place op, a send, a step outside the list, a forged or malformed
header) and to read or change what the worker stored through its own memory afterwards; the worker
must copy those, keep its objects apart from the requester's buffers, and keep serving.
"""

from __future__ import annotations

import numpy as np
import torch

import veil as sy
from veil.messaging import messages as m
from veil.messaging.serde import FRAME_MAGIC, serialize
from veil.mpc.party import BORROWS, WIRE_PREFIX, OpenMessage
from veil.ids import new_id
from veil.tensors.pointer import PointerTensor
from veil.tensors.remote_ops import _ref
from veil.workers.virtual import borrows_only

BIG = 1 << 16  # int64 entries: 512 KiB, far above ADOPT_MIN_BYTES


def _head(msg, prelude=None):
    parts = serialize(msg, sender="eve", prelude=prelude, parts_over=0)
    return parts[0] if isinstance(parts, list) else parts


def _spans(buffers):
    """(start, end) addresses of the buffers a request's tensor parts view."""
    out = []
    for b in buffers:
        a = np.frombuffer(memoryview(b).cast("B"), dtype=np.uint8)
        out.append((a.ctypes.data, a.ctypes.data + a.nbytes))
    return out


def _stored_tensors(worker):
    return [e.obj for space in worker.monitor._store._spaces.values() for e in space.values()
            if isinstance(e.obj, torch.Tensor) and e.obj.numel()]


def test_only_requests_of_borrowing_steps_are_read_in_place():
    e, f = torch.randint(-2**62, 2**62, (BIG,)), torch.randint(-2**62, 2**62, (BIG,))
    combine = [WIRE_PREFIX + "beaver_combine", [e, f], {}, [7], False]
    assert {"beaver_combine", "trunc_finish", "trunc_finish_bits", "beaver_mask", "trunc_mask"} <= BORROWS
    assert borrows_only(_head(OpenMessage("trunc_mask", (), {}), [combine, 5, 6]))
    assert borrows_only(_head(m.DeleteMessage([]), [combine]))
    # anything else keeps its copy: a torch op (it may write in place), a step outside the list, a command
    # message, a skeleton use, an op name without the protocol prefix, a malformed header
    opening = OpenMessage("trunc_mask", (), {})
    assert not borrows_only(_head(opening, [["Tensor.add_", [e, f], {}, [8], False]]))
    assert not borrows_only(_head(opening, [[WIRE_PREFIX + "sgd_apply", [e], {}, [8], False]]))
    assert not borrows_only(_head(OpenMessage("cmp_select", (e,), {})))
    assert not borrows_only(_head(m.CommandMessage(WIRE_PREFIX + "beaver_combine", [e, f], {}, [9], False)))
    assert not borrows_only(_head(OpenMessage("trunc_mask", (), {}), [[3, [1, 2], [4]]]))
    assert not borrows_only(_head(OpenMessage("trunc_mask", (), {}), [["beaver_combine", [e], {}, [8], False]]))
    assert not borrows_only(FRAME_MAGIC + (1 << 30).to_bytes(4, "little") + b"\x94")
    assert not borrows_only(b"\xc1garbage")


def test_a_borrowing_step_whose_keyword_arguments_carry_a_tensor_or_a_reference_keeps_its_copy():
    """Finding (s43 red team): ``beaver_combine`` forwarded its ``op_kwargs`` to the op, so ``out=`` made
    it write into a buffer the request handed over in place. The step refuses such arguments now
    (``ring.op_arguments``; tests/security/test_redteam_s43_borrowed_out.py), and a request whose keyword
    arguments carry any tensor or reference is not read in place at all."""
    e, f = torch.randint(-2**62, 2**62, (BIG,)), torch.randint(-2**62, 2**62, (BIG,))
    opening = OpenMessage("trunc_mask", (), {})

    def combine(kwargs):
        return [WIRE_PREFIX + "beaver_combine", [e, f], kwargs, [7], False]

    # a convolution's geometry (tuples of ints) still borrows: the CNN's products stay copy-free
    conv = {"op": "conv2d", "first": True, "op_kwargs": {"stride": (1, 1), "padding": (2, 2), "groups": 1}}
    assert borrows_only(_head(opening, [combine(conv)]))
    sink = torch.zeros(BIG, dtype=torch.int64)
    for hostile in ({"op": "mul", "first": False, "op_kwargs": {"out": sink}},
                    {"op": "mul", "first": False, "op_kwargs": {"out": (sink,)}},  # hidden in a tuple
                    {"op": "mul", "first": False, "op_kwargs": {"out": m.ObjectRef(5)}},
                    {"op": "mul", "first": False, "op_kwargs": [[["out", [sink]]]]}):
        assert not borrows_only(_head(opening, [combine(hostile)])), hostile
    assert not borrows_only(_head(OpenMessage("trunc_mask", (), {"shift": sink})))


def test_a_hostile_in_place_op_riding_with_a_borrowing_step_never_shares_the_requesters_memory(hook):
    alice = sy.VirtualWorker(hook, id="alice_borrow")
    me = hook.local_worker
    secret = torch.randint(-2**40, 2**40, (BIG,))
    stored = secret.send(alice)
    mine = torch.zeros(BIG, dtype=torch.int64)
    # the requester's own tensor as self of an in-place add with the stored object, in front of a borrowing
    # step: were it read in place, the stored result would be the requester's buffer holding the secret
    out_id = new_id()
    me.defer(alice, ["Tensor.add_", [mine, _ref(stored)], {}, [out_id], False])
    me.flush(alice)  # the batch goes as a DeleteMessage prelude (a message borrows_only accepts)
    assert torch.equal(mine, torch.zeros(BIG, dtype=torch.int64))  # nothing written into the requester's buffer
    result = PointerTensor(alice, out_id, me, (BIG,), torch.int64)
    mine += 5  # and changing it afterwards changes nothing stored
    assert torch.equal(result.get(), secret)
    assert torch.equal(stored.get(), secret)  # the owner's object unchanged, the worker still serving


def test_borrowed_opened_values_leave_no_stored_object_aliasing_the_requester(hook):
    parties = [sy.VirtualWorker(hook, id=f"borrow{i}") for i in range(2)]
    cp = sy.VirtualWorker(hook, id="borrow_cp")
    x, y = torch.randn(300, 300), torch.randn(300, 300)
    sx = x.fix_precision().share(*parties, crypto_provider=cp)
    sy_ = y.fix_precision().share(*parties, crypto_provider=cp)
    sent = []
    for w in parties:
        real = w._recv_msg

        def recv(data, real=real):
            if isinstance(data, list) and borrows_only(data[0]):
                sent.extend(data[1:])  # (kept alive: their addresses cannot be reused meanwhile)
            return real(data)

        w._recv_msg = recv
    z = sx @ sy_
    z.child  # noqa: B018  (pays the truncation: its opening carries the combine, the next one its finish)
    w2 = sx * sy_
    w2.child  # noqa: B018
    assert len(sent) >= 3  # e, f and c crossed without a copy
    sent = _spans(sent)
    for w in parties:  # nothing a party keeps lies inside a buffer the orchestrator sent
        for t in _stored_tensors(w):
            lo = t.untyped_storage().data_ptr()
            hi = lo + t.untyped_storage().nbytes()
            assert all(hi <= a or lo >= b for a, b in sent)
    assert torch.allclose(z.get().float_precision(), x @ y, atol=5e-2)
    assert torch.allclose(w2.get().float_precision(), x * y, atol=1e-2)
