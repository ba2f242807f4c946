"""Red team of the leftovers of the stored-object accounting: gradients ``backward`` makes, and the crypto
provider's tables lock (MAC keys, fixed masks).

Holes found and fixed:
- a gradient ``backward`` made was charged only once a later command named its tensor: a session made a leaf
  that costs 256 bytes (``zeros(1).expand(n).requires_grad_()``), summed it and ran ``backward``: an n-element
  gradient, sized against the room left but never charged. Each round held another room's worth: 8 rounds held
  6.4 MB beside a 6 KB charge under a 1 MiB quota (unbounded with more rounds);
- ``backward``'s size was remembered by its root's signature (a scalar loss: every loss the same), so the second
  ``backward`` of a session was never sized again: one ``backward`` over 7 such leaves made 5.6 MB of gradients
  at once under a 1 MiB quota (any number of leaves: any size);
- a plan's ``backward`` reaching a stored leaf that is not one of its inputs (through a stored result's graph)
  left that leaf's gradient uncharged too;
- a new fixed mask (up to 2^25 elements from the OS's CSPRNG: seconds) was generated under the provider tables'
  lock: every other session's MAC-key registration, key or mask lookup and session end waited that long;
- registering a MAC key counted the session's keys by walking every session's keys under that lock, and a session's
  end walked both tables whole (O(all sessions' keys) per registration and per end);
- a session's end walked every session's lingering charges under the store's lock (each live gradient is one now).

Gradients ``backward`` makes are now charged to the session as they are made (a hook on each leaf its graph
reaches, registered when ``backward`` is sized; veil/workers/grad_charges.py), for as long as they live, and a
command naming their tensor does not charge them again; ``backward`` is sized anew each time
(veil/workers/output_bounds.py). Masks are drawn outside the lock, their id and room reserved under it; each
session's ids are indexed (veil/mpc/material.py); lingering charges are kept per session (veil/workers/store.py).
The fixed-mask recipes read the requester's scope when they derive, as MAC keys do, not when the recipe is made: a
dealing that checks its recipe before entering the scope otherwise names every session's masks under one scope
(None), and an intruder's triples used a victim's mask.
"""

import threading
import time
import warnings

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize
from veil.mpc import material
from veil.plans.ops import PlanOp, PlanSpec, SlotRef

from network_helpers import get_as, in_process_server

R = m.ObjectRef
SUM, ADD, MUL = (ALLOWLIST.by_func(f).name for f in (torch.Tensor.sum, torch.add, torch.mul))
QUOTA = 2**20
N = 200_000  # a leaf's elements: 800 kB of gradient, within a 1 MiB quota's room


def _send(server, session, msg):
    return deserialize(server.serve_bytes(serialize(msg, sender="f"), session))[0]


def _ok(server, session, op, args, ids):
    reply = _send(server, session, m.CommandMessage(op, args, {}, ids, True))
    assert reply == m.OkReply(), reply
    return reply


def _cheap_leaf(server, session, base: int, n: int = N, send=_ok, expand=True) -> int | None:
    """A leaf of ``n`` elements (``base + 2``) that costs the quota 256 bytes (an expanded scalar), and its sum: the
    sum's id (None: a step was refused for the quota, ``send`` being :func:`_quota_or_ok`)."""
    steps = [("torch.zeros", (1 if expand else n,), [base + 1]),
             ("Tensor.expand" if expand else "Tensor.view", (R(base + 1), [n]), [base + 2]),
             ("Tensor.requires_grad_", (R(base + 2),), [0]), (SUM, (R(base + 2),), [base + 3])]
    for op, args, ids in steps:
        if send(server, session, op, args, ids) != m.OkReply():
            return None
    return base + 3


def _quota_or_ok(server, session, op, args, ids):
    reply = _send(server, session, m.CommandMessage(op, args, {}, ids, True))
    assert reply == m.OkReply() or (type(reply) is m.ErrorReply and reply.error == "QuotaExceededError"), reply
    return reply


def _quota_server(hook, name):
    server, _, session = in_process_server(hook, name)
    server.monitor.max_session_bytes = QUOTA
    return server, session


def _held_grads(server, ids) -> int:
    objects = server.monitor.owner_objects()
    return sum(objects[i].grad.untyped_storage().nbytes() for i in ids if objects[i].grad is not None)


