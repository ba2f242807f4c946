"""Decoding depth limit: nested ext payloads fail with SerializationError, never SIGSEGV.

Each nested ext payload (a tuple in a tuple ...) is a nested call into msgpack's C
unpacker; ~1 KB of a few hundred levels used to overflow the C stack and kill the
process (worker, serving worker, or a client decoding a hostile reply).
"""

import subprocess
import sys
import textwrap

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.exceptions import SerializationError
from veil.messaging import messages as m
from veil.messaging.serde import EXT_CODES, MAX_EXT_DEPTH, decode_value, deserialize, serialize
from veil.messaging.serde import WIRE_VERSION


def nested_tuple_payload(depth: int) -> bytes:
    """``depth`` TUPLE ext payloads, each holding the next one, as raw msgpack."""
    inner = msgpack.packb([])
    for _ in range(depth):
        inner = msgpack.packb([msgpack.ExtType(EXT_CODES.TUPLE, inner)])
    return inner


def hostile_command(depth: int) -> bytes:
    """A CommandMessage frame whose only argument is ``depth`` nested tuples."""
    return msgpack.packb([WIRE_VERSION, m.CommandMessage.TYPE, "x", [], "torch.add",
                          [msgpack.ExtType(EXT_CODES.TUPLE, nested_tuple_payload(depth))], {}, None, False])


def nested(depth: int):
    v = ()
    for _ in range(depth):
        v = (v,)
    return v


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3000))
def test_nested_tuples_decode_or_fail_cleanly(depth):
    frame = hostile_command(depth)
    if depth < MAX_EXT_DEPTH - 2:
        msg, _, _ = deserialize(frame)
        assert msg.args[0] == nested(depth)
    elif depth >= MAX_EXT_DEPTH:
        with pytest.raises(SerializationError, match="nested deeper"):
            deserialize(frame)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 400))
def test_encoding_has_the_same_limit_and_roundtrips_below_it(depth):
    msg = m.CommandMessage("torch.add", (nested(depth),), {})
    try:
        data = serialize(msg)
    except SerializationError:
        assert depth >= MAX_EXT_DEPTH - 2
        return
    assert deserialize(data)[0].args[0] == nested(depth)


def test_decode_value_is_limited_too():
    with pytest.raises(SerializationError):
        decode_value(msgpack.packb(msgpack.ExtType(EXT_CODES.TUPLE, nested_tuple_payload(5000))))


def test_depth_counter_resets_after_a_failure():
    with pytest.raises(SerializationError):
        deserialize(hostile_command(500))
    assert deserialize(hostile_command(3))[0].args[0] == nested(3)


def test_deep_nesting_does_not_crash_a_process():
    """The exact crash of the finding (1 KB, a few hundred levels) in a fresh interpreter."""
    code = textwrap.dedent("""
        import sys
        import msgpack
        from veil.exceptions import SerializationError
        from veil.messaging.serde import WIRE_VERSION, deserialize
        def hostile_command(depth):  # a TUPLE ext (code 7) in a TUPLE ext ..., as a command argument
            inner = msgpack.packb([])
            for _ in range(depth):
                inner = msgpack.packb([msgpack.ExtType(7, inner)])
            return msgpack.packb([WIRE_VERSION, 1, "x", [], "torch.add", [msgpack.ExtType(7, inner)], {}, None, False])
        for depth in (200, 300, 1000, 20000):
            try:
                deserialize(hostile_command(depth))
            except SerializationError:
                pass
            else:
                sys.exit(3)
        print("survived")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "survived" in out.stdout


def test_client_decoding_a_hostile_reply_fails_cleanly():
    """A worker (or a man in the middle) answering with deep nesting: the client raises, it does not crash."""
    import torch

    import veil as sy

    hook = sy.TorchHook(torch)
    me = sy.VirtualWorker(hook, id="depth-client")
    hostile = sy.VirtualWorker(hook, id="depth-hostile")
    reply = msgpack.packb([WIRE_VERSION, m.ObjectsReply.TYPE, "depth-hostile", [],
                           [msgpack.ExtType(EXT_CODES.TUPLE, nested_tuple_payload(400))]])
    hostile._recv_msg = lambda data: reply
    with pytest.raises(SerializationError, match="nested deeper"):
        me.send_msg(m.GetObjectsMessage([1]), hostile)
