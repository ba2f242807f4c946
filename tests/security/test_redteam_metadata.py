"""Red team: metadata a scientist can read without a release (search/discovery, pointer descriptors, the DP
``hide_count`` option, id-existence probes, counters), through a network worker's authenticated request path
(``serve_bytes``, in process) and the PySyft compat search.

Holes found (each test asserts the safe behaviour; all fixed):
- ``hide_count`` was applied once, by ``enable_dp``: a dataset put under ``dp-only`` later (``load(...,
  policy="dp-only")`` or ``set_policy``) showed its exact record count. Fixed: the monitor's
  ``hide_dp_counts`` flag, read by every descriptor of a DP-only entry.
- ``veil.dp.query`` got a copy of the owner's tensor (``owner_guard.copy_protected_args``) before it validated
  its parameters: a refused query, free, took time proportional to the data. Fixed: DP releases get the data
  itself (veil's own functions, reading their data argument only).
- ``veil.dp.sanitized_gradient`` drew one uniform per record even for a tiny sample rate: its time measured
  ``n``. Fixed: ``core.poisson_indices`` draws geometric gaps, in time proportional to the lot.
The other tests assert what held.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.plans.plan import Plan

from server_sessions import open_session, quota_worker, request, send_tensor

TOKEN = "redteam-metadata-scientist-token"
OTHER = "redteam-metadata-other-token"


def _owner(hook, name: str, n: int = 37, d: int = 3, quota: int | None = None, **dp):
    """A network worker with DP dataset ``#c`` (hide_count) and one scientist session."""
    srv = quota_worker(hook, name, TOKEN, quota)
    srv.tokens.add(OTHER, "other", "scientist")
    g = torch.Generator().manual_seed(1)
    srv.load(torch.rand(n, d, generator=g), tags=("#c", "#data"), private=True, description="c data")
    srv.load(torch.rand(n, 1, generator=g), tags=("#c", "#target"), private=True, description="c target")
    settings = dict(hide_count=True, max_records=n, budgets={"sci": (50.0, 1e-3)})  # (the bound: veil.dp.padding)
    settings.update(dp)
    ws = srv.enable_dp("c", **settings)
    return srv, open_session(srv, TOKEN), ws


def _find(srv, s, *tags) -> list:
    reply = request(srv, s, m.SearchMessage(list(tags)))
    assert type(reply) is m.DescriptorsReply, reply
    return reply.descriptors


def _cmd(srv, s, op, *args, n=1, **kwargs):
    rids = [new_id() for _ in range(n)]
    return request(srv, s, m.CommandMessage(op, args, kwargs, rids)), rids


def _median_time(fn, reps: int = 7) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2]


def _no_count(text: str, n: int) -> None:
    assert str(n) not in text, text


# ------------------------------------------------------------------------------------------------ holes

def test_dp_only_dataset_loaded_after_enable_dp_hides_its_count(hook):
    srv, s, _ = _owner(hook, "rt-md-late-load", max_records=64)  # (past the bound: refused at load)
    srv.load(torch.rand(41, 2), tags=("#late",), private=True, policy="dp-only")  # e.g. the owner's later upload
    (d,) = _find(srv, s, "#late")
    reply, _ = _cmd(srv, s, "torch.mul", m.ObjectRef(d.id), 2)
    assert type(reply) is m.ErrorReply and "differential-privacy" in reply.message  # it IS dp-only...
    listed = [tuple(x.shape) for x in _find(srv, s)]
    assert (41, 2) not in listed and tuple(d.shape)[0] == 0, listed  # ...so its count must be hidden


def test_dataset_set_to_dp_only_after_enable_dp_hides_its_count(hook):
    srv, s, _ = _owner(hook, "rt-md-late-policy")
    srv.load(torch.rand(43, 2), tags=("#later",), private=True)
    srv.set_policy("#later", "dp-only")  # the console's Datasets page / the admin policy message
    (d,) = _find(srv, s, "#later")
    reply, _ = _cmd(srv, s, "torch.mul", m.ObjectRef(d.id), 2)
    assert type(reply) is m.ErrorReply and "differential-privacy" in reply.message
    assert tuple(d.shape)[0] == 0, d.shape


