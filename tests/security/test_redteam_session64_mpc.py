"""Red team (session 64) of the MPC surface workers expose, newest code first: the ``beaver_local`` items of
two-party matrix products (``beaver_combine_local``, ``material._beaver_local``, ``FROM_SHARES``, the dealer's
two-party refusal) and the protocol steps' place under the session quota.

Attacks tried (hostile scientist/serving owner at a party or at the crypto provider, raw commands):

* a protocol step (``beaver_combine_local``, ``beaver_combine``, ``beaver_mask``) run by a scientist on views the
  session stored for 256 bytes each (``Tensor.expand`` of one element): worker functions are not sized before
  they run (``handlers._run_resolved`` skips ``output_bounds.check`` for them), so the product of the views'
  *logical* sizes was allocated and computed in full and only its result refused afterwards; an opening
  (``OpenMessage("beaver_mask", views)``) replied with the views' logical size, past the quota. Fixed: a
  protocol step's operands are charged what they stand for past their storage before it runs
  (``output_bounds.check_view_room``, from ``handlers._run_resolved`` and ``OpeningRules.open_step``), and
  a combine costing more multiply-adds than any dealt item is refused (``beaver._check_work``);
* malformed ``beaver_local`` dealing specs (NaN, nested lists, strings, shapes whose storage overflows, wrong
  arity, ``None``/``out`` kwargs): one line, before any party receives anything, and the provider still deals;
* a dealing whose ids name the client's stored share at a party (seeded and sent): refused, the share intact;
* the combine's public ``part``/``parts`` as bools, floats, negatives, zero, three parts: one line, nothing stored;
* narrower integer dtypes and strided/transposed/expanded operands in the combine: no argument written, fresh
  memory returned, the value that of the formula;
* the derived ``d`` alone in a combine (the requester's own ``a``, ``b``): the item is spent and never masks the
  client afterwards; fields of two items mixed in one combine after one masked the client: the result is the
  client's, and the same item replayed in a second combine stays the client's.
"""

from __future__ import annotations

import secrets

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc import beaver as beaver_module
from veil.mpc.party import PARTY_FUNCTIONS, WIRE_PREFIX
from veil.mpc.providers.worker_dealer import DEAL
from veil.mpc.ring import DTYPE, random_ring

from tests.security.aten_watch import LargestMade
from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _KEPT, _cmd, _open, _ref, _setup

combine_local = PARTY_FUNCTIONS["beaver_combine_local"]
COMBINE = WIRE_PREFIX + "beaver_combine_local"
X = m.ObjectRef(BATCH)
B_SHAPE = (SHAPE[1], SHAPE[1])


@pytest.fixture(autouse=True)
def _local_items_at_any_size(monkeypatch):
    monkeypatch.setattr(beaver_module, "LOCAL_MIN_WORK", 0)


@pytest.fixture
def served(hook, request):
    """Party ``a`` holds the client's share SECRET (claimed into BATCH by the owner); WorkerDealer seeded."""
    return _setup(hook, f"rs64{request.node.name[-12:]}{secrets.token_hex(2)}", SECRET)


def _item(dealer, a, b):
    item = dealer.local_triples("mm", SHAPE, B_SHAPE, [a.id, b.id])
    _KEPT.append(item)
    return [_ref(p) for p in item[a.id]]


def _serves(owner, a, dealer, b):
    """An honest local item still masks the client's input at the party (nothing of it leaks)."""
    ra, rb, _ = _item(dealer, a, b)
    e, _ = _open(owner, a, "beaver_mask", X, torch.ones(B_SHAPE, dtype=DTYPE), ra, rb)
    assert e.shape == SECRET.shape and not torch.equal(e, SECRET)


def _get_refused(owner, party, oid):
    with pytest.raises(PermissionDeniedError):
        owner.send_msg(m.GetObjectsMessage([oid]), party)


# ------------------------------------------------------------------ protocol steps under the session quota


STEPS = {
    "beaver_combine_local": ({"part": 0, "parts": 2}, 5, 1),
    "beaver_combine_mm": ({"op": "mm", "first": True, "op_kwargs": {}}, 5, 1),
    "beaver_combine_mul": ({"op": "mul", "first": True, "op_kwargs": {}}, 5, 1),
    "beaver_mask": ({}, 4, 2),
}


