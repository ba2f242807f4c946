"""Red team of the PySyft compatibility worker functions (``veil.compat.*``) and remote plans
(``veil.plan.run`` / ``fit`` / ``load_state``) as a hostile data scientist reaches them over a network
worker's request path (in-process ``WebsocketServerWorker`` sessions, ``server_sessions.py``).

Holes a session-45 attacker found (strict xfails then; fixed the same session: the encoding bounds the
scale before computing it, ``fit`` detaches each batch's loss, and ``hide_count`` marks only the DP
datasets, which refuse every computation, so no pointer claims to hide a count that a result would show):
- ``veil.compat.encode`` / ``decode`` compute ``base ** precision_fractional`` as a Python big integer
  before refusing it: an uninterruptible CPU burn chosen by the requester (the per-command deadline cannot
  stop it; ``precision_fractional=10**9`` holds the worker for hours).
- ``veil.plan.fit`` keeps every batch's loss with its autograd graph until the last batch: the graphs
  (saved batch tensors) grow with epochs x batches, far past the session quota, uncharged.
- with ``enable_dp(hide_count=True)`` the owner's other protected tensors also report 0 rows in search,
  but a plan run on them gives a result whose shape is the exact row count.
"""

from __future__ import annotations

import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import PlanOp, PlanSpec, SlotRef

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, quota_worker, request, run_command, send_tensor  # noqa: E402

TOKEN = "rt-compat-plans-token"
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_size_cache")]

MUL, SUM, ADD = (ALLOWLIST.by_func(f).name for f in (torch.mul, torch.Tensor.sum, torch.add))
SECRET = torch.arange(12.0).reshape(4, 3) * 1.5 - 4


def _name(f) -> str:
    return ALLOWLIST.by_func(f).name


def _setup(hook, wid, quota=None, **load):
    srv = quota_worker(hook, wid, TOKEN, quota)
    xid = srv.load(SECRET.clone(), tags=("#x", "#data"), description="secret x", **load)
    return srv, open_session(srv, TOKEN), xid


def _owner_value(srv, oid):
    return srv.monitor.owner_objects()[oid]


def _intact_and_serving(srv, s, xid, expected=SECRET):
    assert torch.equal(_owner_value(srv, xid), expected), "owner data changed"
    t = send_tensor(srv, s, torch.ones(3))
    r, (rid,) = run_command(srv, s, ADD, m.ObjectRef(t), 1.0)
    assert type(r) is m.OkReply, r
    got = request(srv, s, m.GetObjectsMessage([rid], False, None))
    assert torch.equal(got.objects[0], torch.full((3,), 2.0)), got


def _store_plan(srv, s, spec) -> m.ObjectRef:
    pid = new_id()
    reply = request(srv, s, m.ObjectMessage([m.StoredObject(pid, spec)]))
    assert type(reply) is m.OkReply, reply
    return m.ObjectRef(pid)


def _get(srv, s, oid):
    return request(srv, s, m.GetObjectsMessage([oid], False, None))


# ------------------------------------------------------------------------------------ holes

@pytest.mark.parametrize("op", ["veil.compat.encode", "veil.compat.decode"])
def test_absurd_fixed_point_precision_is_refused_without_computing_the_scale(hook, op):
    srv, s, xid = _setup(hook, f"rt-cp-enc-{op[-6:]}")
    own = send_tensor(srv, s, torch.zeros(2, dtype=torch.int64))
    extra = ("float32",) if op.endswith("decode") else ()
    # the command runs on this thread (serve_bytes): its CPU time is the work it did, not the waits around it
    # (its refusal row written, a loaded machine descheduling it), which wall time counted
    t0 = time.thread_time()
    reply, _ = run_command(srv, s, op, m.ObjectRef(own), 3, 8_000_000, *extra)
    elapsed = time.thread_time() - t0
    assert type(reply) is m.ErrorReply, reply  # refused either way
    _intact_and_serving(srv, s, xid)
    # 3**8e6 takes ~1 s of CPU here; 10**9 would hold the worker for hours, past any command deadline
    assert elapsed < 0.2, f"{op} spent {elapsed:.2f} s of CPU computing a scale it then refused"


def _keep_graph_plan() -> PlanSpec:
    # loss = (x * w).sum(), returned *with* its graph: each batch's x stays saved for backward
    return PlanSpec("keep", 2, 1, 5, [PlanOp(MUL, (SlotRef(0), SlotRef(2)), {}, [3], True),
                                      PlanOp(SUM, (SlotRef(3),), {}, [4], True)], SlotRef(4))


