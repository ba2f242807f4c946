"""Red team, second pass: sizing before an op runs (``veil/workers/output_bounds.py``, c373cb1) under a
per-session quota (``--max-session-mb``).

Requests go through a real ``WebsocketServerWorker`` session (``serve_bytes``), in process, as in
``test_redteam_output_bounds.py``. Nothing here allocates more than a few tens of MiB for real: a
"terabytes" case proves the op ran through the allocator's ``can't allocate`` error, and the autograd cases
count the storage the results' graphs keep alive (walking ``grad_fn``'s saved tensors: no RSS).

Findings (the tests named here failed at c373cb1; all fixed in session 44: 1 by charging what a tracked
op's graph saves and keeping a deleted tracked tensor charged until freed):

1. ``test_autograd_graph_memory_is_charged_or_refused`` and ``test_autograd_graph_of_a_loss_is_charged_or_refused`` (high): only a result's own storage is charged
   (``ReferenceMonitor.store``) and only results are sized; tensors an autograd graph saves are neither.
   With ``requires_grad_`` on a stored tensor (allowlisted) and ``grad_enabled`` True (the command default):
   (a) ``y = sin(x)``, delete ``x``, ``z = sin(y)``, delete ``y``... : each step is charged one tensor and
   frees one, but every ``SinBackward`` keeps its input alive: 16 steps hold 17 MiB against a 4 MiB quota
   (unbounded with more steps); (b) ``F.cross_entropy(logits, t)`` charged a scalar keeps the whole
   log-softmax (logits' size) alive in its graph: 16 commands hold 16 x the logits. Measured in process:
   30 steps of 16 MiB = +550 MiB RSS under a 64 MiB quota. One session can thus fill the worker process up
   to ``--max-memory-mb`` (the RLIMIT_AS cap), denying every other session. Fix: charge a result the
   storage of the saved tensors its graph reaches that are not already charged (or refuse
   ``requires_grad`` results under a quota outside plans; or keep a deleted object's charge while a
   stored graph still references its storage).
2. ``test_backward_runs_under_a_quota`` / ``test_a_training_plan_fits_under_a_quota`` (high, false
   refusal): ``Tensor.backward`` cannot run on meta (the meta copies have no ``requires_grad`` and sizing
   runs under ``no_grad``: "element 0 of tensors does not require grad"), it is not in ``VALUE_BOUNDS``, so
   it is refused as unsized under ANY quota: every remote training loop, and every ``training_plan``
   (``veil.plan.fit`` / ``veil.plan.run``: the plan's ``Tensor.backward`` op goes through the same check),
   fails as soon as the owner sets ``--max-session-mb``. Fix: size ``backward`` (and
   ``Tensor.grad.__set__``) by a shape bound: the leaves' gradients (at most the sum of the graph's
   ``requires_grad`` leaves' sizes; for a command, the stored leaves reachable from the tensor) plus the
   graph's saved tensors freed as it runs.
3. ``test_a_mask_with_a_broadcast_index_is_bounded`` (high): ``_getitem_bound`` sums the *linear* sizes of
   the tensors involved, but a boolean mask becomes an index (count K <= its size) that *broadcasts* with
   the other long index tensors: ``x[mask, idx]`` with ``x`` (2^20, 1), ``mask`` (2^20,) and ``idx``
   (2^20, 1) zeros is a (2^20, K) result: bound 48 MiB (fits a 64 MiB quota with 13 MiB stored), real
   2^40 floats: the op ran and tried to allocate 4 TiB. Fix: bound a mask by its element count and take
   the product of the broadcast of every index's (bounded) shape times the non-indexed dims, as
   ``broadcast_shapes`` of the mask-replaced-by-(numel,)-index shapes would give.

Minor (not failing tests):

- Bad arguments for any op that fails on meta (a missing ``running_mean`` in ``batch_norm``, a wrong
  shape) are reported as ``QuotaExceededError: ... cannot size this op`` instead of the op's own error, only
  under a quota: confusing for honest clients (suggest: refuse as "unsized" only when the real op would
  have a value-dependent size; otherwise re-raise the meta error as the op's RemoteExecutionError).
- ``sort`` of a large real tensor allocates ~1.7x its sized results (a 64 MiB input: 192 MiB sized, 320 MiB
  peak); convolutions on this build (mkldnn) did not show im2col-sized temporaries.
- Cache defeat: a float scalar is part of the signature, so ``x.add(float(i))`` (or an honest lr schedule's
  ``mul_(1 - lr * t)``) re-sizes on meta every command: measured ~700 us of sizing for a 4 us op (64x64),
  and each call evicts an entry of the process-wide 4096-entry LRU that other sessions share (their
  training loops then pay the meta run again). Suggest: key float scalars by type for ops whose result
  shape cannot depend on them, and one LRU per session (or per-session entry caps).

The passing tests pin what held: typical training ops (conv2d, max_pool2d, linear, cross_entropy, nll_loss,
softmax, dropout, batch_norm, SGD in-place updates, argmax, eq, sum, slicing, int / long / bool-mask
indexing, unique, nonzero, masked_select, topk, sort) run under a modest quota; ``_getitem_bound`` holds
for a single mask; the unsized refusal carries no value of its inputs.
"""

