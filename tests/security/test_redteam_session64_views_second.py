"""Red team (session 64, second pass) of the fixes for stored views that stand for more entries than their storage
holds (``output_bounds.check_view_room`` from ``handlers._run_resolved``, ``_handle_get``/``_handle_move`` and
``OpeningRules.open_step``; ``beaver._check_work``): the same amplification (a request that makes far more than
the session holds, before the quota refuses anything) through other doors.

Attacks tried (a scientist's session on a network worker under a 1 MiB ``--max-session-mb``, raw messages):

* Holes this pass found, fixed in session 64 (``output_bounds.amplified_bytes``: each storage counted once, a
  broadcast past the largest operand; ``share_own`` checks its pieces):
  - a protocol step on two small plain tensors that broadcast, (N, 1) and (1, N): ``check_view_room`` charges views
    only, and a worker function is otherwise not sized before it runs: N x N made before the store refuses it
    (commands), or replied in full past the quota (openings: no mask when the operands are the session's own);
  - the same stored tensor named k times in a step's list argument (``product_join``, ``fss_mask``): charged its
    storage once, materialized k times (commands: k x storage made; openings: a k x storage reply). Commands do
    not apply ``get_ids.named_once`` at all, so k is bounded only by the frame size;
  - ``veil.compat.share_own`` names its value by a bare int id (not an ``ObjectRef``), so ``check_view_room`` never
    sees it: a 1-element ``expand`` to N x N is cut into N x N random pieces and sent to every peer party;
  - a get naming one plain tensor the 34 times ``get_ids.named_once`` allows: a 34 x quota reply.
* Withstood: overlapping windows (``Tensor.unfold``) and views of views (expand of a slice of an expand) are charged
  their logical size in a get and in a step; an expanded view nested in a step's list or keyword argument is
  charged; a 0-size expand is served; honest use is not refused (a get of a plain tensor near the quota, of a
  transposed or sliced view, of a view within the room; a Beaver mask step and opening on same-shaped tensors).
"""

from __future__ import annotations

import secrets
import sys
import types
from pathlib import Path

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.party import OpenMessage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import answers_next_command, computed, open_session, quota_worker, request, send_tensor  # noqa: E402

from aten_watch import LargestMade as _Largest  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

TOKEN = "rs64-views2-token-0123456789abcdef"
QUOTA = 1 << 20
I64 = torch.int64


@pytest.fixture
def served(hook):
    srv = quota_worker(hook, f"rs64-v2-{secrets.token_hex(3)}", TOKEN, QUOTA)
    s = open_session(srv, TOKEN)
    return srv, s


def _ref(srv, s, t) -> m.ObjectRef:
    return m.ObjectRef(send_tensor(srv, s, t))


def _refused_over_quota(reply) -> None:
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert "\n" not in reply.message.strip()


def _command(srv, s, name, args, nout=1, kwargs=None):
    seen = _Largest()
    with seen:
        reply = request(srv, s, m.CommandMessage(name, tuple(args), kwargs or {}, [new_id() for _ in range(nout)],
                                                 False))
    return reply, seen.most * 8


def _opened(reply) -> int:
    return sum(t.numel() * t.element_size() for t in getattr(reply, "objects", None) or ())


# ------------------------------------------------------------------ holes


