"""Products past the provider's per-item bound, split into items within it (veil/mpc/product_split.py).

The bound used for splitting is lowered (``product_split.SPLIT_WORK``; where the provider runs in this process,
``material.MAX_PRODUCT_WORK`` too, so that an unsplit item would be refused): every split product must equal
torch's exactly (integer shares), open in the rounds and bytes of the unsplit one (contracted-dimension splits),
and a hostile request must still be refused per item and per request.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import veil as sy
from veil.mpc import fixed_operand, material, product_split
from veil.mpc.beaver import beaver_op
from veil.mpc.communicator import communicate
from veil.mpc.errors import ProviderError
from veil.mpc.opening import count_openings, reconstruct
from veil.mpc.providers import LocalDealer
from veil.mpc.providers.dealing_recipe import bounded_recipe
from veil.mpc.providers.fss_dealing import MAX_BATCH_ELEMENTS
from veil.mpc.ring import bilinear
from veil.mpc.sharing import split

SMALL = 1 << 12

#: op, x, y, kwargs: each over SMALL multiply-adds; the contracted-dimension splits and the block fallbacks
CASES = {
    "mm_contracted": ("mm", (6, 1000), (1000, 2), {}),
    "matmul_batched": ("matmul", (3, 4, 120), (120, 5), {}),
    "bmm": ("bmm", (2, 5, 300), (2, 300, 3), {}),
    "matmul_vector": ("matmul", (5000,), (5000,), {}),
    "matmul_rows": ("matmul", (80, 3), (3, 70), {}),  # 5600 outputs: rows in blocks, each block's K in pieces
    "conv2d_channels": ("conv2d", (2, 16, 6, 6), (3, 16, 3, 3), {"padding": 1}),
    "conv2d_groups": ("conv2d", (1, 32, 5, 5), (4, 16, 3, 3), {"padding": 1, "groups": 2}),
    "conv2d_batch": ("conv2d", (8, 2, 12, 12), (2, 2, 3, 3), {"padding": 1}),  # 2304 outputs x 18: blocks of N
    "mul_rows": ("mul", (70, 80), (70, 80), {}),
    "mul_broadcast": ("mul", (70, 80), (80,), {}),
}


def _ints(shape, gen):
    return torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=torch.int64)


def _shared(value, parties, gen):
    return dict(zip(parties, split(value, len(parties), gen)))


@pytest.fixture
def small_bound(monkeypatch):
    """Splits past SMALL; the in-process provider refuses an item past it, as a real one past 2^32."""
    monkeypatch.setattr(product_split, "SPLIT_WORK", SMALL)
    monkeypatch.setattr(material, "MAX_PRODUCT_WORK", SMALL)


@pytest.mark.parametrize("case", list(CASES))
def test_every_piece_is_within_the_bound(case):
    op, sx, sy_, kw = CASES[case]
    shape_c = material.product_shape(op, sx, sy_, kw)
    assert material.product_work(op, sx, sy_, shape_c) > SMALL  # (the case needs a split)
    plan = product_split.plan_split(op, sx, sy_, kw, SMALL)
    assert plan is not None and len(plan.pieces) >= 2 and sum(plan.block_sizes) == len(plan.pieces)
    for piece in plan.pieces:
        px, py = product_split._sliced_shape(sx, piece.x_slices), product_split._sliced_shape(sy_, piece.y_slices)
        assert material.product_work(op, px, py, material.product_shape(op, px, py, kw)) <= SMALL
    assert product_split.plan_split(op, sx, sy_, kw, 1 << 32) is None  # within the normal bound: one item


@pytest.mark.parametrize("case", list(CASES))
def test_split_product_equals_torch(parties, gen, small_bound, case):
    op, sx, sy_, kw = CASES[case]
    x, y = _ints(sx, gen), _ints(sy_, gen)
    dealer = LocalDealer(seed=5)
    with pytest.raises(ProviderError, match="split the product"):  # one item: refused at a provider
        material.recipe("beaver", (op, sx, sy_, kw))
    got = reconstruct(beaver_op(_shared(x, parties, gen), _shared(y, parties, gen), op, dealer, **kw))
    assert torch.equal(got, bilinear(op)(x, y, **kw))


def test_a_wrong_join_is_visible(gen, small_bound):
    """The comparison above can fail: the pieces of a contracted split summed into one block are the
    product; one piece dropped is not."""
    op, sx, sy_, kw = CASES["mm_contracted"]
    x, y = _ints(sx, gen), _ints(sy_, gen)
    plan = product_split.plan_split(op, sx, sy_, kw)
    parts = [bilinear(op)(product_split.take(x, p.x_slices), product_split.take(y, p.y_slices)) for p in plan.pieces]
    assert torch.equal(product_split._join(parts, list(plan.block_sizes)), x @ y)
    assert not torch.equal(product_split._join(parts[1:], [len(parts) - 1]), x @ y)


def _network_product(parties, cp, x, y, op, kw):
    sx, sy_ = x.share(*parties, crypto_provider=cp), y.share(*parties, crypto_provider=cp)
    fn = {"mm": torch.mm, "matmul": torch.matmul, "conv2d": torch.nn.functional.conv2d}[op]
    with communicate(parties) as comm:
        out = fn(sx, sy_, **kw)
        out.child  # noqa: B018  (opened)
    return out.get(), comm


@pytest.fixture(params=[2, 3], ids=["2party", "3party"])
def virtual(request, hook):
    names = ("alice", "bob", "charlie")[: request.param]
    return [sy.VirtualWorker(hook, id=n) for n in names], sy.VirtualWorker(hook, id="crypto_provider")


@pytest.mark.parametrize("case", ["mm_contracted", "conv2d_channels"])
def test_rounds_and_opened_bytes_equal_the_unsplit_product(virtual, gen, monkeypatch, case):
    """Workers and a provider worker: the same rounds and opened bytes per party as one item at the normal
    bound (a contracted split partitions both operands; every piece's masks open in the one round)."""
    parties, cp = virtual
    op, sx, sy_, kw = CASES[case]
    x, y = _ints(sx, gen) >> 20, _ints(sy_, gen) >> 20
    want = bilinear(op)(x, y, **kw)
    whole, whole_comm = _network_product(parties, cp, x, y, op, kw)
    monkeypatch.setattr(product_split, "SPLIT_WORK", SMALL)
    monkeypatch.setattr(material, "MAX_PRODUCT_WORK", SMALL)  # (this process's provider refuses unsplit items)
    pieces, comm = _network_product(parties, cp, x, y, op, kw)
    assert torch.equal(whole, want) and torch.equal(pieces, want)
    assert comm.rounds == whole_comm.rounds == 1
    assert comm.opened_bytes == whole_comm.opened_bytes


@pytest.mark.parametrize("n", [2, 3], ids=["2party", "3party"])
def test_network_workers_split_a_product(connect_websocket, gen, n):
    """Parties and provider are `veil worker` processes (the provider keeps its 2^32 bound): the pieces
    open in one round, the bytes of the unsplit product, and the result is torch's."""
    parties = [connect_websocket(name) for name in ("alice", "bob", "charlie")[:n]]
    cp = connect_websocket("dave")
    op, sx, sy_, kw = CASES["matmul_batched"]
    x, y = _ints(sx, gen) >> 20, _ints(sy_, gen) >> 20
    whole, whole_comm = _network_product(parties, cp, x, y, op, kw)
    product_split.SPLIT_WORK = SMALL
    try:
        pieces, comm = _network_product(parties, cp, x, y, op, kw)
        authenticated, stats = _mac_product(parties, cp, x >> 4, y >> 4, op, kw)  # (its steps known there too)
    finally:
        product_split.SPLIT_WORK = None
    assert torch.equal(whole, x @ y) and torch.equal(pieces, x @ y)
    assert comm.rounds == whole_comm.rounds == 1 and comm.opened_bytes == whole_comm.opened_bytes
    assert torch.equal(authenticated, (x >> 4) @ (y >> 4)) and stats.rounds == 3


def _gradients(x, w):
    dealer = LocalDealer(seed=3)
    sx = x.fix_precision().share("alice", "bob", crypto_provider=dealer)
    sw = w.fix_precision().share("alice", "bob", crypto_provider=dealer)
    sx.requires_grad_(), sw.requires_grad_()
    out = sx @ sw
    out.child  # noqa: B018  (the forward product opened before the count)
    with count_openings() as stats:
        out.backward(torch.ones(6, 4).fix_precision().share("alice", "bob", crypto_provider=dealer))
        grads = sx.grad.get().float_precision(), sw.grad.get().float_precision()
    return grads, stats


def test_peer_openings_split_a_product(connect_websocket, gen, monkeypatch):
    """Network parties that open among themselves (peer openings): the pieces' masks open party to party in
    the one round, and the result is torch's."""
    from veil.tensors.mpc_glue import runtime

    monkeypatch.setattr(runtime, "PEER_MIN_ELEMENTS", 0)
    parties = [connect_websocket(name) for name in ("alice", "bob", "charlie")]
    runtime.enable_peer_openings(*parties)
    monkeypatch.setattr(product_split, "SPLIT_WORK", SMALL)
    try:
        for case in ("mm_contracted",):
            op, sx, sy_, kw = CASES[case]
            x, y = _ints(sx, gen) >> 24, _ints(sy_, gen) >> 24
            got, comm = _network_product(parties, connect_websocket("dave"), x, y, op, kw)
            assert torch.equal(got, bilinear(op)(x, y, **kw)) and comm.rounds == 1
    finally:
        runtime.enable_peer_openings(*parties, enabled=False)


def test_lazy_gradients_of_a_split_product_open_together(gen, monkeypatch):
    """A backward pass's two gradient products (pending, veil/tensors/pending_products.py), both split: the
    rounds and bytes of the unsplit pass, and torch's gradients."""
    x, w = torch.randn(6, 500, generator=gen), torch.randn(500, 4, generator=gen)
    (wx, ww), whole = _gradients(x, w)
    monkeypatch.setattr(product_split, "SPLIT_WORK", SMALL)
    assert product_split.plan_split("mm", (500, 6), (6, 4)).block_sizes == (3,)  # (x^T @ grad: one block)
    assert product_split.plan_split("mm", (6, 4), (4, 500)).block_sizes == (4,)  # (grad @ w^T too)
    (gx, gw), pieces = _gradients(x, w)
    assert pieces.rounds == whole.rounds and pieces.bytes_by_party == whole.bytes_by_party
    for got, want in ((gx, torch.ones(6, 4) @ w.t()), (gw, x.t() @ torch.ones(6, 4)), (wx, gx), (ww, gw)):
        assert torch.allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("op,sx,sw,kw", [("conv2d", (8, 2, 8, 8), (2, 2, 3, 3), {"padding": 1}),
                                         ("mm", (40, 30), (30, 5), {})], ids=["conv2d", "mm"])
def test_fixed_operand_product_splits_its_batch(parties, gen, monkeypatch, op, sx, sw, kw):
    """A served model's batch past the bound: blocks of x against the one fixed mask, each e in the one
    round, no byte more than the unsplit product opens."""
    dealer = LocalDealer(seed=9)
    w, x = _ints(sw, gen), _ints(sx, gen)
    fixed = fixed_operand.fix_operand(_shared(w, parties, gen), dealer)
    with count_openings() as whole:
        unsplit = reconstruct(fixed_operand.fixed_product(_shared(x, parties, gen), fixed, op, **kw))
    monkeypatch.setattr(product_split, "SPLIT_WORK", SMALL)
    monkeypatch.setattr(material, "MAX_PRODUCT_WORK", SMALL)
    assert product_split.plan_left_blocks(op, sx, sw, kw) is not None
    with count_openings() as pieces:
        got = reconstruct(fixed_operand.fixed_product(_shared(x, parties, gen), fixed, op, **kw))
    assert torch.equal(unsplit, bilinear(op)(x, w, **kw)) and torch.equal(got, unsplit)
    assert pieces.rounds == whole.rounds and pieces.bytes_by_party == whole.bytes_by_party


# ------------------------------------------------------------------ a hostile requester


def test_one_item_over_the_bound_is_still_refused():
    """Splitting is the honest requester's: a request naming one item past the bound is refused before
    anything is allocated (shapes only), for every product kind."""
    big = ("mm", (1 << 11, 1 << 11), (1 << 11, 1 << 11), {})  # 2^33 multiply-adds
    for kind, spec in (("beaver", big), ("beaver_mac", ("k" * 8,) + big), ("fixed_beaver", ("f" * 16,) + big)):
        with pytest.raises(ProviderError, match="split the product"):
            bounded_recipe(kind, spec, 1)


def test_a_request_of_many_items_at_the_bound_is_refused():
    """Items each just within the bound but few ring elements (a padded convolution's work is ~2^15 times its
    elements): by elements alone 64 of them fit one request (2^38 multiply-adds on the dealing slot); the
    per-request cap refuses the second."""
    spec = ("conv2d", (1, 256, 1, 1), (1, 256, 16, 16), {"padding": 135})
    _, _, shape_a, shape_b, shape_c = material._product(*spec)
    assert material.product_work("conv2d", shape_a, shape_b, shape_c) == material.MAX_PRODUCT_WORK
    elements = sum(math.prod(s) for s in (shape_a, shape_b, shape_c))
    assert 2 * elements <= MAX_BATCH_ELEMENTS  # (the element bound alone would let it pass)
    bounded_recipe("beaver", spec, 1)
    with pytest.raises(ProviderError, match="multiply-adds, more than"):
        bounded_recipe("beaver", spec, 2)


def test_product_pieces_copies_no_more_than_the_operands():
    """``product_pieces`` is a worker function any session may call on its shares: an honest split
    partitions the operands, so overlapping slices that would copy more than them are refused, and so are
    malformed ones; an honest call copies exactly the operands."""
    x, y = torch.arange(12).view(3, 4), torch.arange(8).view(4, 2)
    halves_x, halves_y = [[[1, 0, 2, 1]], [[1, 2, 2, 1]]], [[[0, 0, 2, 1]], [[0, 2, 2, 1]]]
    got = product_split._pieces(x, y, halves_x, halves_y)
    assert torch.equal(torch.cat(got[:2], 1), x) and torch.equal(torch.cat(got[2:], 0), y)
    with pytest.raises(ValueError, match="more entries than the operands"):
        product_split._pieces(x, y, [[[0, 0, 3, 1]]] * 3, [])  # x three times
    for bad in ([[[1, 0, 2]]], [[[1, -1, 2, 1]]], [[]], [[[1, 0, 2, 1.0]]]):
        with pytest.raises(ValueError, match="product_pieces"):
            product_split._pieces(x, None, bad, [])
    with pytest.raises(RuntimeError):  # past the end: torch's one-line refusal, nothing copied
        product_split._pieces(x, None, [[[1, 3, 2, 1]]], [])


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 4096), rows=st.integers(1, 64), cols=st.integers(1, 64), count=st.integers(1, 64))
def test_no_accepted_request_costs_more_than_the_cap(k, rows, cols, count):
    """Whatever count and shapes a request names, an accepted one costs at most the request cap."""
    spec = ("mm", (rows, k), (k, cols), {})
    try:
        bounded_recipe("beaver", spec, count)
    except ProviderError:
        return
    assert count * rows * cols * k <= material.MAX_REQUEST_PRODUCT_ITEMS * material.MAX_PRODUCT_WORK