def test_refused_dp_query_takes_no_time_proportional_to_the_hidden_count(hook):
    times, shapes = {}, {}
    for n in (1_000, 2_000_000):
        srv, s, ws = _owner(hook, f"rt-md-time-{n}", n=n, d=4)
        (d,) = _find(srv, s, "#c", "#data")
        shapes[n] = tuple(d.shape)

        def probe():
            reply, _ = _cmd(srv, s, "veil.dp.query", m.ObjectRef(d.id), "no-such-query", 1.0, n=2)
            assert type(reply) is m.ErrorReply and "unknown DP query" in reply.message, reply

        probe()
        times[n] = _median_time(probe)
        assert ws.ledger.spent("sci") == (0.0, 0.0)  # refused before any charge: free, and repeatable at will
    assert shapes[1_000] == shapes[2_000_000] == (0, 4)  # the descriptors hide the count...
    small, big = times[1_000], times[2_000_000]
    assert big < 3 * small + 0.002, f"refused query: {small * 1e3:.2f} ms at n=1e3, {big * 1e3:.2f} ms at n=2e6"


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(3, 1)

    def forward(self, x):
        return self.w(x)


def test_tiny_sample_rate_gradient_time_does_not_measure_the_hidden_count(hook):
    times = {}
    for n in (1_000, 4_000_000):
        srv, s, ws = _owner(hook, f"rt-md-sgd-{n}", n=n, max_grad_norm=1.0, noise_multiplier=1.0,
                            nominal_count=1000, budgets={"sci": (1e6, 0.5)})
        spec = Plan(_Lin()).build(torch.zeros(2, 3)).spec
        pid = new_id()
        assert type(request(srv, s, m.ObjectMessage([m.StoredObject(pid, spec)]))) is m.OkReply
        params = [p.detach().clone() for p in _Lin().parameters()]
        k = [0]

        def step():
            k[0] += 1
            reply, _ = _cmd(srv, s, "veil.dp.sanitized_gradient", m.ObjectRef(pid), "c", params, [True, True],
                            "mse", 1e-7, 1e3, f"rt-md-sgd-{n}-{k[0]:04d}")
            assert type(reply) is m.OkReply, reply

        step()
        times[n] = _median_time(step, 5)
        assert ws.ledger.spent("sci")[0] < 1e-3  # essentially free
    small, big = times[1_000], times[4_000_000]
    assert big < 3 * small + 0.002, f"DP-SGD step, q=1e-7: {small * 1e3:.2f} ms at n=1e3, {big * 1e3:.2f} ms at n=4e6"


# -------------------------------------------------------------------------------------------- what holds

def test_search_list_and_grid_search_report_zero_rows_for_hidden_dp_data(hook):
    srv, s, _ = _owner(hook, "rt-md-search", n=37)
    for terms in (["#c"], ["#c", "#data"], ["c data"], []):  # tags, description substring, everything
        for d in _find(srv, s, *terms):
            assert d.shape[0] == 0, (terms, d.shape)
    ids = [d.id for d in _find(srv, s, "#c")]
    for oid in ids:  # by id as a search term
        assert [tuple(d.shape) for d in _find(srv, s, str(oid))][0][0] == 0
    assert request(srv, s, m.ListObjectsMessage()).descriptors == []  # owner data is not "mine"
    # PySyft's paths on an in-process worker: sy.grid / request_search / len() of the pointer
    w = sy.VirtualWorker(hook, id="rt-md-grid")
    w.load(torch.rand(29, 2), tags=("#g",), private=True, policy="dp-only")
    w.enable_dp(hide_count=True, budgets={"me": (1.0, 1e-5)})
    found = sy.grid.PrivateGridNetwork(w).search("#g")[w.id]
    assert [tuple(p.shape) for p in found] == [(0, 2)] and len(found[0]) == 0
    assert [tuple(p.shape) for p in hook.local_worker.request_search(["#g"], location=w)] == [(0, 2)]