def test_gradients_backward_makes_are_charged_when_made(hook):
    """Round after round: a cheap leaf, its sum, ``backward``. What the session holds in gradients is charged to it,
    so it never holds past its quota (before: 6.4 MB of gradients beside a 6 KB charge)."""
    server, s = _quota_server(hook, "sl-grads")
    leaves = []
    for k in range(8):
        root = _cheap_leaf(server, s, 100 * k, send=_quota_or_ok)
        if root is None:
            continue
        _quota_or_ok(server, s, "Tensor.backward", (R(root),), [])
        leaves.append(100 * k + 2)
        held = _held_grads(server, leaves)
        assert held <= server.monitor.session_bytes(s.id) <= QUOTA, (k, held)
    assert _held_grads(server, leaves) >= N * 4  # (the first fitted: honest backward runs)
    server.end_session(s)


def test_a_gradient_charged_when_made_is_not_charged_again_and_is_freed_with_it(hook):
    """Named by a later command, its tensor is not charged its gradient twice; the gradient set to None, the charge
    goes."""
    server, s = _quota_server(hook, "sl-once")
    n = N // 4
    root = _cheap_leaf(server, s, 0, n, expand=False)
    before = server.monitor.session_bytes(s.id)
    _ok(server, s, "Tensor.backward", (R(root),), [])
    made = server.monitor.session_bytes(s.id)
    assert made - before >= n * 4
    _ok(server, s, MUL, (R(2), 2.0), [10])  # names the leaf: its gradient is charged already
    after = server.monitor.session_bytes(s.id)
    assert after - made < n * 4 + 1024, (made, after)  # (its result's n * 4 bytes only)
    assert torch.equal(get_as(server, s, 10), torch.zeros(n))
    _ok(server, s, "Tensor.grad.__set__", (R(2), None), [])
    assert server.monitor.owner_objects()[2].grad is None
    import gc

    gc.collect()
    assert server.monitor.session_bytes(s.id) <= after - n * 4
    server.end_session(s)


def test_one_backward_over_many_leaves_is_sized_each_time(hook):
    """``backward``'s size was remembered by its root's signature: after one tiny ``backward``, one over 7 cheap leaves
    of 800 kB each ran unsized (5.6 MB of gradients under a 1 MiB quota)."""
    server, s = _quota_server(hook, "sl-cached")
    _ok(server, s, "Tensor.backward", (R(_cheap_leaf(server, s, 0, 1)),), [])
    roots = [_cheap_leaf(server, s, 100 * k) for k in range(1, 8)]
    total = roots[0]
    for i, r in enumerate(roots[1:]):
        _ok(server, s, ADD, (R(total), R(r)), [5000 + i])
        total = 5000 + i
    reply = _send(server, s, m.CommandMessage("Tensor.backward", (R(total),), {}, [], True))
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert _held_grads(server, [100 * k + 2 for k in range(1, 8)]) <= QUOTA
    server.end_session(s)