def test_the_honest_dealer_keeps_each_request_within_the_cap(virtual, gen, monkeypatch):
    """A provider worker in this process at the lowered bound: a split product's identical pieces are
    requested within the per-request cap (the honest dealer batches fewer), so none is refused."""
    parties, cp = virtual
    monkeypatch.setattr(product_split, "SPLIT_WORK", SMALL)
    monkeypatch.setattr(material, "MAX_PRODUCT_WORK", SMALL)
    x, y = _ints((6, 600), gen) >> 20, _ints((600, 2), gen) >> 20
    sx, sy_ = x.share(*parties, crypto_provider=cp), y.share(*parties, crypto_provider=cp)
    for _ in range(2):  # (the second product's batch would have doubled)
        assert torch.equal((sx @ sy_).get(), x @ y)
    for case in ("matmul_rows", "conv2d_batch"):  # blocks (and their pieces) on workers too
        op, shape_x, shape_y, kw = CASES[case]
        x, y = _ints(shape_x, gen) >> 24, _ints(shape_y, gen) >> 24
        got, _ = _network_product(parties, cp, x, y, op, kw)
        assert torch.equal(got, bilinear(op)(x, y, **kw))


# ------------------------------------------------------------------ property: split == unsplit


@settings(max_examples=25, deadline=None)
@given(op=st.sampled_from(["mm", "matmul", "conv2d", "mul"]), a=st.integers(1, 6), b=st.integers(1, 12),
       c=st.integers(1, 6), n=st.integers(1, 3), bound_bits=st.integers(2, 8), seed=st.integers(0, 2**31))
