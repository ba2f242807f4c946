"""Red team of the two-party local products (commits 9a9b167, 294b813): ``beaver_local`` items
``(a, b, d = a0 b1 + a1 b0)`` dealt from the parties' shares, and ``beaver_combine_local``.

A hostile serving owner (the requester at the parties, as in test_redteam_dealt.py) and a hostile requester
at the crypto provider (raw ``veil.mpc.deal`` commands) try the new kind where the old ``(a, b, c)`` triple
was refused:

* ``d`` (derived) as a mask, opened alone after its item masked a client's input, opened beside its own
  mask, computed on and fetched; an item used unrestricted first as a mask of the client's input; the
  combine with the client's share as an operand or as its public ``part``; a value under the owner's review
  laundered through the combine;
* dealing requests for other party counts, other products, hostile kwargs, and product work that only the
  doubled count (two products per item at the provider) puts over the request bound: refused before any
  party receives anything (seeded and not);
* the combine's arguments: shapes checked before any product, one-line errors, no argument written or
  aliased (k = 0 too), a borrowed (in-place decoded) request never aliasing the requester's buffers;
* correctness against plain torch through the whole remote protocol: 1-row and 1-column products, a
  transposed weight as either operand, an empty reduction, int64 wrap at the ring's edges, the float64 limbs.

No hole found; these are regression tests of the attacks tried.
"""

from __future__ import annotations

import secrets

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, ReviewPendingError, VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc import beaver as beaver_module
from veil.mpc import ring_gemm
from veil.mpc.party import BORROWS, PARTY_FUNCTIONS, WIRE_PREFIX, OpenMessage
from veil.mpc.providers.base import Provider
from veil.mpc.providers.worker_dealer import DEAL
from veil.mpc.ring import DTYPE, random_ring
from veil.tensors.pointer import PointerTensor
from veil.tensors.remote_ops import _ref as ptr_ref
from veil.workers.oblivious import _public_parameters
from veil.workers.virtual import borrows_only

from tests.security.test_redteam_borrowed_requests import BIG, _head, _spans, _stored_tensors
from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _KEPT, _cmd, _open, _ref, _setup


@pytest.fixture(autouse=True)
def _local_items_at_any_size(monkeypatch):
    """These attacks use small products: let them take local items (by default from ring_gemm.MIN_WORK on)."""
    monkeypatch.setattr(beaver_module, "LOCAL_MIN_WORK", 0)

combine_local = PARTY_FUNCTIONS["beaver_combine_local"]
X = m.ObjectRef(BATCH)
COMBINE = WIRE_PREFIX + "beaver_combine_local"
# a local item whose a and d have the client's input's shape (1, 3): a (1, 3), b (3, 3), d (1, 3)
A_SHAPE, B_SHAPE = SHAPE, (SHAPE[1], SHAPE[1])


@pytest.fixture
def served(hook, request):
    """Party ``a`` holds the client's share SECRET (claimed into BATCH by the owner); WorkerDealer seeded."""
    return _setup(hook, f"rlp{request.node.name[-14:]}", SECRET)


def _item(dealer, a, b):
    item = dealer.local_triples("mm", A_SHAPE, B_SHAPE, [a.id, b.id])
    _KEPT.append(item)  # (dropping the pointers deletes the fields at the parties)
    return [_ref(p) for p in item[a.id]]


def _public(shape, value=1):
    return torch.full(shape, value, dtype=DTYPE)


def _serves(owner, a, dealer, b):
    """The party still opens an honest local item's masks over the client's input (nothing of it leaks)."""
    ra, rb, _ = _item(dealer, a, b)
    e, f = _open(owner, a, "beaver_mask", X, _public(B_SHAPE), ra, rb)
    assert e.shape == SECRET.shape and not torch.equal(e, SECRET)


# ------------------------------------------------------------------ the dealt-material rules for d


def test_the_cross_terms_field_is_not_a_mask(served):
    a, b, owner, dealer = served
    ra, rb, rd = _item(dealer, a, b)
    with pytest.raises(PermissionDeniedError, match="not a uniform field"):
        _open(owner, a, "trunc_mask", X, rd)
    with pytest.raises(PermissionDeniedError, match="not a uniform field"):
        _open(owner, a, "beaver_mask", X, _public(B_SHAPE), rd, rb)
    _serves(owner, a, dealer, b)


