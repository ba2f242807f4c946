"""Framed messages: tensor bytes out of band after the header (serde's one-copy wire format).

Round trips of nested structures with tensors of every dtype, decoded tensors that
own their memory, and hostile frames (truncated, lying lengths, misplaced
out-of-band tensors, trailing bytes) that must end in SerializationError only.
"""

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_serde import _same, tensors, values

from veil.exceptions import SerializationError
from veil.messaging import messages as m
from veil.messaging.serde import (DTYPES, EXT_CODES, FRAME_MAGIC, MAX_EXT_DEPTH, decode_value, deserialize,
                                  WIRE_VERSION, encode_value, envelope, serialize)


def _frame(header_value, raw: bytes = b"") -> bytes:
    header = msgpack.packb(header_value)
    return FRAME_MAGIC + len(header).to_bytes(4, "little") + header + raw


def _oob(dtype: str, shape: list, nbytes: int, rg: bool = False) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_CODES.TENSOR_OOB, msgpack.packb([dtype, shape, rg, nbytes]))


def _reply(objects) -> list:
    return [WIRE_VERSION, m.ObjectsReply.TYPE, "w", [], objects]


# ------------------------------------------------------------ round trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(values, max_size=4), st.lists(tensors(), min_size=1, max_size=3))
def test_messages_with_tensors_round_trip_exactly(nested, top):
    objects = [*top, nested, {"t": top[0], "n": nested}]
    data = serialize(m.ObjectsReply(objects), sender="w")
    assert data[:1] == FRAME_MAGIC  # top-level tensors travel out of band
    back, sender, prelude = deserialize(data)
    assert sender == "w" and prelude == []
    assert _same(back.objects, objects)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_and_layout_round_trips_out_of_band(name):
    dtype = DTYPES[name]
    base = torch.arange(24).reshape(4, 6) % 2 if dtype == torch.bool else torch.arange(24.0).reshape(4, 6)
    base = base.to(dtype)
    cases = [base, base.t(), base[:, ::2], base[1:3], torch.empty(0, 3, dtype=dtype), base[0, 0],
             base[:1, :1].expand(3, 5)]
    back = deserialize(serialize(m.ObjectsReply(cases)))[0].objects
    for a, b in zip(cases, back):
        assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)


def test_parameters_keep_requires_grad_and_computed_results_arrive_as_data():
    p = torch.nn.Parameter(torch.randn(3, 2))
    y = (p * 2).sum()
    back = deserialize(serialize(m.ObjectsReply([p, y])))[0].objects
    assert back[0].requires_grad and back[0].is_leaf and torch.equal(back[0], p.detach())
    assert not back[1].requires_grad and torch.equal(back[1], y.detach())


def test_sent_objects_travel_out_of_band():
    t = torch.randn(5, 3)
    msg = m.ObjectMessage([m.StoredObject(7, t, ("#a",), "d", ("bob",)), m.StoredObject(8, (t,), (), "", None)])
    data = serialize(msg, sender="c")
    assert data[:1] == FRAME_MAGIC and len(data) < 5 * 3 * 4 + 200  # the bytes once, not in band as well
    back = deserialize(data)[0].objects
    assert back[0].id == 7 and back[0].tags == ("#a",) and back[0].allowed_users == ("bob",)
    assert torch.equal(back[0].obj, t) and torch.equal(back[1].obj[0], t)
    # a StoredObject that is not among the message's own fields does not open out-of-band decoding
    inner = msgpack.ExtType(EXT_CODES.STORED_OBJECT, msgpack.packb([1, _oob("float32", [1], 4), [], "", None]))
    with pytest.raises(SerializationError, match="outside a framed message"):
        deserialize(_frame(_reply([msgpack.ExtType(EXT_CODES.TUPLE, msgpack.packb([inner]))]), bytes(4)))
    assert deserialize(_frame(_reply([inner]), bytes(4)))[0].objects[0].obj.shape == (1,)


def test_messages_without_top_level_tensors_are_plain_msgpack():
    data = serialize(m.ObjectsReply([1, "x", (torch.ones(2),)]))  # the tensor is inside a tuple ext payload
    assert data[:1] != FRAME_MAGIC
    assert torch.equal(deserialize(data)[0].objects[2][0], torch.ones(2))


