"""Red team, wire format: hostile raw frames (out-of-band tensor frames, truncated, oversized, garbage)
and aliasing of received tensors. Each frame gets a one-line SerializationError, nothing is stored or
changed, and the worker keeps serving. Written against raw bytes so it holds for any framing
(``0xC1 | u32 header length | msgpack header | raw tensor bytes``, veil/messaging/serde.py)."""

import struct

import msgpack
import pytest
import torch

from veil.exceptions import SerializationError
from veil.messaging import messages as m
from veil.messaging.serde import WIRE_VERSION, deserialize, serialize

MAGIC = b"\xc1"


def _oob(dtype: str, shape: list, n: int, rg: bool = False) -> msgpack.ExtType:
    return msgpack.ExtType(12, msgpack.packb([dtype, shape, rg, n]))


def _frame(header_fields: list, raw: bytes, header_len: int | None = None) -> bytes:
    header = msgpack.packb(header_fields, use_bin_type=True)
    n = len(header) if header_len is None else header_len
    return MAGIC + struct.pack("<I", n) + header + raw


def _cmd(args: list, ids: list | None = None) -> list:
    """A CommandMessage array [version, type, sender, prelude, op, args, kwargs, return_ids, grad]."""
    return [WIRE_VERSION, m.CommandMessage.TYPE, "x", [], "torch.add", args, {}, ids, False]


HOSTILE = {
    "frame shorter than its length field": MAGIC + b"\x01\x00",
    "header length beyond the frame": _frame(_cmd([1, 2]), b"", header_len=10_000),
    "header length 0": MAGIC + b"\x00\x00\x00\x00" + b"\x00" * 8,
    "tensor bytes missing": _frame(_cmd([_oob("float32", [4], 16), 1.0], [11]), b"\x00" * 8),
    "second tensor truncated": _frame(_cmd([_oob("float32", [2], 8), _oob("float32", [2], 8)], [12]),
                                      b"\x00" * 12),
    "trailing bytes nobody refers to": _frame(_cmd([_oob("float32", [1], 4), 1.0], [13]), b"\x00" * 4 + b"junk"),
    "length disagrees with shape": _frame(_cmd([_oob("float32", [4], 8), 1.0], [14]), b"\x00" * 8),
    "huge shape, tiny frame": _frame(_cmd([_oob("float32", [2**31, 2**31], 2**64 - 1), 1.0], [15]), b""),
    "negative dimension": _frame(_cmd([_oob("float32", [-4], 16), 1.0], [16]), b"\x00" * 16),
    "unknown dtype": _frame(_cmd([_oob("object", [1], 8), 1.0], [17]), b"\x00" * 8),
    "requires_grad on integers": _frame(_cmd([_oob("int64", [1], 8, True), 1], [18]), b"\x00" * 8),
    "malformed oob header": _frame(_cmd([msgpack.ExtType(12, b"\xc1\xc1"), 1], [19]), b""),
    "oob tensor nested in a tuple": _frame(
        _cmd([msgpack.ExtType(8, msgpack.packb([_oob("float32", [1], 4)])), 1.0], [20]), b"\x00" * 4),
    "oob tensor in an unframed message": msgpack.packb(_cmd([_oob("float32", [1], 4), 1.0], [21])),
    "garbage after the magic byte": MAGIC + bytes(range(256)) * 4,
    "only the magic byte": MAGIC,
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frames_fail_cleanly_in_process(name):
    with pytest.raises(SerializationError):
        deserialize(HOSTILE[name])


def test_hostile_frames_against_a_network_worker(spawn, raw, connect, hook):
    from network_helpers import ADMIN, base_args

    from veil.workers.websocket_admin import AdminLoadMessage, AdminObjectsMessage

    wp = spawn("alice", base_args())
    me = hook.local_worker
    admin = connect(wp, token=ADMIN, id="alice-admin")
    secret = torch.tensor([3.0, 1.0, 4.0, 1.0])
    oid = me.send_msg(AdminLoadMessage(secret.clone(), ["#s"], "", True, []), admin).objects[0]
    send = raw(wp)
    for name, frame in sorted(HOSTILE.items()):
        reply = deserialize(send(frame))[0]
        assert type(reply) is m.ErrorReply and reply.error == "SerializationError", (name, reply)
        assert "\n" not in reply.message and len(reply.message) < 500, name
    # nothing was stored under any of the ids, the owner's tensor is bit-identical, the worker serves
    listed = deserialize(send(serialize(m.ListObjectsMessage())))[0]
    assert listed.descriptors == []
    assert torch.equal(me.send_msg(AdminObjectsMessage([oid]), admin).objects[0], secret)
    ok = deserialize(send(serialize(m.CommandMessage("torch.add", [torch.ones(2), 1.0], {}, None))))[0]
    assert type(ok) is m.ResultReply


def test_a_received_tensor_aliases_nothing_the_sender_can_change(hook):
    """A tensor decoded from a frame owns its memory: changing (or replaying) the frame's buffer later
    changes nothing the worker stored."""
    import veil as sy

    w = sy.VirtualWorker(hook, id="alias-w")
    payload = torch.arange(64, dtype=torch.float32)
    data = bytearray(serialize(m.ObjectMessage([m.StoredObject(77, payload)])))
    msg = deserialize(data)[0]
    stored = msg.objects[0].obj
    for i in range(len(data)):
        data[i] = 0xFF
    assert torch.equal(stored, payload)
    cmd = bytearray(serialize(m.CommandMessage("torch.mul", [payload, 2.0], {}, None)))
    decoded = deserialize(cmd)[0].args[0]
    cmd[-8:] = b"\xff" * 8
    assert torch.equal(decoded, payload)
    decoded.add_(1)  # and writing to it does not write into the received buffer either
    assert deserialize(serialize(m.CommandMessage("torch.mul", [payload, 2.0], {}, None)))[0].args[0].equal(payload)
    w.monitor  # noqa: B018  (the worker is only here to register the hook context)