def test_the_fields_of_a_local_item_that_masked_the_client_belong_to_the_client(served):
    """x - a opened under a local item: its d (and a combine computed with it) is the client's from then on:
    not opened alone, not fetched after a torch op, not fetched as the combine's result."""
    a, b, owner, dealer = served
    ra, rb, rd = _item(dealer, a, b)
    e, _ = _open(owner, a, "beaver_mask", X, _public(B_SHAPE), ra, rb)
    assert not torch.equal(e, SECRET)
    with pytest.raises(PermissionDeniedError):
        _open(owner, a, "trunc_mask", rd, torch.zeros(SHAPE, dtype=DTYPE))
    with pytest.raises(PermissionDeniedError):
        _cmd(owner, a, "torch.add", (rd, 0), [6501])
        owner.send_msg(m.GetObjectsMessage([6501]), a)
    _cmd(owner, a, COMBINE, (ra, rb, rd, torch.zeros(SHAPE, dtype=DTYPE), torch.zeros(B_SHAPE, dtype=DTYPE)), [6502],
         {"part": 0, "parts": 2})
    with pytest.raises(PermissionDeniedError):  # z = a b + d: a share, still the client's
        owner.send_msg(m.GetObjectsMessage([6502]), a)
    with pytest.raises(PermissionDeniedError, match="already used"):  # and a masks nothing a second time
        _open(owner, a, "trunc_mask", X, ra)
    _serves(owner, a, dealer, b)


def test_d_opened_beside_its_own_mask_is_refused(served):
    """beaver_mask(x, d, a, a') opens x - a and d - a' (a' of another item): d = a0 b1 + a1 b0 beside the a it
    is computed from, over a protected x."""
    a, b, owner, dealer = served
    ra, _, rd = _item(dealer, a, b)
    ra2, _, _ = _item(dealer, a, b)
    with pytest.raises(PermissionDeniedError, match="derived dealt field"):
        _open(owner, a, "beaver_mask", X, rd, ra, ra2)
    _serves(owner, a, dealer, b)


def test_a_local_item_used_unrestricted_first_never_masks_the_client(served):
    """A combine on public e, f spends the item: its a, b mask no client value after it (the old triple's
    rule, for the new step)."""
    a, b, owner, dealer = served
    ra, rb, rd = _item(dealer, a, b)
    _cmd(owner, a, COMBINE, (ra, rb, rd, _public(SHAPE), _public(B_SHAPE)), [6510], {"part": 0, "parts": 2})
    fresh_a, fresh_b, _ = _item(dealer, a, b)
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "beaver_mask", X, _public(B_SHAPE), ra, fresh_b)
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "beaver_mask", X, _public(B_SHAPE), fresh_a, rb)
    _serves(owner, a, dealer, b)


def test_the_combine_on_the_clients_share_keeps_it_protected(served):
    """The client's share as the combine's opened operand e (z = (x + a) f + ...): the result is the client's."""
    a, b, owner, dealer = served
    ra, rb, rd = _item(dealer, a, b)
    _cmd(owner, a, COMBINE, (ra, rb, rd, X, torch.eye(SHAPE[1], dtype=DTYPE)), [6520], {"part": 1, "parts": 2})
    with pytest.raises(PermissionDeniedError):
        owner.send_msg(m.GetObjectsMessage([6520]), a)
    with pytest.raises(PermissionDeniedError):  # nor through an opening without a mask
        _open(owner, a, "trunc_mask", m.ObjectRef(6520), torch.zeros(SHAPE, dtype=DTYPE))
    _serves(owner, a, dealer, b)


@pytest.mark.parametrize("name", ["part", "parts"])
def test_the_clients_share_as_the_public_part_is_refused(served, name):
    """part/parts decide which rows a party subtracts: a share there would be a Python value (a branch and a
    shape: the oblivious guard's protocol_refusal)."""
    assert {(5, "part"), (6, "parts")} <= set(_public_parameters(COMBINE, None))
    a, b, owner, dealer = served
    ra, rb, rd = _item(dealer, a, b)
    kwargs = {"part": 0, "parts": 2}
    kwargs[name] = X
    with pytest.raises(PermissionDeniedError, match=f"public parameter '{name}'"):
        _cmd(owner, a, COMBINE, (ra, rb, rd, _public(SHAPE), _public(B_SHAPE)), [6530], kwargs)
    _serves(owner, a, dealer, b)