# Was a hole (fixed in session 64): worker functions (every veil.mpc.* protocol step) were not sized before they
# ran, and the quota charges a stored view its storage (256 bytes for Tensor.expand of one element). A scientist
# under --max-session-mb stored one element, expanded it to N x N and ran beaver_combine_local / beaver_combine /
# beaver_mask on the views: the worker allocated N x N results and temporaries and computed an N^3 product
# before the result was refused (N = 8192: >1.5 GiB and minutes of CPU per request for a session charged 512
# bytes). Now output_bounds.check_view_room charges the views' logical size first.
@pytest.mark.parametrize("step", list(STEPS))
def test_a_protocol_step_on_expanded_views_is_sized_before_it_computes(hook, step):
    from server_sessions import answers_next_command, open_session, quota_worker, request, send_tensor, computed

    quota = 1 << 20
    srv = quota_worker(hook, f"rs64-q-{step[-5:]}-{secrets.token_hex(3)}", "rs64-sci-token", quota)
    s = open_session(srv, "rs64-sci-token")
    one = m.ObjectRef(send_tensor(srv, s, torch.ones(1, 1, dtype=DTYPE)))
    n = 512  # a 2 MiB result from views charged 256 bytes each
    big = computed(srv, s, "Tensor.expand", one, n, n)
    held = srv.monitor.session_bytes(s.id)
    assert held < 4096  # the views are charged their storage, not their N x N entries
    kwargs, nargs, nout = STEPS[step]
    name = WIRE_PREFIX + ("beaver_combine" if step.startswith("beaver_combine_m") else step)
    seen = LargestMade()
    with seen:
        reply = request(srv, s, m.CommandMessage(name, (big,) * nargs, kwargs, [new_id() for _ in range(nout)],
                                                 False))
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert "\n" not in reply.message.strip()
    assert srv.monitor.session_bytes(s.id) == held  # nothing kept
    answers_next_command(srv, s)
    # the safe behaviour: refused before anything of the product's size was made (at most the quota's room)
    assert seen.most * 8 <= quota, f"{step} allocated {seen.most * 8 >> 20} MiB for a session under a 1 MiB quota"


# Was a hole (fixed in session 64): the same amplification through an opening, OpenMessage("beaver_mask",
# views), replied with two N x N tensors for a session that stores 512 bytes (N = 2^14: a 4 GiB reply per
# request). OpeningRules.open_step now charges the operands' logical size first.
def test_an_opening_on_expanded_views_is_not_a_reply_larger_than_what_the_session_holds(hook):
    from server_sessions import answers_next_command, computed, open_session, quota_worker, request, send_tensor

    from veil.mpc.party import OpenMessage

    quota = 1 << 20
    srv = quota_worker(hook, f"rs64-open-{secrets.token_hex(3)}", "rs64-sci-token", quota)
    s = open_session(srv, "rs64-sci-token")
    one = m.ObjectRef(send_tensor(srv, s, torch.ones(1, 1, dtype=DTYPE)))
    big = computed(srv, s, "Tensor.expand", one, 512, 512)
    reply = request(srv, s, OpenMessage("beaver_mask", (big, big, big, big), {}))
    answers_next_command(srv, s)
    sent = sum(t.numel() * t.element_size() for t in getattr(reply, "objects", None) or ())
    assert sent <= quota, f"a session holding {srv.monitor.session_bytes(s.id)} bytes got a {sent >> 20} MiB opening"


# ------------------------------------------------------------------ hostile dealing specs at the crypto provider