def test_split_equals_unsplit_for_random_shapes(op, a, b, c, n, bound_bits, seed):
    gen = torch.Generator().manual_seed(seed)
    if op == "conv2d":
        sx, sy_, kw = (n, b, a + 2, c + 2), (a, b, 3, 3), {"padding": 1}
    elif op == "mul":
        sx, sy_, kw = (a, b, c), (b, c) if n == 1 else (a, b, c), {}
    elif op == "matmul":
        sx, sy_, kw = (n, a, b), (b, c), {}
    else:
        sx, sy_, kw = (a, b), (b, c), {}
    x, y = _ints(sx, gen), _ints(sy_, gen)
    parties = ("alice", "bob", "charlie")[: 2 + seed % 2]
    unsplit = reconstruct(beaver_op(_shared(x, parties, gen), _shared(y, parties, gen), op, LocalDealer(seed=1), **kw))
    product_split.SPLIT_WORK = 1 << bound_bits
    try:
        got = reconstruct(beaver_op(_shared(x, parties, gen), _shared(y, parties, gen), op, LocalDealer(seed=2), **kw))
    finally:
        product_split.SPLIT_WORK = None
    assert torch.equal(got, unsplit) and torch.equal(got, bilinear(op)(x, y, **kw))


# ------------------------------------------------------------------ the list form of fixed_mask, red team