# Fixed: broadcasting operands. A protocol step's operands are charged only what views stand for past their storage
# (check_view_room); two plain tensors of shapes (N, 1) and (1, N) (8 KiB at N = 512; 512 KiB at N = 65536) make an
# N x N result in fss_mask / beaver_mask / refresh-style steps (x - a, v + r broadcast), allocated in full (32 GiB at
# N = 65536) before the store refuses it. Impact: memory/CPU DoS of the worker from a session holding ~1 MiB.
# Fix: veil/workers/output_bounds.py check_view_room (or handlers._run_resolved): charge a step the broadcast shape
# of its elementwise operands, or refuse operands whose shapes differ where the honest step has equal shapes
# (beaver._minus, comparison._fss_mask, fixed_operand._mask...). Severity: high (unbounded factor N).
@pytest.mark.parametrize("step,nout", [("fss_mask", 1), ("beaver_mask", 2)])
def test_a_protocol_step_on_broadcasting_operands_is_sized_before_it_computes(served, step, nout):
    srv, s = served
    n = 512
    col, row = _ref(srv, s, torch.ones(n, 1, dtype=I64)), _ref(srv, s, torch.ones(1, n, dtype=I64))
    args = ([col], [row]) if step == "fss_mask" else (col, col, row, row)
    reply, made = _command(srv, s, "veil.mpc." + step, args, nout)
    assert type(reply) is m.ErrorReply, reply
    answers_next_command(srv, s)
    assert made <= QUOTA, f"{step} made {made >> 20} MiB from 16 KiB of operands under a 1 MiB quota"


# Fixed: the same through an opening: OpenMessage("fss_mask", ([col], [row])) replies N x N (2 MiB here, 32 GiB at
# N = 65536) for a session holding 8 KiB, past the quota that check_transient holds views' replies to.
# Fix: veil/workers/openings.py OpeningRules.open_step (check_view_room with the steps' broadcast size), or refuse
# broadcasting operands in openable steps. Severity: high.
@pytest.mark.parametrize("step", ["fss_mask", "beaver_mask"])
def test_an_opening_on_broadcasting_operands_is_not_a_reply_past_the_quota(served, step):
    srv, s = served
    n = 512
    col, row = _ref(srv, s, torch.ones(n, 1, dtype=I64)), _ref(srv, s, torch.ones(1, n, dtype=I64))
    args = ([col], [row]) if step == "fss_mask" else (col, col, row, row)
    reply = request(srv, s, OpenMessage(step, args, {}))
    answers_next_command(srv, s)
    assert _opened(reply) <= QUOTA, f"a session holding 16 KiB got a {_opened(reply) >> 20} MiB opening"


# Fixed: one stored tensor named k times in a step's list argument. check_view_room counts each leaf's logical size
# past ITS storage (0 for a plain tensor), so [y] * k is charged y's storage once; product_join clones it k times
# and concatenates (k x storage made), and commands never apply get_ids.named_once, so k is bounded only by the
# 256 MiB frame (a 512 KiB tensor named 10,000 times: ~5 GiB). Impact: memory DoS. Fix:
# veil/workers/output_bounds.py check_view_room: charge sum(logical bytes of every leaf) - sum(storage bytes of the
# distinct storages) (that also covers views and shared storages), or apply named_once to worker functions'
# ObjectRefs in handlers._run_command. Severity: high.
def test_a_step_naming_one_tensor_many_times_is_sized_by_what_it_makes(served):
    srv, s = served
    y = _ref(srv, s, torch.ones(8 * 1024, dtype=I64))  # 64 KiB
    k = 256
    reply, made = _command(srv, s, "veil.mpc.product_join", ([y] * k, [1] * k))
    assert type(reply) is m.ErrorReply, reply
    answers_next_command(srv, s)
    assert made <= QUOTA, f"product_join made {made >> 20} MiB from a 64 KiB tensor named {k} times"


# Fixed: the same through an opening: fss_mask([y] * k, [y] * k) replies k x |y| (16 MiB here) past the quota.
# Fix: veil/workers/openings.py open_step's check_view_room as above. Severity: high.
def test_an_opening_naming_one_tensor_many_times_is_not_a_reply_past_the_quota(served):
    srv, s = served
    y = _ref(srv, s, torch.ones(8 * 1024, dtype=I64))
    k = 256
    reply = request(srv, s, OpenMessage("fss_mask", ([y] * k, [y] * k), {}))
    answers_next_command(srv, s)
    assert _opened(reply) <= QUOTA, f"a session holding 64 KiB got a {_opened(reply) >> 20} MiB opening"