def test_decoded_tensors_own_their_memory():
    sent = torch.arange(6.0)
    data = serialize(m.ObjectsReply([sent, sent]))
    frozen = bytes(data)
    first = deserialize(data)[0].objects
    first[0].add_(100)  # writes land in the tensor's own memory ...
    assert data == frozen  # ... not in the frame,
    second = deserialize(data)[0].objects
    assert torch.equal(second[0], torch.arange(6.0)) and torch.equal(first[1], torch.arange(6.0))  # nor elsewhere
    assert first[0].untyped_storage().data_ptr() != second[0].untyped_storage().data_ptr()
    sent.add_(1)  # the sender changing its tensor afterwards changes nothing received
    assert torch.equal(second[1], torch.arange(6.0))


def test_envelope_reads_the_type_without_building_objects():
    data = serialize(m.CommandMessage("torch.add", (m.ObjectRef(5), torch.ones(2)), {}, [7], False), sender="c")
    env = envelope(data)
    assert env[:5] == [WIRE_VERSION, m.CommandMessage.TYPE, "c", [], "torch.add"]
    assert env[5] == [None, None]


# ---------------------------------------------------------- hostile frames


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(tensors(), min_size=1, max_size=3), st.data())
def test_truncated_and_mutated_frames_give_clean_errors(top, data):
    raw = serialize(m.ObjectsReply([*top, [top[0]]]), sender="x")
    cut = data.draw(st.integers(0, len(raw)))
    mutated = bytearray(raw[:cut])
    for _ in range(data.draw(st.integers(0, 3))):
        if mutated:
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    try:
        deserialize(bytes(mutated))
    except SerializationError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_behind_the_frame_magic_give_clean_errors(tail):
    try:
        deserialize(FRAME_MAGIC + tail)
    except SerializationError:
        pass


@pytest.mark.parametrize("frame, match", [
    (FRAME_MAGIC, "truncated"),
    (FRAME_MAGIC + b"\x01\x00", "truncated"),
    (FRAME_MAGIC + (2**31).to_bytes(4, "little") + b"\x90", "exceeds"),
    # a shape that claims a terabyte, with a length that matches it: refused before any allocation
    (_frame(_reply([_oob("float32", [2**18, 2**20], 2**40)]), b"\x00" * 16), "does not match"),
    # a byte length that disagrees with the shape
    (_frame(_reply([_oob("float32", [4], 8)]), b"\x00" * 8), "does not match"),
    # more raw bytes than the tensors use
    (_frame(_reply([_oob("float32", [2], 8)]), b"\x00" * 9), "no field refers to"),
    # unknown dtype, negative dimension, bad requires_grad
    (_frame(_reply([_oob("object", [1], 8)]), b"\x00" * 8), "dtype"),
    (_frame(_reply([_oob("float32", [-1], 0)])), "dimension"),
    (_frame(_reply([_oob("int64", [1], 8, rg=True)]), b"\x00" * 8), "requires_grad"),
    (_frame(_reply([msgpack.ExtType(EXT_CODES.TENSOR_OOB, msgpack.packb(["float32", [1], False]))]), bytes(4)),
     "header"),
])
def test_hostile_frames_are_refused(frame, match):
    with pytest.raises(SerializationError, match=match):
        deserialize(frame)


def test_out_of_band_tensors_only_at_a_frames_top_level():
    oob = _oob("float32", [1], 4)
    # in an unframed message
    with pytest.raises(SerializationError, match="outside a framed message"):
        deserialize(msgpack.packb(_reply([oob])))
    # nested inside another ext payload (a tuple) of a framed message
    nested = msgpack.ExtType(EXT_CODES.TUPLE, msgpack.packb([oob]))
    with pytest.raises(SerializationError, match="outside a framed message"):
        deserialize(_frame(_reply([nested]), bytes(4)))
    # in a stored value (persistence, plans)
    with pytest.raises(SerializationError, match="outside a framed message"):
        decode_value(msgpack.packb(oob))


def test_depth_limit_holds_inside_frames():
    inner = msgpack.packb([])
    for _ in range(MAX_EXT_DEPTH + 50):
        inner = msgpack.packb([msgpack.ExtType(EXT_CODES.TUPLE, inner)])
    frame = _frame(_reply([_oob("float32", [1], 4), msgpack.ExtType(EXT_CODES.TUPLE, inner)]), bytes(4))
    with pytest.raises(SerializationError, match="nested deeper"):
        deserialize(frame)


def test_values_for_persistence_stay_in_band():
    t = torch.randn(3)
    data = encode_value([t, {"a": t}])
    assert data[:1] != FRAME_MAGIC
    assert torch.equal(decode_value(data)[0], t)