@pytest.fixture
def served(hook, request):
    """Party ``a`` holds a serving client's input share (protected: every opening of it needs fresh masks)."""
    from tests.security.test_redteam_dealt import SECRET, _setup

    return _setup(hook, f"rps{request.node.name[-14:]}", SECRET)


def test_split_fixed_masks_open_each_piece_under_its_own_mask(served):
    """Honest: a protected input's pieces open in one ``fixed_mask`` under one fresh mask each; a mask named
    twice, a piece wider than its mask, or the fixed mask among them is refused."""
    import secrets

    from veil.exceptions import PermissionDeniedError
    from veil.messaging import messages as m
    from tests.security.test_redteam_dealt import BATCH, SECRET, _cmd, _open, _ref

    a, b, owner, dealer = served
    ids = [9101, 9102]
    _cmd(owner, a, "veil.mpc.product_pieces", (m.ObjectRef(BATCH), None, [[[1, 0, 1, 1]], [[1, 1, 2, 1]]], []), ids)
    fid = secrets.token_hex(16)
    fixed = dealer.fixed_operand_mask(fid, (1, 1), [a.id, b.id])
    keep = [fixed]

    def mask(width):
        triple = dealer.fixed_operand_triples(fid, "mul", (1, width), (1, 1), [a.id, b.id])
        keep.append(triple)
        return _ref(triple[a.id][0])

    pieces = [m.ObjectRef(i) for i in ids]
    with pytest.raises(PermissionDeniedError, match="twice"):
        m1 = mask(1)
        _open(owner, a, "fixed_mask", pieces, [m1, m1])
    with pytest.raises(PermissionDeniedError, match="own shape"):
        _open(owner, a, "fixed_mask", pieces, [mask(1), mask(1)])  # (the second piece is 2 wide)
    with pytest.raises(PermissionDeniedError, match="fixed mask"):
        _open(owner, a, "fixed_mask", pieces, [mask(1), _ref(fixed[a.id][0])])
    e1, e2 = _open(owner, a, "fixed_mask", pieces, [mask(1), mask(2)])
    assert e1.shape == (1, 1) and e2.shape == (1, 2)
    assert not torch.equal(torch.cat([e1, e2], 1), SECRET) and len(keep) > 1