from __future__ import annotations

import pytest
import torch

from veil.messaging import messages as m
from veil.workers import output_bounds

from server_sessions import quota_worker, run_command, session_helpers  # noqa: E402

TOKEN = "rt45-sizing-second-pass"
QUOTA = 64 << 20
N = 1 << 20
F_ = "torch.nn.functional."

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_size_cache")]


@pytest.fixture
def worker(hook):
    return quota_worker(hook, "rt2-ob-alice", TOKEN, QUOTA)


_session, _req, _send, _command, _computed = session_helpers(TOKEN, grad=True)


def _stored(srv, oid):
    for space in srv.monitor._store._spaces.values():
        if oid in space:
            return space[oid].obj
    raise KeyError(oid)


def _graph_bytes(roots) -> int:
    """Distinct storage bytes the autograd graphs of ``roots`` keep alive through saved tensors (results'
    own storage excluded)."""
    own = {t.untyped_storage().data_ptr() for t in roots}
    seen_nodes, storages = set(), {}
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(node, attr)
                except Exception:  # noqa: BLE001  (freed buffers)
                    continue
                for v in (value if isinstance(value, (tuple, list)) else (value,)):
                    if isinstance(v, torch.Tensor):
                        s = v.untyped_storage()
                        if s.data_ptr() not in own:
                            storages[s.data_ptr()] = s.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


def _refused_unallocated(reply) -> bool:
    return (type(reply) is m.ErrorReply and "can't allocate" not in reply.message
            and (reply.error == "QuotaExceededError" or "QuotaExceededError" in reply.message))


# 1 ---------------------------------------------------------------------------------------------------------------

def test_autograd_graph_memory_is_charged_or_refused(worker):
    """(a) a chain of ``sin`` with each input deleted after use, (b) repeated ``cross_entropy`` on one
    logits tensor: each request fits the quota and is charged its result alone, while the results' autograd
    graphs keep the deleted inputs / every log-softmax alive. Evidence: the saved tensors the stored
    results' graphs reach, against a 4 MiB quota."""
    quota = 4 << 20
    worker.monitor.max_session_bytes = quota
    s = _session(worker)
    n = 1 << 18  # 1 MiB of float32
    cur = _send(worker, s, torch.ones(n))
    assert type(_command(worker, s, "Tensor.requires_grad_", cur)[0]) is m.OkReply
    refused = False
    for _ in range(16):
        reply, (rid,) = _command(worker, s, "torch.sin", cur)
        if type(reply) is not m.OkReply:
            refused = _refused_unallocated(reply)
            break
        assert type(_req(worker, s, m.DeleteMessage([cur.id]))) is m.OkReply
        cur = m.ObjectRef(rid)
    held_chain = _graph_bytes([_stored(worker, cur.id)])
    assert refused or held_chain <= quota, (
        f"sin chain: graph keeps {held_chain / 2**20:.0f} MiB of deleted inputs alive, uncharged, "
        f"under a {quota >> 20} MiB quota")