def test_fit_cannot_hold_graphs_of_every_batch_past_the_quota(hook):
    quota, width = 1 << 20, 1 << 14  # 1 MiB quota; rows of 64 KiB, 64 rows of owner data (4 MiB, not charged)
    srv = quota_worker(hook, "rt-cp-fitgraph", TOKEN, quota)
    data = torch.randn(64, width)
    xid, yid = srv.load(data.clone(), tags=("#d",)), srv.load(torch.zeros(64, 1), tags=("#t",))
    s = open_session(srv, TOKEN)
    pid = _store_plan(srv, s, _keep_graph_plan())
    w = send_tensor(srv, s, torch.ones(width, requires_grad=True))
    saved, peak = [], [0]

    def pack(t):
        saved.append((weakref.ref(t), t.untyped_storage().nbytes()))
        peak[0] = max(peak[0], sum(n for r, n in saved if r() is not None))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reply, _ = run_command(srv, s, "veil.plan.fit", pid, m.ObjectRef(xid), m.ObjectRef(yid), [m.ObjectRef(w)],
                               1, 4, grad=True)
    refused = type(reply) is m.ErrorReply and reply.error == "QuotaExceededError"
    # (4 MiB of owner data no longer fit a 1 MiB quota at all: the fit's copy of it is charged before it runs,
    # so it may be refused before any batch; a fit that ran must have been seen by the hooks, on this thread)
    assert refused or len(saved) >= 64, reply
    assert torch.equal(_owner_value(srv, xid), data)
    _intact_and_serving(srv, s, xid, data)
    assert refused or peak[0] <= quota, f"fit held {peak[0] >> 20} MiB of graphs under a {quota >> 20} MiB quota"


def test_hidden_count_stays_hidden_through_a_plan(hook):
    srv, s, xid = _setup(hook, "rt-cp-hide")
    srv.load(torch.randn(7, 3), tags=("#dpset", "#data"))
    srv.load(torch.randn(7, 1), tags=("#dpset", "#target"))
    srv.enable_dp("dpset", hide_count=True)
    found = request(srv, s, m.SearchMessage(["#x"]))
    assert type(found) is m.DescriptorsReply, found
    found = found.descriptors
    shown = [tuple(d.shape) for d in found]
    dp_shapes = [tuple(d.shape) for d in request(srv, s, m.SearchMessage(["#dpset"])).descriptors]
    assert sorted(dp_shapes) == [(0, 1), (0, 3)]  # the DP dataset's counts are hidden (it refuses computing)
    ident = PlanSpec("ident", 1, 0, 2, [PlanOp(MUL, (SlotRef(0), 1.0), {}, [1], False)], SlotRef(1))
    reply, (rid,) = run_command(srv, s, "veil.plan.run", _store_plan(srv, s, ident), [m.ObjectRef(xid)], [])
    assert type(reply) is m.OkReply, reply
    got = _get(srv, s, rid)  # x is not private: its results may be fetched, and their shape is its count
    _intact_and_serving(srv, s, xid)
    rows = got.objects[0].shape[0] if type(got) is m.ObjectsReply else None
    # a pointer may hide a count only where no result can show it: x's pointer must not claim 0 rows
    assert shown == [(SECRET.shape[0], 3)] or rows != SECRET.shape[0], (shown, rows)


# ------------------------------------------------------------------------------------ what holds