def test_refusals_on_hidden_dp_data_carry_no_count_or_shape(hook):
    n = 3733
    srv, s, _ = _owner(hook, "rt-md-refusals", n=n)
    (d,) = _find(srv, s, "#c", "#data")
    ref = m.ObjectRef(d.id)
    mine = m.ObjectRef(send_tensor(srv, s, torch.zeros(5, 3)))
    texts = []
    for msg in (m.GetObjectsMessage([d.id], delete=False), m.MoveMessage([d.id], "nowhere", [new_id()]),
                m.RemoteGetMessage(d.id)):
        reply = request(srv, s, msg)
        assert type(reply) is m.ErrorReply, (msg, reply)
        texts.append(reply.message)
    for op, args in (("torch.Tensor.size", (ref,)), ("torch.numel", (ref,)), ("torch.Tensor.__len__", (ref,)),
                     ("torch.zeros_like", (ref,)), ("torch.cat", ([ref, mine],)), ("torch.add", (mine, ref)),
                     ("torch.Tensor.__getitem__", (ref, n - 1)), ("torch.Tensor.view", (ref, -1)),
                     ("torch.Tensor.expand", (ref, n + 1, 3))):
        for ids in ([new_id()], None):  # stored results, and the descriptor (ResultReply) form
            reply = request(srv, s, m.CommandMessage(op, args, {}, ids))
            assert type(reply) is m.ErrorReply, (op, reply)
            texts.append(reply.message)
    # a plan that takes it nested in its inputs list
    pid = new_id()
    spec = Plan(_Lin()).build(torch.zeros(2, 3)).spec
    assert type(request(srv, s, m.ObjectMessage([m.StoredObject(pid, spec)]))) is m.OkReply
    state = [m.ObjectRef(send_tensor(srv, s, p.detach().clone())) for p in _Lin().parameters()]
    reply, _ = _cmd(srv, s, "veil.plan.run", m.ObjectRef(pid), [ref], state)
    assert type(reply) is m.ErrorReply and "differential-privacy" in reply.message, reply
    texts.append(reply.message)
    from veil.governance.wire import RequestReleaseMessage

    reply = request(srv, s, RequestReleaseMessage(d.id, "please"))
    assert type(reply) is m.ErrorReply
    texts.append(reply.message)
    for t in texts:
        _no_count(t, n)
        assert f"[{n}" not in t and f"({n}" not in t, t


def test_dp_release_errors_and_costs_do_not_depend_on_the_count(hook):
    answers = {}
    for n in (53, 5300):
        srv, s, ws = _owner(hook, f"rt-md-cost-{n}", n=n, max_grad_norm=1.0, noise_multiplier=1.0)
        (d,) = _find(srv, s, "#c", "#data")
        ref = m.ObjectRef(d.id)
        out = []
        # errors before the charge (parameters, public shape), and the refusal of training without nominal_count
        for args in ((ref, "sum", 1.0, 0.0, "laplace", None, None), (ref, "histogram", 1.0, 0.0, "laplace", 0, 1, 0),
                     (ref, "mean", 1.0, 0.5, "laplace", 0, 1), (ref, "count", float("nan"))):
            reply, _ = _cmd(srv, s, "veil.dp.query", *args, n=2)
            assert type(reply) is m.ErrorReply, reply
            out.append(reply.message.replace(srv.id, "W"))
        reply, _ = _cmd(srv, s, "veil.dp.sanitized_gradient", m.ObjectRef(new_id()), "c", [], [], "mse", 0.5)
        out.append(type(reply).__name__)
        # the cost tensors of charged queries (epsilon, delta, noise scale): fixed by public parameters only
        for name, lo, hi, bins in (("count", None, None, None), ("sum", 0.0, 1.0, None), ("mean", 0.0, 1.0, None),
                                   ("histogram", 0.0, 1.0, 4)):
            reply, rids = _cmd(srv, s, "veil.dp.query", ref, name, 0.5, 0.0, "laplace", lo, hi, bins, n=2)
            assert type(reply) is m.OkReply, reply
            value, cost = request(srv, s, m.GetObjectsMessage(rids)).objects
            out.append((name, tuple(value.shape), tuple(cost.tolist())))
        answers[n] = out
    assert answers[53] == answers[5300]