def test_autograd_graph_of_a_loss_is_charged_or_refused(worker):
    """(b) of finding 1: 16 ``cross_entropy`` commands on one 1 MiB logits tensor, each charged a scalar,
    each graph keeping a 1 MiB log-softmax alive, under a 4 MiB quota."""
    quota = 4 << 20
    worker.monitor.max_session_bytes = quota
    s2 = _session(worker)
    logits = _send(worker, s2, torch.randn(1 << 12, 64))  # 1 MiB
    target = _send(worker, s2, torch.zeros(1 << 12, dtype=torch.long))
    assert type(_command(worker, s2, "Tensor.requires_grad_", logits)[0]) is m.OkReply
    losses, refused = [], False
    for _ in range(16):
        reply, (rid,) = _command(worker, s2, F_ + "cross_entropy", logits, target)
        if type(reply) is not m.OkReply:
            refused = _refused_unallocated(reply)
            break
        losses.append(_stored(worker, rid))
    held_ce = _graph_bytes(losses)
    assert refused or held_ce <= quota, (
        f"cross_entropy x16: graphs keep {held_ce / 2**20:.0f} MiB of log-softmax alive, uncharged, "
        f"under a {quota >> 20} MiB quota")


def test_an_untracked_input_a_graph_saved_stays_charged_after_delete(worker):
    """Session 45: ``dot(x, w)`` with only ``w`` tracked keeps ``x`` in its graph (for ``w``'s gradient) while the
    result is a scalar. Deleting ``x`` used to release its charge (only tracked tensors stayed charged): 16 fresh
    1 MiB ``x`` held 16 MiB under a 4 MiB quota, charged a few hundred bytes. Now a deleted tensor something else
    still holds stays charged until it is freed, so the quota refuses the fourth; freeing the results frees it all."""
    quota = 4 << 20
    worker.monitor.max_session_bytes = quota
    s = _session(worker)
    n = 1 << 18  # 1 MiB of float32
    w = _send(worker, s, torch.ones(n))
    assert type(_command(worker, s, "Tensor.requires_grad_", w)[0]) is m.OkReply
    dots, refused = [], False
    for i in range(16):
        try:
            x = _send(worker, s, torch.full((n,), float(i)))
        except AssertionError:  # the store itself refused the new x
            refused = True
            break
        reply, (rid,) = _command(worker, s, "torch.dot", x, w)
        if type(reply) is not m.OkReply:
            refused = _refused_unallocated(reply)
            break
        assert _stored(worker, rid).item() == i * n  # (computed from the x it was given)
        dots.append(rid)
        assert type(_req(worker, s, m.DeleteMessage([x.id]))) is m.OkReply
    held = _graph_bytes([_stored(worker, rid) for rid in dots])
    assert refused and held <= quota, f"{len(dots)} dot products keep {held >> 20} MiB of deleted inputs alive"
    charged = worker.monitor.session_bytes(s.id)
    assert type(_req(worker, s, m.DeleteMessage(dots))) is m.OkReply
    assert worker.monitor.session_bytes(s.id) <= charged - len(dots) * (n * 4)  # the held inputs went with them