def test_a_value_under_review_laundered_through_the_local_combine_still_waits_for_review(hook):
    """z = (0 + 0)(0 + 0) + d with d a dataset under the owner's review: z is d, and its release waits."""
    w = sy.VirtualWorker(hook, id=f"rlp-rev-{secrets.token_hex(3)}")
    secret = torch.randint(-2**40, 2**40, (4, 5))
    w.load(secret.clone(), tags=("#rev",), private=True, policy="review")
    (ptr,) = w.search(["#rev"])
    zero_a, zero_b = torch.zeros((4, 3), dtype=DTYPE), torch.zeros((3, 5), dtype=DTYPE)
    out_id = new_id()
    hook.local_worker.send_msg(m.CommandMessage(COMBINE, (zero_a, zero_b, ptr_ref(ptr), zero_a, zero_b),
                                                {"part": 0, "parts": 2}, [out_id]), w)
    with pytest.raises(ReviewPendingError):
        PointerTensor(w, out_id, hook.local_worker, (4, 5), DTYPE).get()


# ------------------------------------------------------------------ dealing requests at the crypto provider


def _workers(hook, tag):
    return [sy.VirtualWorker(hook, id=f"rlp-{tag}-{n}") for n in ("alice", "bob", "carol", "dave")]


def _deal(hook, provider, spec, parties, count=1, seeded=False, fields=3):
    ids = [[new_id() for _ in range(count * fields)] for _ in parties]
    msg = m.CommandMessage(DEAL, ("beaver_local", spec, [p.id for p in parties], ids, count, seeded), {}, [], False)
    hook.local_worker.send_msg(msg, provider)


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "sent"])
@pytest.mark.parametrize("case", ["three", "one", "mul", "conv2d", "bmm", "matmul3d", "kwargs", "out", "negative",
                                  "doubled_work", "doubled_batch"])
def test_a_hostile_local_dealing_is_refused_before_any_party_receives_anything(hook, seeded, case):
    alice, bob, carol, dave = _workers(hook, f"{case[:6]}{int(seeded)}")
    two, count = [alice, bob], 1
    spec = {
        "three": ("mm", (4, 4), (4, 4), {}), "one": ("mm", (4, 4), (4, 4), {}),
        "mul": ("mul", (4, 4), (4, 4), {}), "conv2d": ("conv2d", (1, 1, 4, 4), (1, 1, 3, 3), {}),
        "bmm": ("bmm", (2, 4, 4), (2, 4, 4), {}), "matmul3d": ("matmul", (2, 4, 4), (4, 4), {}),
        "kwargs": ("mm", (4, 4), (4, 4), {"stride": 1}), "out": ("mm", (4, 4), (4, 4), {"out": 1}),
        "negative": ("mm", (-4, 4), (4, -4), {}),
        # one product of 2^32 multiply-adds passes a triple's bound; a local item costs two
        "doubled_work": ("mm", (2048, 1024), (1024, 2048), {}),
        # two items of 1.15e9 each: a triple request of 2.3e9 passes, the local one costs 4.6e9 > 2^32
        "doubled_batch": ("mm", (1024, 1024), (1024, 1100), {}),
    }[case]
    parties = {"three": [alice, bob, carol], "one": [alice]}.get(case, two)
    if case == "doubled_batch":
        count = 2
    with pytest.raises(VeilError) as info:
        _deal(hook, dave, spec, parties, count=count, seeded=seeded)
    assert "\n" not in str(info.value).strip()
    assert all(len(p.monitor) == 0 for p in (alice, bob, carol))  # no seed, no share went out
    if case.startswith("doubled"):
        assert "multiply-adds" in str(info.value)
    _deal(hook, dave, ("mm", (4, 3), (3, 2), {}), two, seeded=seeded)  # the provider still deals honestly
    assert len(alice.monitor) == 3 and len(bob.monitor) == 3