def test_a_plans_backward_charges_a_stored_leaf_it_reaches_through_a_graph(hook):
    """The plan's input is a stored result ``y = x * 1`` of a cheap leaf ``x``; its ``backward`` gives ``x`` a gradient,
    though ``x`` is no input of the command: charged to the session all the same."""
    server, s = _quota_server(hook, "sl-plan")
    _cheap_leaf(server, s, 0, N // 4)
    _ok(server, s, MUL, (R(2), 1.0), [5])
    plan = PlanSpec("bw", 1, 0, 2, [PlanOp(SUM, (SlotRef(0),), {}, [1], True),
                                    PlanOp("Tensor.backward", (SlotRef(1),), {}, [], True)], SlotRef(1))
    before = server.monitor.session_bytes(s.id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reply = _send(server, s, m.CommandMessage("veil.plan.run", (plan, [R(5)], []), {}, [20], True))
    assert reply == m.OkReply(), reply
    grad = server.monitor.owner_objects()[2].grad
    assert torch.equal(grad, torch.ones(N // 4))  # (values as torch gives them)
    assert server.monitor.session_bytes(s.id) - before >= grad.untyped_storage().nbytes()
    server.end_session(s)


def test_honest_training_steps_keep_a_steady_charge(hook):
    """A weight, a loss, ``backward``, an update, the gradient cleared: the charge goes up and back each step (not
    one gradient more per step), and the values are torch's."""
    server, s = _quota_server(hook, "sl-steps")
    _ok(server, s, "torch.ones", (1000,), [1])
    _ok(server, s, "Tensor.requires_grad_", (R(1),), [0])
    _ok(server, s, "torch.full", ((1000,), 2.0), [2])
    w = torch.ones(1000, requires_grad=True)
    charges = []
    for step in range(4):
        b = 100 * (step + 1)
        _ok(server, s, MUL, (R(1), R(2)), [b])
        _ok(server, s, SUM, (R(b),), [b + 1])
        _ok(server, s, "Tensor.backward", (R(b + 1),), [])
        (w * 2.0).sum().backward()
        _ok(server, s, "Tensor.grad.__get__", (R(1),), [b + 2])
        assert torch.equal(get_as(server, s, b + 2), w.grad)
        _ok(server, s, "Tensor.grad.__set__", (R(1), None), [])
        w.grad = None
        for oid in (b, b + 1, b + 2):
            assert _send(server, s, m.DeleteMessage([oid])) == m.OkReply()
        charges.append(server.monitor.session_bytes(s.id))
    assert charges[-1] == charges[1], charges
    server.end_session(s)


class _Spy(tuple):
    """A table key that counts the reads of its fields: a walk over every session's keys reads them."""

    reads: list = []

    def __getitem__(self, i):
        _Spy.reads.append(i)
        return super().__getitem__(i)


def test_a_sessions_mac_keys_are_counted_and_dropped_without_walking_other_sessions():
    mine = f"mac-count-{time.monotonic_ns()}"
    others = [_Spy((f"other-{i}-{time.monotonic_ns()}", "k")) for i in range(3)]
    try:
        for k in others:
            material.MAC_KEYS[k] = torch.tensor(1)
        _Spy.reads.clear()
        with material.provider_scope(mine):
            material.register_mac_key("k0", torch.tensor(5))
        assert material.drop_provider_scope(mine) == 1
        assert _Spy.reads == [], len(_Spy.reads)
        assert all(k in material.MAC_KEYS for k in others) and (mine, "k0") not in material.MAC_KEYS
    finally:
        for k in others:
            material.MAC_KEYS.pop(k, None)
        material.drop_provider_scope(mine)


def test_a_large_fixed_mask_is_made_outside_the_tables_lock(monkeypatch):
    """While one session's mask is drawn (seconds for 2^25 elements), another session registers its MAC key at once;
    the mask is kept when drawn, once per id, and counted in its session's room."""
    real = material.random_ring
    started, release = threading.Event(), threading.Event()

    def slow_ring(shape, generator=None):
        started.set()
        release.wait(120)  # (until the test lets it go: a registration waiting for the lock would wait this out)
        return real(shape, generator)

    monkeypatch.setattr(material, "random_ring", slow_ring)
    slow, quick = (f"fixed-lock-{name}-{time.monotonic_ns()}" for name in ("slow", "quick"))
    dealt, errors = [], []

    def deal():
        with material.provider_scope(slow):
            _, _, derive = material._fixed_mask(("fixed-operand-slow-0001", (3, 2)))
            dealt.append(derive([], None)[0])

    dealer = threading.Thread(target=deal)
    try:
        dealer.start()
        assert started.wait(120)
        registrar = threading.Thread(target=lambda: _register(quick, errors))
        t0 = time.monotonic()
        registrar.start()
        registrar.join(60)  # (the mask is still being drawn: release is set only below)
        waited = time.monotonic() - t0
        assert not registrar.is_alive() and not errors, (waited, errors)
        with material.provider_scope(slow):  # the same id meanwhile: refused (once per id)
            with pytest.raises(material.ProviderError, match="already dealt"):
                material._fixed_mask(("fixed-operand-slow-0001", (3, 2)))[2]([], None)
        release.set()
        dealer.join(10)
        kept = material.FIXED_MASKS[(slow, "fixed-operand-slow-0001")]
        assert torch.equal(dealt[0], kept) and kept.shape == (3, 2)
        assert material.drop_provider_scope(slow) == 1
    finally:
        release.set()
        material.drop_provider_scope(slow)
        material.drop_provider_scope(quick)


def _register(scope, errors):
    try:
        with material.provider_scope(scope):
            material.register_mac_key("k", torch.tensor(3))
    except Exception as e:  # noqa: BLE001
        errors.append(e)


def test_a_mask_drawn_for_a_session_that_ended_meanwhile_is_not_kept(monkeypatch):
    real = material.random_ring
    scope = f"fixed-ended-{time.monotonic_ns()}"

    def ring_then_end(shape, generator=None):
        ender = threading.Thread(target=material.drop_provider_scope, args=(scope,))  # its session ends meanwhile
        ender.start()
        ender.join(2)  # (a drop waiting on the lock the draw holds: joined once the draw ends)
        return real(shape, generator)

    monkeypatch.setattr(material, "random_ring", ring_then_end)
    try:
        with material.provider_scope(scope):
            with pytest.raises(material.ProviderError):
                material._fixed_mask(("fixed-operand-ended-01", (4,)))[2]([], None)
        assert (scope, "fixed-operand-ended-01") not in material.FIXED_MASKS
        monkeypatch.setattr(material, "random_ring", real)
        with material.provider_scope(scope):  # its room is whole again
            for i in range(3):
                material._fixed_mask((f"fixed-operand-ended-{i + 10}", (4,)))[2]([], None)
        assert material.drop_provider_scope(scope) == 3
    finally:
        material.drop_provider_scope(scope)


def test_a_fixed_mask_recipe_made_before_the_scope_is_entered_keeps_sessions_apart():
    """A dealing may check its recipe before it enters the requester's scope: the masks it keeps and reads are the
    scope's at derive time, so an intruder's triples never use the victim's mask."""
    victim, intruder = (f"fixed-scope-{name}-{time.monotonic_ns()}" for name in ("victim", "intruder"))
    fixed_id = "fixed-operand-scoped-01"
    try:
        _, _, deal = material._fixed_mask((fixed_id, (3, 2)))  # (made outside any scope)
        _, _, triple = material._fixed_beaver((fixed_id, "mm", (4, 3), (3, 2), {}))
        with material.provider_scope(victim):
            b = deal([], None)[0]
        assert torch.equal(material.FIXED_MASKS[(victim, fixed_id)], b) and (None, fixed_id) not in material.FIXED_MASKS
        a = torch.ones(4, 3, dtype=torch.int64)
        with material.provider_scope(intruder), pytest.raises(material.ProviderError, match="no fixed mask"):
            triple([a], None)
        with material.provider_scope(victim):
            assert torch.equal(triple([a], None)[0], a @ b)
    finally:
        material.drop_provider_scope(victim)
        material.drop_provider_scope(intruder)


class _CountingDict(dict):
    walks: list = []

    def __iter__(self):
        _CountingDict.walks.append(1)
        return super().__iter__()


def test_a_sessions_end_never_walks_other_sessions_lingering_charges(hook):
    """Every live gradient ``backward`` made is a lingering charge now: a session's end dropped its own by walking
    every session's, under the store's lock."""
    from veil.workers.websocket_auth import authenticate

    from network_helpers import TOKEN

    server, tokens, s = in_process_server(hook, "sl-linger")
    server.monitor.max_session_bytes = QUOTA
    other = authenticate(tokens, [TOKEN])
    server.sessions[other.id] = other
    root = _cheap_leaf(server, s, 0, N // 8, expand=False)
    _ok(server, s, "Tensor.backward", (R(root),), [])
    _ok(server, other, "torch.ones", (8,), [1])
    _ok(server, other, "Tensor.requires_grad_", (R(1),), [0])
    _ok(server, other, SUM, (R(1),), [2])
    _ok(server, other, "Tensor.backward", (R(2),), [])
    store = server.monitor._store
    held = server.monitor.session_bytes(s.id)
    store._lingering = _CountingDict(store._lingering)
    _CountingDict.walks.clear()
    server.end_session(other)
    assert _CountingDict.walks == [] and server.monitor.session_bytes(s.id) == held
    assert other.id not in store.usage
    server.end_session(s)