def test_other_sessions_ids_are_no_existence_oracle(hook):
    srv, s, _ = _owner(hook, "rt-md-ids")
    other = open_session(srv, OTHER)
    theirs = send_tensor(srv, other, torch.arange(6.0))
    never = new_id()

    def answers(oid):
        out = []
        for msg in (m.GetObjectsMessage([oid], delete=False), m.RemoteGetMessage(oid),
                    m.MoveMessage([oid], "nowhere", [new_id()]),
                    m.CommandMessage("torch.add", (m.ObjectRef(oid), 1), {}, [new_id()])):
            reply = request(srv, s, msg)
            out.append((type(reply).__name__, getattr(reply, "error", ""),
                        getattr(reply, "message", "").replace(str(oid), "ID")))
        out.append(tuple(d.id for d in _find(srv, s, str(oid))))
        return out

    assert answers(theirs) == answers(never)
    assert type(request(srv, s, m.DeleteMessage([theirs]))) is m.OkReply  # deleting is silent either way...
    # ...and did nothing; storing or computing under their id is no "already in use" oracle either
    assert type(request(srv, s, m.ObjectMessage([m.StoredObject(theirs, torch.ones(1))]))) is m.OkReply
    mine = m.ObjectRef(send_tensor(srv, s, torch.ones(2)))
    rid = new_id()
    reply = request(srv, s, m.CommandMessage("torch.mul", (mine, 2), {}, [rid]))
    assert type(reply) is m.OkReply
    got = request(srv, other, m.GetObjectsMessage([theirs], delete=False))
    assert torch.equal(got.objects[0], torch.arange(6.0))
    assert [x.id for x in request(srv, other, m.ListObjectsMessage()).descriptors] == [theirs]
    assert sorted(x.id for x in request(srv, s, m.ListObjectsMessage()).descriptors) == sorted([theirs, mine.id, rid])


def test_owner_counters_and_consoles_are_refused_to_a_scientist(hook):
    from veil.governance.console.auth import ConsoleAuth
    from veil.governance.wire import AdminPolicyMessage, AdminRequestsMessage, ListRequestsMessage
    from veil.workers.websocket_admin import AdminObjectsMessage

    srv, s, _ = _owner(hook, "rt-md-admin")
    for msg in (AdminObjectsMessage(None), AdminObjectsMessage([1]), AdminRequestsMessage("list"),
                AdminPolicyMessage("#c", "open"), ListRequestsMessage(user="other")):
        reply = request(srv, s, msg)
        assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError", (msg, reply)
    assert ConsoleAuth(srv).login(TOKEN) is None
    assert request(srv, s, ListRequestsMessage()).objects == []  # its own requests only (none)


def test_quota_figures_do_not_move_with_the_hidden_count(hook):
    quota = 4 << 20
    seen = {}
    for n in (100, 200_000):  # 2.4 MB of owner data: more than the session's room after its own tensor
        srv, s, _ = _owner(hook, f"rt-md-quota-{n}", n=n, quota=quota)
        (d,) = _find(srv, s, "#c", "#data")
        send_tensor(srv, s, torch.zeros(3 << 18))  # 3 MiB of the 4 MiB quota
        before = srv.monitor.session_bytes(s.id)
        reply, _ = _cmd(srv, s, "veil.dp.query", m.ObjectRef(d.id), "sum", 1.0, 0.0, "laplace", 0.0, 1.0, n=2)
        assert type(reply) is m.OkReply, reply
        reply, _ = _cmd(srv, s, "torch.zeros", 1 << 20)  # over quota: the error names session figures only
        assert type(reply) is m.ErrorReply
        seen[n] = (srv.monitor.session_bytes(s.id) - before, reply.message.replace(srv.id, "W"))
    assert seen[100] == seen[200_000], seen