def test_the_client_takes_triples_where_a_local_item_would_cost_past_the_bound():
    """beaver._dealt asks for a local item only where its two products fit one request."""

    class Recorder(Provider):
        def __init__(self):
            self.asked = []

        def local_triples(self, op, shape_a, shape_b, parties):
            self.asked.append(("local", tuple(shape_a), tuple(shape_b)))
            return {p: ("a", "b", "d") for p in parties}

        def beaver_triples(self, op, shape_a, shape_b, parties, **kw):
            self.asked.append(("triple", tuple(shape_a), tuple(shape_b)))
            return {p: ("a", "b", "c") for p in parties}

        def truncation_pairs(self, *a, **k):
            raise AssertionError

        def comparison_material(self, *a, **k):
            raise AssertionError

    def meta(*shape):
        return torch.empty(shape, dtype=DTYPE, device="meta")

    parties = ["p0", "p1"]
    for shape_x, shape_y, want in (((2048, 1024), (1024, 2048), "triple"), ((2048, 1024), (1024, 1024), "local"),
                                   ((1, 7), (7, 1), "local"), ((3, 0), (0, 4), "local")):
        rec = Recorder()
        q = beaver_module._dealt({p: meta(*shape_x) for p in parties}, {p: meta(*shape_y) for p in parties}, "mm",
                                 rec, {})
        assert rec.asked[0][0] == want and q.local == (want == "local"), (shape_x, shape_y)
    rec = Recorder()  # three parties and kwargs keep triples
    beaver_module._dealt({p: meta(4, 4) for p in "xyz"}, {p: meta(4, 4) for p in "xyz"}, "mm", rec, {})
    assert rec.asked[0][0] == "triple"


# ------------------------------------------------------------------ the combine's arguments


@pytest.mark.parametrize("bad", ["dtype_float", "d_shape", "vector_d", "not_tensor", "a_b_mismatch"])
def test_the_combine_refuses_hostile_operands_in_one_line(bad):
    a, b, d = random_ring((3, 4)), random_ring((4, 2)), random_ring((3, 2))
    e, f = random_ring((3, 4)), random_ring((4, 2))
    args = {"dtype_float": (a, b, d, e.double(), f.double()), "d_shape": (a, b, random_ring((3, 3)), e, f),
            "vector_d": (a, b, random_ring((6,)), e, f), "not_tensor": (a, b, 5, e, f),
            "a_b_mismatch": (a, random_ring((3, 2)), d, e, random_ring((3, 2)))}[bad]
    with pytest.raises((ValueError, RuntimeError, AttributeError)) as info:
        combine_local(*args, part=0, parts=2)
    assert "\n" not in str(info.value)
    assert all(str(int(v)) not in str(info.value) for v in d.flatten()[:3])  # no value in the text


@pytest.mark.parametrize("shape", [(3, 4, 2), (1, 5, 1), (3, 0, 4), (0, 3, 2), (1, 1, 1)])
def test_the_combine_writes_no_argument_and_returns_fresh_memory(shape):
    """BORROWS: the step may be handed the requester's buffers in place, so it must write none and return
    none's memory (an empty reduction included: addmm's result is still its own)."""
    assert "beaver_combine_local" in BORROWS
    m_, k, n = shape
    args = [random_ring((m_, k)), random_ring((k, n)), random_ring((m_, n)), random_ring((m_, k)), random_ring((k, n))]
    before = [t.clone() for t in args]
    for part in (0, 1):
        z = combine_local(*args, part=part, parts=2)
        assert all(torch.equal(t, c) for t, c in zip(args, before))
        if z.numel():
            ptrs = {t.untyped_storage().data_ptr() for t in args if t.numel()}
            assert z.untyped_storage().data_ptr() not in ptrs


def test_a_borrowed_request_with_the_local_combine_keeps_nothing_of_the_requesters_memory(hook):
    """Only plain keyword arguments let a request be read in place; what the combine stores never lies in a
    buffer the requester sent, and changing those buffers afterwards changes nothing stored."""
    rows = BIG // 64
    e, f = random_ring((rows, 64)), random_ring((64, 64))
    opening = OpenMessage("trunc_mask", (), {})
    step = [COMBINE, [e, f], {"part": 0, "parts": 2}, [7], False]
    assert borrows_only(_head(opening, [step]))
    for hostile in ({"part": e, "parts": 2}, {"part": 0, "parts": m.ObjectRef(5)}, {"part": (e,), "parts": 2}):
        assert not borrows_only(_head(opening, [[COMBINE, [e, f], hostile, [7], False]]))

    w = sy.VirtualWorker(hook, id=f"rlp-borrow-{secrets.token_hex(3)}")
    me = hook.local_worker
    a, b, d = random_ring((rows, 64)), random_ring((64, 64)), random_ring((rows, 64))
    sent = [a, b, d, e, f]
    want = combine_local(*(t.clone() for t in sent), part=1, parts=2)
    out_id = new_id()
    received = []
    real = w._recv_msg

    def recv(data):
        if isinstance(data, list) and borrows_only(data[0]):
            received.extend(data[1:])
        return real(data)

    w._recv_msg = recv
    me.defer(w, [COMBINE, list(sent), {"part": 1, "parts": 2}, [out_id], False])
    me.flush(w)
    spans = _spans(received) + _spans([t.numpy() for t in sent])
    for t in _stored_tensors(w):
        lo = t.untyped_storage().data_ptr()
        hi = lo + t.untyped_storage().nbytes()
        assert all(hi <= s or lo >= e_ for s, e_ in spans)
    for t in sent:
        t.add_(1)
    assert torch.equal(PointerTensor(w, out_id, me, tuple(want.shape), DTYPE).get(), want)