def test_deleting_more_names_of_one_object_charges_it_once(worker):
    """An in-place op's result stored under a new id (a raw client may name one) is the same object: deleting
    that name while the first lives must not add a charge each time (16 rounds used to leave 16 copies charged)."""
    worker.monitor.max_session_bytes = 4 << 20
    s = _session(worker)
    w = _send(worker, s, torch.zeros(1 << 16))  # 256 KiB
    reply, (tracked,) = _command(worker, s, "Tensor.requires_grad_", w)  # (the same object, a second name)
    assert type(reply) is m.OkReply
    base = worker.monitor.session_bytes(s.id)
    for _ in range(16):
        reply, (rid,) = run_command(worker, s, "Tensor.add_", w, 1.0)  # (no grad: in place on a leaf)
        assert type(reply) is m.OkReply, reply
        assert type(_req(worker, s, m.DeleteMessage([rid]))) is m.OkReply
    assert worker.monitor.session_bytes(s.id) <= base + (1 << 18)  # at most the one lingering name
    assert float(_stored(worker, w.id)[0]) == 16.0  # every add_ ran on the one object
    assert type(_req(worker, s, m.DeleteMessage([w.id, tracked]))) is m.OkReply
    assert worker.monitor.session_bytes(s.id) == 0  # nothing holds it any more: no charge is left


# 2 ---------------------------------------------------------------------------------------------------------------

def _training_session(worker):
    s = _session(worker)
    x = _send(worker, s, torch.randn(64, 100))
    y = _send(worker, s, torch.randint(0, 10, (64,)))
    w = _send(worker, s, torch.randn(10, 100))
    for t in (w,):
        assert type(_command(worker, s, "Tensor.requires_grad_", t)[0]) is m.OkReply
    return s, x, y, w


def test_backward_runs_under_a_quota(worker):
    """An honest remote training step (linear, cross_entropy, backward, SGD update) under a 64 MiB quota,
    a few KiB of tensors: ``Tensor.backward`` is refused as an op "of unknown size"."""
    s, x, y, w = _training_session(worker)
    out = _computed(worker, s, F_ + "linear", x, w)
    loss = _computed(worker, s, F_ + "cross_entropy", out, y)
    reply, _ = _command(worker, s, "Tensor.backward", loss, n=0)
    assert type(reply) is m.OkReply, f"backward refused under a {QUOTA >> 20} MiB quota: {reply}"
    grad = _computed(worker, s, "Tensor.grad.__get__", w)
    # the SGD update runs without grad tracking, as a client's ``with torch.no_grad()`` sends it
    reply = _req(worker, s, m.CommandMessage("Tensor.sub_", (w, grad), {"alpha": 0.1}, [0], False))
    assert type(reply) is m.OkReply, reply


def test_a_training_plan_fits_under_a_quota(worker):
    """``training_plan`` (MLP, mse_loss, SGD) ``fit`` on 40 rows under a 64 MiB quota: refused at the
    plan's ``Tensor.backward`` op."""
    import torch.nn.functional as F
    from torch import nn

    from veil.plans import training_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 1))
    plan = training_plan(model, F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)])
    s = _session(worker)
    pid = _send(worker, s, plan.spec)
    state = [_send(worker, s, p.detach().clone().requires_grad_(True)) for p in model.parameters()]
    x, y = _send(worker, s, torch.randn(40, 13)), _send(worker, s, torch.randn(40, 1))
    reply, _ = _command(worker, s, "veil.plan.fit", pid, x, y, state, 8)
    assert type(reply) is m.OkReply, f"an honest training plan refused under a {QUOTA >> 20} MiB quota: {reply}"


# 3 ---------------------------------------------------------------------------------------------------------------

def test_a_mask_with_a_broadcast_index_is_bounded(worker):
    """``x[mask, idx]``: the mask's nonzero indices (2^20) broadcast against a (2^20, 1) long index: a
    (2^20, 2^20) result from 13 MiB stored; ``_getitem_bound`` says 48 MiB, which fits the quota."""
    s = _session(worker)
    x = _send(worker, s, torch.ones(N, 1))
    mask = _send(worker, s, torch.ones(N, dtype=torch.bool))
    idx = _send(worker, s, torch.zeros(N, 1, dtype=torch.long))
    reply, _ = _command(worker, s, "Tensor.__getitem__", x, (mask, idx))
    assert _refused_unallocated(reply), f"x[mask, idx] ran and tried to allocate terabytes: {reply.message[:160]}"