HOSTILE_SPECS = {
    "nan_dim": ("mm", (float("nan"), 4), (4, 4), {}),
    "list_dim": ("mm", [[4], 4], (4, 4), {}),
    "overflowing_storage": ("mm", (1 << 62, 1 << 62), (1 << 62, 1 << 62), {}),
    "overflowing_empty_reduction": ("mm", (1 << 31, 0), (0, 1 << 31), {}),
    "huge_empty_reduction": ("mm", (1 << 20, 0), (0, 1 << 20), {}),
    "mismatched": ("mm", (4, 4), (5, 4), {}),
    "short": ("mm", (4, 4)),
    "long": ("mm", (4, 4), (4, 4), {}, 1),
    "string": "mm",
    "none": None,
    "none_kwargs": ("mm", (4, 4), (4, 4), None),
    "out_kwarg": ("mm", (4, 4), (4, 4), {"out": None}),
    "vector": ("matmul", (4,), (4, 4), {}),
    "unknown_op": ("addmm", (4, 4), (4, 4), {}),
}


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "sent"])
@pytest.mark.parametrize("case", list(HOSTILE_SPECS))
def test_a_malformed_local_dealing_spec_is_refused_in_one_line_before_any_party_receives_anything(hook, case,
                                                                                                   seeded):
    tag = f"rs64-d-{case[:8]}{int(seeded)}-{secrets.token_hex(2)}"
    alice, bob, cp = (sy.VirtualWorker(hook, id=f"{tag}-{n}") for n in ("alice", "bob", "cp"))
    ids = [[new_id() for _ in range(3)] for _ in range(2)]
    msg = m.CommandMessage(DEAL, ("beaver_local", HOSTILE_SPECS[case], [alice.id, bob.id], ids, 1, seeded), {}, [],
                           False)
    with pytest.raises(VeilError) as info:
        hook.local_worker.send_msg(msg, cp)
    assert "\n" not in str(info.value).strip() and len(str(info.value)) < 500
    assert len(alice.monitor) == 0 and len(bob.monitor) == 0
    ids = [[new_id() for _ in range(3)] for _ in range(2)]  # the provider still deals honestly
    hook.local_worker.send_msg(m.CommandMessage(
        DEAL, ("beaver_local", ("mm", (4, 3), (3, 2), {}), [alice.id, bob.id], ids, 1, seeded), {}, [], False), cp)
    assert len(alice.monitor) == 3 and len(bob.monitor) == 3


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "sent"])
@pytest.mark.parametrize("field", [0, 2], ids=["uniform", "derived"])
def test_a_dealing_whose_ids_name_the_clients_share_never_overwrites_it(hook, seeded, field):
    """A requester at the provider names the client's share (BATCH at party a) as a field's id: the party must
    refuse the id, keep the share as it was, and keep it the client's."""
    a, b, owner, dealer = _setup(hook, f"rs64-ow{int(seeded)}{field}-{secrets.token_hex(2)}", SECRET)
    ids = [[new_id() for _ in range(3)] for _ in range(2)]
    ids[0][field] = BATCH
    with pytest.raises(PermissionDeniedError, match="already in use"):
        owner.send_msg(m.CommandMessage(DEAL, ("beaver_local", ("mm", SHAPE, B_SHAPE, {}), [a.id, b.id], ids, 1,
                                               seeded), {}, [], False), dealer.worker)
    assert torch.equal(a._objects[BATCH], SECRET)
    _get_refused(owner, a, BATCH)
    _serves(owner, a, dealer, b)


# ------------------------------------------------------------------ the combine's arguments


@pytest.mark.parametrize("kw", [{"part": True, "parts": 2}, {"part": 0, "parts": True}, {"part": 0.0, "parts": 2},
                                {"part": -1, "parts": 2}, {"part": 0, "parts": 0}, {"part": 2, "parts": 3},
                                {"part": 1, "parts": 1}, {"part": "0", "parts": 2}, {"part": None, "parts": 2}],
                         ids=["bool_part", "bool_parts", "float", "negative", "zero_parts", "three", "part_eq_parts",
                              "string", "none"])
def test_hostile_public_parts_are_refused_in_one_line_at_the_party(served, kw):
    a, b, owner, dealer = served
    ra, rb, rd = _item(dealer, a, b)
    before = len(a.monitor)
    out = new_id()
    with pytest.raises(VeilError) as info:
        _cmd(owner, a, COMBINE, (ra, rb, rd, torch.zeros(SHAPE, dtype=DTYPE), torch.zeros(B_SHAPE, dtype=DTYPE)),
             [out], kw)
    assert "\n" not in str(info.value).strip()
    assert len(a.monitor) == before  # nothing stored under the return id
    _serves(owner, a, dealer, b)