# ------------------------------------------------------------------ correctness against plain torch


@pytest.fixture
def two_parties(hook):
    tag = secrets.token_hex(3)
    return [sy.VirtualWorker(hook, id=f"rlp-c-{tag}-{n}") for n in ("alice", "bob", "cp")]


def _local_used(monkeypatch):
    seen = []
    real = beaver_module._dealt

    def dealt(*args, **kwargs):
        product = real(*args, **kwargs)
        seen.append(product.local)
        return product

    monkeypatch.setattr(beaver_module, "_dealt", dealt)
    return seen


EDGE = [-(1 << 63), (1 << 63) - 1, -1, 1 << 62]


@pytest.mark.parametrize("shape", [(1, 5, 1), (1, 7, 9), (9, 7, 1), (3, 0, 4), (0, 3, 2), (5, 6, 4)])
@pytest.mark.parametrize("layout", ["plain", "transposed_weight", "transposed_x", "edges"])
def test_local_products_match_torch_over_the_ring(two_parties, monkeypatch, shape, layout):
    alice, bob, cp = two_parties
    seen = _local_used(monkeypatch)
    m_, k, n = shape
    x, y = random_ring((m_, k)), random_ring((k, n))
    if layout == "transposed_weight":
        y = random_ring((n, k)).t()
    elif layout == "transposed_x":
        x = random_ring((k, m_)).t()
    elif layout == "edges":
        x = torch.tensor(EDGE * (m_ * k), dtype=DTYPE)[: m_ * k].view(m_, k)
        y = torch.tensor(EDGE[::-1] * (k * n), dtype=DTYPE)[: k * n].view(k, n)
    for op in ("mm", "matmul"):
        sx, sy_ = x.share(alice, bob, crypto_provider=cp), y.share(alice, bob, crypto_provider=cp)
        z = getattr(sx, op)(sy_)
        assert torch.equal(z.get(), x @ y), (op, shape, layout)
    assert seen and all(seen)


def test_local_products_through_the_float64_limbs_match_torch(two_parties, monkeypatch):
    """The combine's addmm and its half of e @ f through the limbs (tiles, pieces of a long reduction)."""
    monkeypatch.setattr(ring_gemm, "_choice", True)
    monkeypatch.setattr(ring_gemm, "MIN_WORK", 0)
    alice, bob, cp = two_parties
    seen = _local_used(monkeypatch)
    for m_, k, n in ((40, 30, 50), (33, 800, 40)):
        x, y = random_ring((m_, k)), random_ring((n, k)).t()
        z = x.share(alice, bob, crypto_provider=cp) @ y.share(alice, bob, crypto_provider=cp)
        assert torch.equal(z.get(), x @ y)
    assert seen and all(seen)


# ------------------------------------------------------------------ through a network worker's session


def test_a_network_providers_session_refuses_a_hostile_local_dealing_in_one_line(hook):
    """A scientist session at a network worker acting as crypto provider: a local dealing for three parties
    (or past the doubled work bound) is an ErrorReply of one line before any party is even resolved (none of
    these ids exists), and the session keeps being served."""
    from server_sessions import answers_next_command, open_session, quota_worker, request

    srv = quota_worker(hook, f"rlp-net-cp-{secrets.token_hex(3)}", "rlp-sci-token", None)
    s = open_session(srv, "rlp-sci-token")
    for spec, parties in ((("mm", (4, 4), (4, 4), {}), ["p0", "p1", "p2"]),
                          (("mm", (2048, 1024), (1024, 2048), {}), ["p0", "p1"]),
                          (("conv2d", (1, 1, 4, 4), (1, 1, 3, 3), {}), ["p0", "p1"])):
        for seeded in (True, False):
            ids = [[new_id() for _ in range(3)] for _ in parties]
            reply = request(srv, s, m.CommandMessage(DEAL, ("beaver_local", spec, parties, ids, 1, seeded), {}, [],
                                                     False))
            assert type(reply) is m.ErrorReply and reply.error == "ProviderError", reply
            assert "\n" not in reply.message.strip(), reply
            assert "not found" not in reply.message and "unknown worker" not in reply.message.lower(), reply
    answers_next_command(srv, s)