# Fixed: veil.compat.share_own takes its value's id as a bare int, resolved inside the worker function, so
# check_view_room (which walks the arguments' tensors) never sees the stored view; its own check_room runs only when
# this worker is one of the parties. A 1-element expand to N x N (512 bytes held) is cut into N x N random pieces,
# one per peer party, and sent to each (2 x 2 MiB here; 2 x 2 GiB at N = 16384). Impact: memory and peer-bandwidth
# amplification, the peers charged for what the source never held. Fix: veil/compat/remote_fixed_precision.py
# _share_own: output_bounds.check_view_room(worker.monitor, principal, SHARE_OWN, [value], {}, transient=True)
# once resolved (or check_room of value.numel() * 8 * parties whatever the parties). Severity: medium (needs
# configured peers).
def test_share_own_of_an_expanded_view_is_sized_before_its_pieces_are_made(served):
    srv, s = served
    peers = {p: types.SimpleNamespace(id=p) for p in ("rs64-v2-peer-a", "rs64-v2-peer-b")}
    sent = []
    srv.resolve_worker = lambda p: peers[p]  # two configured peers (stubs that take what is sent to them)
    send = srv.send_msg

    def to_peer(msg, dest):
        if isinstance(msg, m.ObjectMessage) and getattr(dest, "id", None) in peers:
            sent.append(sum(o.obj.numel() * o.obj.element_size() for o in msg.objects))
            return m.OkReply()
        return send(msg, dest)

    srv.send_msg = to_peer
    one = _ref(srv, s, torch.ones(1, 1, dtype=I64))
    big = computed(srv, s, "Tensor.expand", one, 512, 512)
    assert srv.monitor.session_bytes(s.id) < 4096
    reply, made = _command(srv, s, "veil.compat.share_own", (big.id, list(peers), [new_id(), new_id()]), 0)
    answers_next_command(srv, s)
    assert made <= QUOTA and sum(sent) <= QUOTA, \
        f"share_own made {made >> 20} MiB and sent {sum(sent) >> 20} MiB for a session holding 512 bytes ({reply})"


# Fixed (low): get_ids.named_once lets a get name one object 2 x distinct + 32 times; a plain tensor near the quota
# named 34 times is a 34 x quota reply (check_view_room counts only views' logical size past their storage).
# Fix: veil/workers/output_bounds.py check_view_room(transient=True): count every named entry's logical bytes past
# the distinct storages once. Severity: low (bounded factor 34).
def test_a_get_naming_one_tensor_many_times_is_not_a_reply_past_the_quota(served):
    srv, s = served
    x = send_tensor(srv, s, torch.ones(240 * 1024))  # 960 KiB, within the quota
    reply = request(srv, s, m.GetObjectsMessage([x] * 34, False, None))
    answers_next_command(srv, s)
    assert _opened(reply) <= 2 * QUOTA, f"a session holding 960 KiB got a {_opened(reply) >> 20} MiB reply"


# ------------------------------------------------------------------ withstood


def test_overlapping_windows_are_charged_their_logical_size(served):
    srv, s = served
    x = _ref(srv, s, torch.ones(4096, dtype=I64))  # 32 KiB
    windows = computed(srv, s, "Tensor.unfold", x, 0, 2048, 1)  # 2049 x 2048 entries: 32 MiB logical
    _refused_over_quota(request(srv, s, m.GetObjectsMessage([windows.id], False, None)))
    reply, made = _command(srv, s, "veil.mpc.beaver_mask", (windows,) * 4, 2)
    _refused_over_quota(reply)
    assert made <= QUOTA
    _refused_over_quota(request(srv, s, OpenMessage("beaver_mask", (windows,) * 4, {})))
    small = computed(srv, s, "Tensor.unfold", x, 0, 64, 64)  # non-overlapping: within its storage
    got = request(srv, s, m.GetObjectsMessage([small.id], False, None))
    assert type(got) is m.ObjectsReply and got.objects[0].shape == (64, 64), got
    answers_next_command(srv, s)