def _formula(a, b, d, e, f, part, parts):
    a, b, d, e, f = (t.to(DTYPE).contiguous() for t in (a, b, d, e, f))
    z = (e + a) @ (f + b) + d
    rows = e.shape[0]
    lo, hi = rows * part // parts, rows * (part + 1) // parts
    ef = e @ f
    z[:lo] -= ef[:lo]
    z[hi:] -= ef[hi:]
    return z


@pytest.mark.parametrize("layout", ["int32_a", "uint8_b", "int16_a_bool_b", "transposed_d", "transposed_e",
                                    "strided_f", "expanded_a", "expanded_d"])
def test_the_combine_on_odd_layouts_writes_nothing_and_returns_fresh_memory(layout):
    m_, k, n = 6, 5, 4
    a, b, d, e, f = random_ring((m_, k)), random_ring((k, n)), random_ring((m_, n)), random_ring((m_, k)), \
        random_ring((k, n))
    if layout == "int32_a":
        a = a.to(torch.int32)
    elif layout == "uint8_b":
        b = b.to(torch.uint8)
    elif layout == "int16_a_bool_b":
        a, b = a.to(torch.int16), (b & 1).bool()
    elif layout == "transposed_d":
        d = random_ring((n, m_)).t()
    elif layout == "transposed_e":
        e = random_ring((k, m_)).t()
    elif layout == "strided_f":
        f = random_ring((k, 2 * n))[:, ::2]
    elif layout == "expanded_a":
        a = random_ring((1, k)).expand(m_, k)
    elif layout == "expanded_d":
        d = random_ring((1, 1)).expand(m_, n)
    args = [a, b, d, e, f]
    before = [t.clone() for t in args]
    for part in (0, 1):
        z = combine_local(*args, part=part, parts=2)
        assert all(torch.equal(t, c) for t, c in zip(args, before))
        assert z.dtype == DTYPE and torch.equal(z, _formula(*before, part, 2))
        assert z.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in args}
        z.add_(1)  # the result is its own: writing it changes no argument
        assert all(torch.equal(t, c) for t, c in zip(args, before))


@pytest.mark.parametrize("bad", ["float_d", "int32_d", "complex_e", "float_f"])
def test_the_combine_refuses_non_ring_dealt_or_opened_values_in_one_line(bad):
    a, b, d, e, f = random_ring((3, 4)), random_ring((4, 2)), random_ring((3, 2)), random_ring((3, 4)), \
        random_ring((4, 2))
    args = {"float_d": (a, b, d.double(), e, f), "int32_d": (a, b, d.to(torch.int32), e, f),
            "complex_e": (a, b, d, e.to(torch.complex64), f), "float_f": (a, b, d, e, f.double())}[bad]
    before = [t.clone() for t in args]
    with pytest.raises((ValueError, RuntimeError)) as info:
        combine_local(*args, part=0, parts=2)
    assert "\n" not in str(info.value)
    assert all(str(int(v)) not in str(info.value) for v in d.flatten()[:3])
    assert all(torch.equal(t, c) for t, c in zip(args, before))


# ------------------------------------------------------------------ dealt-material rules through the combine


def test_the_derived_field_alone_in_a_combine_spends_its_item(served):
    """z = (e + a') (f + b') + d with the requester's own a', b' (e = -a', f = -b'): z is d_i, revealable to the
    requester (a command, unrestricted). The item's a and b must mask the client's input nothing afterwards."""
    a, b, owner, dealer = served
    ra, rb, rd = _item(dealer, a, b)
    zero_a, zero_b = torch.zeros(SHAPE, dtype=DTYPE), torch.zeros(B_SHAPE, dtype=DTYPE)
    out = new_id()
    _cmd(owner, a, COMBINE, (zero_a, zero_b, rd, zero_a, zero_b), [out], {"part": 0, "parts": 2})
    fresh_a, fresh_b, _ = _item(dealer, a, b)
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "beaver_mask", X, torch.ones(B_SHAPE, dtype=DTYPE), ra, fresh_b)
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "beaver_mask", X, torch.ones(B_SHAPE, dtype=DTYPE), fresh_a, rb)
    _serves(owner, a, dealer, b)