@pytest.mark.parametrize("step", ["beaver_combine", "beaver_combine_local"])
def test_both_combines_are_charged_to_the_session_quota_alike(hook, step):
    """Under --max-session-mb the combine's result is charged as the old combine's is: a result past the quota
    is refused, nothing of it kept, and the session keeps being served."""
    from server_sessions import answers_next_command, open_session, quota_worker, send_tensor

    srv = quota_worker(hook, f"rlp-net-q-{step[-5:]}-{secrets.token_hex(3)}", "rlp-sci-q", 6 << 20)
    s = open_session(srv, "rlp-sci-q")
    n = 256  # 512 KiB per operand
    refs = [m.ObjectRef(send_tensor(srv, s, random_ring((n, n)))) for _ in range(5)]
    held = srv.monitor.session_bytes(s.id)
    kwargs = {"part": 0, "parts": 2} if step == "beaver_combine_local" else {"op": "mm", "first": True,
                                                                               "op_kwargs": {}}
    from server_sessions import request as req

    reply = req(srv, s, m.CommandMessage(WIRE_PREFIX + step, tuple(refs), kwargs, [new_id()], False))
    assert type(reply) is m.OkReply, reply  # fits: 5 x 512 KiB held + 512 KiB
    assert srv.monitor.session_bytes(s.id) == held + 8 * n * n
    send_tensor(srv, s, torch.zeros(((6 << 20) - 6 * 8 * n * n - (256 << 10)) // 8, dtype=DTYPE))  # all but 256 KiB
    before = srv.monitor.session_bytes(s.id)
    reply = req(srv, s, m.CommandMessage(WIRE_PREFIX + step, tuple(refs), kwargs, [new_id()], False))
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert srv.monitor.session_bytes(s.id) == before
    answers_next_command(srv, s)


@pytest.mark.parametrize("make", ["local", "worker seeded", "worker unseeded"])
def test_each_partys_share_of_d_is_uniform_and_not_its_own_cross_term(hook, make):
    """Statistics of what a party receives: d_i must be a fresh uniform share, not a0 b1 or a1 b0 (either would
    give a party a product with the other party's mask share). Bits of d_i, and of d_i less each cross term a
    party could hold, are balanced over 4096 entries."""
    from veil.mpc.providers import LocalDealer
    from veil.mpc.providers.worker_dealer import WorkerDealer

    tag = secrets.token_hex(3)
    if make == "local":
        got = LocalDealer(seed=11).local_triples("mm", (64, 16), (16, 64), ["p0", "p1"])
        (a0, b0, d0), (a1, b1, d1) = got.values()
    else:
        owner, cp = (sy.VirtualWorker(hook, id=f"rlp-u-{tag}-{n}") for n in ("owner", "cp"))
        workers = [sy.VirtualWorker(hook, id=f"rlp-u-{tag}-{i}") for i in range(2)]
        dealer = WorkerDealer(cp, owner, seeded=(make == "worker seeded"))
        items = dealer.local_triples("mm", (64, 16), (16, 64), [w.id for w in workers])
        (a0, b0, d0), (a1, b1, d1) = (tuple(t.location._objects[t.id_at_location].clone() for t in items[w.id])
                                      for w in workers)
    assert torch.equal(d0 + d1, a0 @ b1 + a1 @ b0)
    for v in (d0, d1, d0 - a0 @ b1, d0 - a1 @ b0, d1 - a1 @ b0, d1 - a0 @ b1, d0 - a0 @ b0, d1 - a1 @ b1):
        for bit in (0, 31, 63):
            mean = ((v >> bit) & 1).double().mean().item()
            assert abs(mean - 0.5) < 0.05, (make, bit, mean)  # (4096 fair bits: sd 0.008)