def test_a_view_of_a_view_of_an_expand_is_charged(served):
    srv, s = served
    one = _ref(srv, s, torch.ones(1, 1, dtype=I64))
    wide = computed(srv, s, "Tensor.expand", one, 1, 1024)
    sliced = computed(srv, s, "Tensor.__getitem__", wide, (slice(None), slice(0, 1000)))
    big = computed(srv, s, "Tensor.expand", sliced, 1000, 1000)  # 8 MB from 8 bytes
    assert srv.monitor.session_bytes(s.id) < 4096
    _refused_over_quota(request(srv, s, m.GetObjectsMessage([big.id], False, None)))
    reply, made = _command(srv, s, "veil.mpc.fss_mask", ([big], [big]))
    _refused_over_quota(reply)
    assert made <= QUOTA
    answers_next_command(srv, s)


@pytest.mark.parametrize("where", ["nested_list", "kwargs"])
def test_an_expanded_view_nested_in_a_steps_arguments_is_charged(served, where):
    srv, s = served
    one = _ref(srv, s, torch.ones(1, 1, dtype=I64))
    big = computed(srv, s, "Tensor.expand", one, 512, 512)
    small = _ref(srv, s, torch.ones(1, 1, dtype=I64))
    if where == "nested_list":
        # (one return id per masked value: fewer are refused first, by output_pieces' count)
        reply, made = _command(srv, s, "veil.mpc.fss_mask", ([small, big], [small, big]), nout=2)
    else:
        reply, made = _command(srv, s, "veil.mpc.fss_mask", (), kwargs={"values": [big], "masks": [big]})
    _refused_over_quota(reply)
    assert made <= QUOTA
    answers_next_command(srv, s)


def test_a_zero_size_expand_is_served(served):
    srv, s = served
    empty = _ref(srv, s, torch.ones(0, 1))
    wide = computed(srv, s, "Tensor.expand", empty, 0, 1 << 20)
    got = request(srv, s, m.GetObjectsMessage([wide.id], False, None))
    assert type(got) is m.ObjectsReply and got.objects[0].shape == (0, 1 << 20), got


def test_honest_gets_and_steps_are_not_refused(served):
    srv, s = served
    x = _ref(srv, s, torch.arange(110 * 1024, dtype=I64))  # 880 KiB, near the 1 MiB quota
    got = request(srv, s, m.GetObjectsMessage([x.id], False, None))
    assert type(got) is m.ObjectsReply and got.objects[0].numel() == 110 * 1024, got
    request(srv, s, m.DeleteMessage([x.id]))
    a = _ref(srv, s, torch.arange(64 * 64, dtype=I64).reshape(64, 64))
    t = computed(srv, s, "Tensor.t", a)
    sl = computed(srv, s, "Tensor.__getitem__", a, (slice(0, 10), slice(None)))
    one = _ref(srv, s, torch.ones(1, 1, dtype=I64))
    view = computed(srv, s, "Tensor.expand", one, 64, 64)
    got = request(srv, s, m.GetObjectsMessage([t.id, sl.id, view.id], False, None))
    assert type(got) is m.ObjectsReply, got
    base = torch.arange(64 * 64, dtype=I64).reshape(64, 64)
    assert torch.equal(got.objects[0], base.t()) and torch.equal(got.objects[1], base[:10])
    assert torch.equal(got.objects[2], torch.ones(64, 64, dtype=I64))
    b = _ref(srv, s, torch.ones(64, 64, dtype=I64))
    reply, _ = _command(srv, s, "veil.mpc.beaver_mask", (a, t, b, b), 2)  # a transposed operand: honest
    assert type(reply) is m.OkReply, reply
    opened = request(srv, s, OpenMessage("beaver_mask", (a, t, b, b), {}))
    assert type(opened) is m.ObjectsReply and torch.equal(opened.objects[0], base - 1), opened
    answers_next_command(srv, s)