# ------------------------------------------------------------------ authenticated (SPDZ2k) products


def _mac_product(parties, cp, x, y, op, kw):
    fn = {"mm": torch.mm, "matmul": torch.matmul, "conv2d": torch.nn.functional.conv2d}[op]
    sx = x.share(*parties, crypto_provider=cp, active_security=True)
    sy_ = y.share(*parties, crypto_provider=cp, active_security=True)
    with count_openings() as stats:
        got = fn(sx, sy_, **kw).get()  # (the product's round, the output's, the MAC check's)
    return got, stats


@pytest.mark.parametrize("case", ["mm_contracted", "matmul_rows"])
def test_authenticated_split_product_equals_torch(virtual, gen, monkeypatch, case):
    """Workers and a provider worker: an authenticated product past the bound, in pieces, equals torch's
    and, for a contracted split, opens in the rounds and bytes of the unsplit one."""
    parties, cp = virtual
    op, sx, sy_, kw = CASES[case]
    x, y = _ints(sx, gen) >> 24, _ints(sy_, gen) >> 24
    whole, whole_stats = _mac_product(parties, cp, x, y, op, kw)
    monkeypatch.setattr(product_split, "SPLIT_WORK", SMALL)
    monkeypatch.setattr(material, "MAX_PRODUCT_WORK", SMALL)  # (this process's provider refuses unsplit items)
    pieces, stats = _mac_product(parties, cp, x, y, op, kw)
    assert torch.equal(whole, bilinear(op)(x, y, **kw)) and torch.equal(pieces, whole)
    assert stats.rounds == whole_stats.rounds
    if case != "matmul_rows":  # (blocks: y's mask opened once per block)
        # the same e and f entries; the MAC check answers one 128-bit gamma (3 words) per opened value
        extra = 24 * (len(parties) - 1) * 2 * (len(product_split.plan_split(op, sx, sy_, kw).pieces) - 1)
        assert {p: b - extra for p, b in stats.bytes_by_party.items()} == whole_stats.bytes_by_party


def test_a_tampered_piece_fails_the_mac_check(gen, monkeypatch):
    """Every piece's opened masks join the batched check: one party's share of one piece off by one aborts."""
    from veil.mpc.errors import MacCheckError
    from veil.mpc.party import PARTY_FUNCTIONS

    monkeypatch.setattr(product_split, "SPLIT_WORK", SMALL)
    honest, calls = PARTY_FUNCTIONS["product_pieces"], []

    def tampered(*args):
        out = honest(*args)
        calls.append(1)
        return (out[0] + 1, *out[1:]) if len(calls) == 1 else out  # the first party's x value limb, piece 0

    monkeypatch.setitem(PARTY_FUNCTIONS, "product_pieces", tampered)
    dealer = LocalDealer(seed=5)
    op, sx, sy_, kw = CASES["mm_contracted"]
    x, y = _ints(sx, gen) >> 24, _ints(sy_, gen) >> 24
    ax = x.share("a", "b", crypto_provider=dealer, active_security=True)
    ay = y.share("a", "b", crypto_provider=dealer, active_security=True)
    with pytest.raises(MacCheckError, match="piece 0"):
        (ax @ ay).get()
    assert calls
