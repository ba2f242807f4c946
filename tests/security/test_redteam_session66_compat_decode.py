"""Red team (session 66): ``veil.compat.decode`` and ``veil.compat.encode`` (``ptr.float_precision()`` and
``ptr.fix_precision()`` on the worker that holds the values, ``veil/compat/remote_fixed_precision.py``).

Both are sized against the session's room before they run: the input as materialized (an expanded view's 8 bytes
an element, the generic worker-function check) and the result (``encoding_guards.check_room``: a float16 decode 2
bytes an element). But they computed the result whole: a decode makes ``q``, ``q * scale``, ``r`` and float64 copies
of the input's size, an encode a float64 copy and its rounding: ~40 bytes an element live at once for a float16
decode (measured at 2^24 elements: 640 MiB for a 32 MiB result), 4x the 10 the quota checked; an encode ~3x. Hole
found (resources): the quota bounded what the request keeps, not what computing it took, by a factor the requester
picks with the dtype. Fixed in the shared layer of the compat functions (``encoding_guards.piecewise``): the result is
the only allocation of the input's size; the rest is computed 2^16 elements at a time (and ~3x faster).

Harness: a ``WebsocketServerWorker`` in process (requests through ``serve_bytes``, a network connection's path) with
a scientist token under a 16 MiB session quota. Allocations are observed by a dispatch mode around the request (the
bytes of op results alive at once), not by timing or RSS.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.mpc.encoding import FixedPointEncoding, decode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import uid  # noqa: E402
from server_sessions import answers_next_command, open_session, quota_worker, request  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

SCI = "rt66d-scientist-token-0123456789abcdef01"
N = 1 << 20  # elements the expanded view names
SCALE = 1 << 16


class Live(TorchDispatchMode):
    """The most bytes of tensors made by ops, alive at once, while it was active (views are not counted; a tensor
    stops counting when it is freed, which CPython does as its last reference goes)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t._is_view():
                nbytes = t.numel() * t.element_size()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._freed, nbytes)
        return out


#: what a piecewise computation may hold beside its result (a few float64 and int64 pieces of 2^16 elements)
PIECES = 4 << 20


@pytest.fixture
def worker(hook):
    srv = quota_worker(hook, uid("rt66d"), SCI, 16 << 20)
    return srv, open_session(srv, SCI)


def _stored(srv, s, op, *args) -> int:
    rid = new_id()
    reply = request(srv, s, m.CommandMessage(op, args, {}, [rid], False))
    assert type(reply) is m.OkReply, (op, reply)
    return rid


def _expanded(srv, s, value: torch.Tensor) -> int:
    """A stored view of ``N`` elements over one stored element."""
    one = new_id()
    assert type(request(srv, s, m.ObjectMessage([m.StoredObject(one, value)]))) is m.OkReply
    return _stored(srv, s, ALLOWLIST.by_func(torch.Tensor.expand).name, m.ObjectRef(one), N)


def _get(srv, s, oid) -> torch.Tensor:
    got = request(srv, s, m.GetObjectsMessage([oid], False, None))
    assert type(got) is m.ObjectsReply, got
    return got.objects[0]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_decoding_an_expanded_view_allocates_no_more_than_its_result(worker, dtype):
    """Attack: under a 16 MiB quota, the scientist decodes a stored 2^20-element expanded view of one encoded value
    to float16 (8 MiB for the view as materialized and a 2 MiB result: it fits). Before the fix the decode made 8 MiB
    int64 and float64 arrays, about five at a time; must hold: no op makes a tensor larger than the result, the value is plain torch's decode of the
    materialized view, and the worker serves the next command."""
    srv, s = worker
    encoded = torch.tensor([-(5 * SCALE) - 3], dtype=torch.int64)
    view = _expanded(srv, s, encoded)
    result_bytes = N * getattr(torch, dtype).itemsize
    with Live() as seen:
        out = _stored(srv, s, "veil.compat.decode", m.ObjectRef(view), 2, 16, dtype)
    assert seen.peak <= result_bytes + PIECES, (
        f"decoding a {result_bytes >> 20} MiB {dtype} result held {seen.peak >> 20} MiB of tensors at once")
    want = decode(encoded.expand(N).contiguous(), FixedPointEncoding(2, 16), getattr(torch, dtype))
    assert torch.equal(_get(srv, s, out), want)
    answers_next_command(srv, s)


def test_encoding_an_expanded_view_allocates_no_more_than_its_result(worker):
    """Attack: the same through ``veil.compat.encode`` of a 2^20-element float16 expanded view (2 MiB materialized,
    an 8 MiB int64 result). Must hold: what is alive at once is the result and a few pieces (a float64 copy of the
    input, its scaling and rounding were alive beside it), the value is plain torch's ``round(x * 2^16)``."""
    srv, s = worker
    one = new_id()
    assert type(request(srv, s, m.ObjectMessage([m.StoredObject(one, torch.tensor([-2.75], dtype=torch.float16))]))) \
        is m.OkReply
    view = _stored(srv, s, ALLOWLIST.by_func(torch.Tensor.expand).name, m.ObjectRef(one), N)
    with Live() as seen:
        out = _stored(srv, s, "veil.compat.encode", m.ObjectRef(view), 2, 16)
    assert seen.peak <= 8 * N + PIECES, f"encoding an 8 MiB result held {seen.peak >> 20} MiB of tensors at once"
    assert torch.equal(_get(srv, s, out), torch.full((N,), -2.75 * SCALE, dtype=torch.float64).to(torch.int64))
    answers_next_command(srv, s)


def test_a_decode_past_the_quota_is_still_refused_before_it_runs(worker):
    """Control: the sizes are still checked first: a float32 decode of a 2^21-element view (16 MiB materialized,
    an 8 MiB result) under the 16 MiB quota is refused in one line, nothing stored, and the worker serves on."""
    srv, s = worker
    one = new_id()
    assert type(request(srv, s, m.ObjectMessage([m.StoredObject(one, torch.tensor([SCALE]))]))) is m.OkReply
    view = _stored(srv, s, ALLOWLIST.by_func(torch.Tensor.expand).name, m.ObjectRef(one), 2 * N)
    reply = request(srv, s, m.CommandMessage("veil.compat.decode", (m.ObjectRef(view), 2, 16, "float32"), {},
                                             [new_id()], False))
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError" and "\n" not in reply.message, reply
    answers_next_command(srv, s)