def test_plan_aliasing_and_out_never_write_owner_data(hook):
    srv, s, xid = _setup(hook, "rt-cp-alias", private=True)
    x = m.ObjectRef(xid)
    plans = [
        # in-place into the input slot, out= into it, a view then in-place (set_ is refused at store)
        PlanSpec("inplace", 1, 0, 2, [PlanOp(_name(torch.Tensor.add_), (SlotRef(0), 100.0), {}, [0], False)],
                 SlotRef(0)),
        PlanSpec("out", 1, 0, 2, [PlanOp(ADD, (SlotRef(0), 7.0), {"out": SlotRef(0)}, [0], False)], SlotRef(0)),
        PlanSpec("view", 1, 0, 3, [PlanOp(_name(torch.Tensor.view), (SlotRef(0), -1), {}, [1], False),
                                   PlanOp(_name(torch.Tensor.mul_), (SlotRef(1), 0.0), {}, [1], False)], SlotRef(1)),
    ]
    for spec in plans:
        inputs = [x] if spec.n_inputs == 1 else [x, m.ObjectRef(send_tensor(srv, s, torch.zeros(0)))]
        reply, (rid,) = run_command(srv, s, "veil.plan.run", _store_plan(srv, s, spec), inputs, [])
        assert torch.equal(_owner_value(srv, xid), SECRET), spec.name
        if type(reply) is m.OkReply:  # the returned "alias" is a copy: writing it leaves the owner's data
            assert type(run_command(srv, s, _name(torch.Tensor.fill_), m.ObjectRef(rid), 9.0, n=0)[0]) is m.OkReply
            assert torch.equal(_owner_value(srv, xid), SECRET), spec.name
    # load_state with the owner's data as the state, and fit on it: copies
    reply, _ = run_command(srv, s, "veil.plan.load_state", [x], [m.ObjectRef(send_tensor(srv, s, torch.zeros(4, 3)))],
                           n=0)
    assert torch.equal(_owner_value(srv, xid), SECRET)
    _intact_and_serving(srv, s, xid)


def test_plan_errors_on_owner_data_quote_no_values(hook):
    srv, s, xid = _setup(hook, "rt-cp-err", private=True)
    bad = PlanSpec("bad", 1, 0, 2, [PlanOp(_name(torch.Tensor.view), (SlotRef(0), 5), {}, [1], False)], SlotRef(1))
    reply, _ = run_command(srv, s, "veil.plan.run", _store_plan(srv, s, bad), [m.ObjectRef(xid)], [])
    assert type(reply) is m.ErrorReply and reply.error == "ProtectedDataError", reply
    assert "12" not in reply.message and "[4, 3]" not in reply.message and "tensor(" not in reply.message
    # fit with mismatched target: the row counts are not quoted
    tid = send_tensor(srv, s, torch.zeros(9, 1))
    reply, _ = run_command(srv, s, "veil.plan.fit", _store_plan(srv, s, bad), m.ObjectRef(xid), m.ObjectRef(tid),
                           [], 1)
    assert type(reply) is m.ErrorReply and "4 rows" not in reply.message, reply
    _intact_and_serving(srv, s, xid)


def test_plan_specs_refuse_worker_functions_out_of_range_slots_and_unknown_names(hook):
    srv, s, xid = _setup(hook, "rt-cp-spec", private=True)
    refused = [
        PlanSpec("wf", 1, 0, 2, [PlanOp("veil.compat.share_own", (xid, ["a", "b"], [1, 2]), {}, [], False)], None),
        PlanSpec("wf2", 1, 0, 2, [PlanOp("veil.plan.load_state", ([SlotRef(0)], [SlotRef(0)]), {}, [], False)], None),
        PlanSpec("slot", 1, 0, 2, [PlanOp(ADD, (SlotRef(0), SlotRef(5)), {}, [1], False)], SlotRef(1)),
        PlanSpec("set", 2, 0, 3, [PlanOp("Tensor.set_", (SlotRef(1), SlotRef(0)), {}, [1], False)], SlotRef(1)),
        PlanSpec("name", 1, 0, 2, [PlanOp("builtins.eval", ("1",), {}, [1], False)], SlotRef(1)),
    ]
    for spec in refused:
        pid = new_id()
        reply = request(srv, s, m.ObjectMessage([m.StoredObject(pid, spec)]))
        assert type(reply) is m.ErrorReply, (spec.name, reply)
    _intact_and_serving(srv, s, xid)


def test_share_own_follows_get_rules_and_dp_only(hook):
    srv, s, xid = _setup(hook, "rt-cp-share", private=True)
    enc, (eid,) = run_command(srv, s, "veil.compat.encode", m.ObjectRef(xid), 2, 16)
    assert type(enc) is m.OkReply, enc
    # the raw owner tensor (float, private) and an owner int64 tensor: both refused like a .get()
    iid = srv.load(torch.arange(4), tags=("#i",), private=True)
    for oid in (xid, iid):
        reply, _ = run_command(srv, s, "veil.compat.share_own", oid, [srv.id, "nobody"], [new_id(), new_id()], n=0)
        assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError", reply
    _intact_and_serving(srv, s, xid)
    assert torch.equal(_owner_value(srv, iid), torch.arange(4))