def test_mixed_items_and_a_replayed_combine_stay_the_clients(served):
    """The item that masked the client (a1, b1, d1) combined with another item's fields (a2 b2 d2), and the same
    item's combine run twice with other public operands: every result is the client's (no get, no opening)."""
    a, b, owner, dealer = served
    ra1, rb1, rd1 = _item(dealer, a, b)
    ra2, rb2, rd2 = _item(dealer, a, b)
    e, f = _open(owner, a, "beaver_mask", X, torch.ones(B_SHAPE, dtype=DTYPE), ra1, rb1)
    kw = {"part": 0, "parts": 2}
    outs = [new_id() for _ in range(4)]
    _cmd(owner, a, COMBINE, (ra1, rb2, rd2, e, f), [outs[0]], kw)
    _cmd(owner, a, COMBINE, (ra2, rb2, rd1, e, f), [outs[1]], kw)
    _cmd(owner, a, COMBINE, (ra1, rb1, rd1, e, f), [outs[2]], kw)
    _cmd(owner, a, COMBINE, (ra1, rb1, rd1, -e, torch.zeros(B_SHAPE, dtype=DTYPE)), [outs[3]], {"part": 0,
                                                                                              "parts": 1})
    for oid in outs:
        _get_refused(owner, a, oid)
        with pytest.raises(PermissionDeniedError):
            _open(owner, a, "trunc_mask", m.ObjectRef(oid), torch.zeros(SHAPE, dtype=DTYPE))
    _serves(owner, a, dealer, b)


@pytest.mark.parametrize("step", ["beaver_combine_local", "beaver_combine_mm"])
def test_a_combine_costing_more_than_any_dealt_item_is_refused_before_it_computes(hook, step, monkeypatch):
    """Stored operands of real storage (charged, within the quota) whose product costs more multiply-adds than
    any dealt item (``material.MAX_PRODUCT_WORK``, lowered here to 2^12 for a 32^3 product): refused in one line
    before any product is computed, and the worker still serves."""
    from server_sessions import answers_next_command, open_session, quota_worker, request, send_tensor

    monkeypatch.setattr(beaver_module, "MAX_PRODUCT_WORK", 1 << 12)
    srv = quota_worker(hook, f"rs64-work-{step[-5:]}-{secrets.token_hex(3)}", "rs64-sci-token", 1 << 20)
    s = open_session(srv, "rs64-sci-token")
    x = m.ObjectRef(send_tensor(srv, s, random_ring((32, 32))))
    kwargs, nargs, nout = STEPS[step]
    name = WIRE_PREFIX + ("beaver_combine" if step.startswith("beaver_combine_m") else step)
    seen = LargestMade()
    with seen:
        reply = request(srv, s, m.CommandMessage(name, (x,) * nargs, kwargs, [new_id() for _ in range(nout)], False))
    assert type(reply) is m.ErrorReply and "multiply-adds" in reply.message and "\n" not in reply.message.strip(), reply
    assert seen.most < 32 * 32, f"{step} made a tensor of {seen.most} entries before it was refused"
    answers_next_command(srv, s)


def test_a_masked_input_on_an_expanded_view_is_sized_before_it_computes(hook):
    """The same amplification through another worker function: secure aggregation's ``masked_input`` on a
    state tensor stored as an N x N ``expand`` view of one element (charged its storage) concatenated, encoded
    and masked N x N entries before its result was refused. Must hold: refused under the quota before anything
    of that size is made, in one line, and the worker still serves."""
    from server_sessions import answers_next_command, computed, send_tensor
    from tests.security.test_redteam_session63 import MASKED, Setup

    setup = Setup(hook)
    quota = 1 << 20
    setup.srv.monitor.max_session_bytes = quota
    one = m.ObjectRef(send_tensor(setup.srv, setup.s1, torch.ones(1, 1)))
    big = computed(setup.srv, setup.s1, "Tensor.expand", one, 1024, 1024)  # 8 MiB of float32 entries
    tag = setup.round()
    seen = LargestMade()
    with seen:
        reply, _ = setup.command(setup.s1, MASKED, tag, [setup.srv.id, "p1"], [big], 1.0)
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert "\n" not in reply.message.strip()
    assert seen.most * 4 <= quota, f"masked_input made a tensor of {seen.most} entries under a 1 MiB quota"
    assert not setup.went_through(tag)
    answers_next_command(setup.srv, setup.s1)