# pinned properties (pass now) ------------------------------------------------------------------------------------

def test_typical_training_ops_are_not_refused_under_a_modest_quota(worker):
    s = _session(worker)
    X = _send(worker, s, torch.randn(64, 1, 28, 28))
    Y = _send(worker, s, torch.randint(0, 10, (64,)))
    W, B = _send(worker, s, torch.randn(8, 1, 3, 3)), _send(worker, s, torch.zeros(8))
    L, V = _send(worker, s, torch.randn(64, 10)), _send(worker, s, torch.randn(64))
    M, I = _send(worker, s, torch.rand(64) > 0.5), _send(worker, s, torch.tensor([1, 3, 5]))
    Wl, xl = _send(worker, s, torch.randn(10, 20)), _send(worker, s, torch.randn(64, 20))
    rm, rv = _send(worker, s, torch.zeros(1)), _send(worker, s, torch.ones(1))
    cases = [
        (F_ + "conv2d", (X, W, B), {}, 1), (F_ + "max_pool2d", (X, 2), {}, 1), (F_ + "relu", (L,), {}, 1),
        (F_ + "linear", (xl, Wl), {}, 1), (F_ + "cross_entropy", (L, Y), {}, 1), (F_ + "nll_loss", (L, Y), {}, 1),
        (F_ + "log_softmax", (L,), {"dim": 1}, 1), (F_ + "softmax", (L,), {"dim": 1}, 1),
        (F_ + "dropout", (L,), {"p": 0.5, "training": True}, 1),
        (F_ + "batch_norm", (X, rm, rv), {"training": True}, 1),
        ("Tensor.argmax", (L,), {"dim": 1}, 1), ("Tensor.eq", (Y, Y), {}, 1), ("Tensor.sum", (L,), {}, 1),
        ("Tensor.__getitem__", (L, (slice(0, 10),)), {}, 1), ("Tensor.__getitem__", (L, 3), {}, 1),
        ("Tensor.__getitem__", (V, I), {}, 1), ("Tensor.__getitem__", (V, M), {}, 1),
        ("Tensor.__getitem__", (L, (M, slice(None))), {}, 1),
        ("Tensor.sub_", (Wl, Wl), {"alpha": 0.1}, 1), ("Tensor.mul_", (Wl, 0.9), {}, 1),
        ("Tensor.add_", (Wl, Wl), {"alpha": -0.01}, 1), ("torch.unique", (Y,), {"return_counts": True}, 2),
        ("torch.nonzero", (M,), {}, 1), ("torch.masked_select", (V, M), {}, 1), ("torch.topk", (L, 3), {}, 2),
        ("torch.sort", (V,), {}, 2), ("Tensor.__setitem__", (V, M, 0.0), {}, 0),
        ("torch.nn.functional.one_hot", (Y, 10), {}, 1), ("veil.copy", (L,), {}, 1),
    ]
    refused = []
    for op, args, kwargs, n in cases:
        reply, _ = _command(worker, s, op, *args, n=n, **kwargs)
        if type(reply) is not m.OkReply:
            refused.append((op, reply))
    assert not refused, refused


def test_a_single_mask_is_within_the_getitem_bound():
    x, mask = torch.randn(256, 8), torch.rand(256) > 0.3
    assert output_bounds._getitem_bound((x, mask), {}) >= x[mask].untyped_storage().nbytes()
    assert output_bounds._getitem_bound((x, (mask, slice(None))), {}) >= x[mask, :].untyped_storage().nbytes()


def test_the_unsized_refusal_carries_no_value_of_its_inputs(worker):
    """The refusal text comes from a meta run (no values): the same for two different stored tensors."""
    s = _session(worker)
    texts = []
    for value in (3, 7):
        t = _send(worker, s, torch.tensor(value))
        reply, _ = _command(worker, s, "torch.zeros", t)
        assert _refused_unallocated(reply)
        texts.append(reply.message)
    assert texts[0] == texts[1] and "7" not in texts[1].split("(")[0]
