"""Red team: exact ring products through float64 limbs (veil.mpc.ring_gemm) as an attacker and a reviewer.

Exactness against torch's int64 ops on awkward operands (views, piece bounds, tiles, geometry); the
limbs' scratch memory of a Beaver combine, a batched product or a convolution, bounded whatever the
requester's shapes; a requester's long reduction into a narrow product (a dealing or a combine) kept on
torch's int64 loop, which the limbs' per-piece passes made ~100x slower; the one-time calibration under
failures, concurrent first calls and fork; and a path choice that depends on shapes only, never values.
"""

import multiprocessing
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.mpc import ring, ring_gemm

INT64_MIN = -(1 << 63)
#: low and middle limbs at -2^21: the largest limb products (2^42), all of one sign
WORST = -(1 << 21) - (1 << 43)


def full_range(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.int64).random_(INT64_MIN, None, generator=g)


@pytest.fixture
def limbs_on(monkeypatch):
    """The limbs serve every product their rules admit here, however small."""
    monkeypatch.setattr(ring_gemm, "_choice", True)
    monkeypatch.setattr(ring_gemm, "MIN_WORK", 0)
    monkeypatch.setattr(ring_gemm, "MIN_CONV_TAPS", 0)
    monkeypatch.setattr(ring_gemm, "MIN_OUTPUT", 0, raising=False)
    monkeypatch.setattr(ring_gemm, "MIN_REUSE", 0, raising=False)


class FloatSizes:
    """Wraps a torch function and records the element counts of the float64 tensors it takes and gives."""

    def __init__(self, fn):
        self.fn, self.largest, self.calls = fn, 0, 0

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        for t in (*args, *kwargs.values(), out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == "cpu":
                self.calls += 1
                self.largest = max(self.largest, t.numel())
        return out


# ------------------------------------------------------------------ resources: the limbs' scratch memory

def test_a_beaver_combines_limb_scratch_stays_within_the_cap(limbs_on, monkeypatch):
    """A party's combine sized only by the dealt c (worker functions are not sized before they run):
    the limbs' float64 copies (3x each operand) and float64 products must not grow with the request."""
    from veil.mpc.beaver import _combine

    cap = 1 << 15
    monkeypatch.setattr(ring_gemm, "SCRATCH_ELEMENTS", cap, raising=False)
    spy = FloatSizes(torch.mm)
    monkeypatch.setattr(torch, "mm", spy)
    m, k, n = 64, 700, 48
    a, e = full_range(m, k, seed=1), full_range(m, k, seed=2)
    b, f = full_range(k, n, seed=3), full_range(k, n, seed=4)
    c = full_range(m, n, seed=5)
    got = _combine(a, b, c, e, f, "mm", True, {})
    want = c + spy.fn(e, b + f) + spy.fn(a, f)
    assert spy.calls and torch.equal(got, want)
    assert spy.largest <= cap


def test_batched_products_and_convolutions_keep_limb_scratch_within_the_cap(limbs_on, monkeypatch):
    cap = 1 << 15
    monkeypatch.setattr(ring_gemm, "SCRATCH_ELEMENTS", cap, raising=False)
    bmm, conv = FloatSizes(torch.bmm), FloatSizes(F.conv2d)
    matmul = FloatSizes(torch.matmul)
    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setattr(torch, "matmul", matmul)
    monkeypatch.setattr(F, "conv2d", conv)
    x, y = full_range(16, 40, 60, seed=1), full_range(16, 60, 40, seed=2)
    assert torch.equal(ring_gemm.bmm(x, y), bmm.fn(x, y))
    patches, kernels = full_range(4, 2, 30, 64, seed=3), full_range(1, 2, 64, 30, seed=4)
    assert torch.equal(ring_gemm.matmul(patches, kernels), matmul.fn(patches, kernels))
    img, w = full_range(16, 32, 10, 10, seed=5), full_range(16, 32, 3, 3, seed=6)
    assert torch.equal(ring.conv2d(img, w, 1, 1), conv.fn(img, w, None, 1, 1))
    for spy in (bmm, matmul, conv):
        assert spy.largest <= cap


def test_one_sample_past_the_cap_goes_to_torch(limbs_on, monkeypatch):
    monkeypatch.setattr(ring_gemm, "SCRATCH_ELEMENTS", 1 << 10, raising=False)
    conv = FloatSizes(F.conv2d)
    monkeypatch.setattr(F, "conv2d", conv)
    img, w = full_range(2, 8, 12, 12, seed=7), full_range(4, 8, 3, 3, seed=8)
    assert torch.equal(ring.conv2d(img, w), conv.fn(img, w))
    assert conv.largest == 0  # (int64 only: no float64 limbs were made)


# ------------------------------------------------------------------ resources: CPU time of narrow products

def test_a_long_reduction_into_a_narrow_product_keeps_torchs_int64_loop(monkeypatch):
    """(1 x 2^20) @ (2^20 x 1) is a dot product: ~1500 pieces of limb passes (1 s here against 30 ms for
    int64); a dealing of 2^27 elements as such a product held the provider for over a minute."""
    monkeypatch.setattr(ring_gemm, "_choice", True)
    used = []
    real = ring_gemm.sum_of_products
    monkeypatch.setattr(ring_gemm, "sum_of_products", lambda *a: used.append(1) or real(*a))
    real_bilinear = ring_gemm.limb_bilinear
    monkeypatch.setattr(ring_gemm, "limb_bilinear", lambda *a, **k: used.append(2) or real_bilinear(*a, **k))
    x, y = full_range(1, 1 << 20, seed=1), full_range(1 << 20, 1, seed=2)
    assert torch.equal(ring.BILINEAR_OPS["mm"](x, y), torch.mm(x, y))
    tall, v = full_range(1024, 1024, seed=3), full_range(1024, seed=4)
    assert torch.equal(ring.BILINEAR_OPS["matmul"](tall, v), torch.matmul(tall, v))
    assert torch.equal(ring.BILINEAR_OPS["matmul"](tall, v[:, None]), torch.matmul(tall, v[:, None]))
    assert torch.equal(ring.BILINEAR_OPS["bmm"](tall[None], v[None, :, None]), torch.bmm(tall[None], v[None, :, None]))
    assert used == []


def test_the_path_depends_on_shapes_not_values(limbs_on, monkeypatch):
    calls = []
    real = ring_gemm.sum_of_products
    monkeypatch.setattr(ring_gemm, "sum_of_products", lambda *a: calls.append(1) or real(*a))
    per_input = []
    for x in (torch.zeros(40, 50, dtype=torch.int64), full_range(40, 50, seed=1), torch.full((40, 50), WORST)):
        before = len(calls)
        assert torch.equal(ring_gemm.mm(x, x.t()), torch.mm(x, x.t()))
        per_input.append(len(calls) - before)
    assert per_input == [1, 1, 1]


# ------------------------------------------------------------------ exactness

def test_an_empty_reduction_gives_a_new_tensor_not_the_dealt_c(limbs_on):
    c = full_range(3, 4, seed=1)
    out = ring_gemm.sum_of_products(c, [(torch.zeros(3, 0, dtype=torch.int64), torch.zeros(0, 4, dtype=torch.int64))])
    assert torch.equal(out, c) and out.untyped_storage().data_ptr() != c.untyped_storage().data_ptr()


def _view(t, kind):
    """``t``'s values as a view of another layout: transposed storage, a strided slice, or a zero-stride row."""
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "strided":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if kind == "expanded":
        return t[:1].expand(t.shape)
    return t


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 9), st.sampled_from([1, 2, 681, 682, 683, 1365, 2047]), st.integers(1, 9),
       st.sampled_from(["plain", "transposed", "strided", "expanded"]), st.sampled_from([64, 1 << 12, 1 << 20]),
       st.booleans(), st.integers(0, 1 << 30))
def test_tiled_sums_of_products_match_torch(limbs_on, monkeypatch, m, k, n, layout, cap, worst, seed):
    """Every tile and piece bound (a cap of 64 elements cuts a product into one-row, few-column tiles)."""
    monkeypatch.setattr(ring_gemm, "SCRATCH_ELEMENTS", cap, raising=False)
    if worst:
        x, y = torch.full((m, k), WORST), torch.full((k, n), WORST)
    else:
        x, y = full_range(m, k, seed=seed), full_range(k, n, seed=seed + 1)
    x2, y2, c = full_range(m, 3, seed=seed + 2), full_range(3, n, seed=seed + 3), full_range(m, n, seed=seed + 4)
    x, y = _view(x, layout), _view(y.t().contiguous(), layout).t()
    assert torch.equal(ring_gemm.sum_of_products(c, [(x, y), (x2, y2)]), c + x @ y + x2 @ y2)
    assert torch.equal(ring_gemm.mm(x, y), x @ y)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 9), st.integers(1, 6), st.integers(1, 1 << 12),
       st.booleans(), st.integers(0, 1 << 30))
def test_chunk_bounds_of_batched_products_match_torch(limbs_on, monkeypatch, b, m, k, n, cap, transposed, seed):
    """Chunks of every size (a cap from one sample's scratch down to none: torch's op) give torch's values."""
    monkeypatch.setattr(ring_gemm, "SCRATCH_ELEMENTS", cap, raising=False)
    x, y = full_range(b, m, k, seed=seed), full_range(b, k, n, seed=seed + 1)
    if transposed:
        x, y = x.transpose(1, 2).contiguous().transpose(1, 2), y.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(ring_gemm.bmm(x, y), torch.bmm(x, y))
    assert torch.equal(ring_gemm.matmul(x, y[:1]), torch.matmul(x, y[:1]))
    img, w = full_range(b, 2, m + 2, k + 2, seed=seed + 2), full_range(n, 2, 3, 3, seed=seed + 3)
    assert torch.equal(ring.conv2d(img, w, 1, 1), F.conv2d(img, w, None, 1, 1))


@pytest.mark.parametrize("cap", [1 << 9, 1 << 22])
@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 3, 2, 1), ((1, 2), (0, 1), (2, 1), 2),
                                                            (3, 1, 1, 4)])
def test_chunked_convolutions_match_torch(limbs_on, monkeypatch, cap, stride, padding, dilation, groups):
    monkeypatch.setattr(ring_gemm, "SCRATCH_ELEMENTS", cap, raising=False)
    x, w = full_range(5, 8, 7, 9, seed=1), full_range(8, 8 // groups, 3, 2, seed=2)
    got = ring_gemm.conv2d(x, w, stride, padding, dilation, groups)
    assert got is None or torch.equal(got, F.conv2d(x, w, None, stride, padding, dilation, groups))
    assert torch.equal(ring.conv2d(x, w, stride, padding, dilation, groups),
                       F.conv2d(x, w, None, stride, padding, dilation, groups))


@pytest.mark.parametrize("cap", [1 << 8, 1 << 22])
@pytest.mark.parametrize("xs,ys", [((5, 7, 9), (9, 4)), ((5, 7, 9), (5, 9, 4)), ((5, 7, 9), (1, 9, 4)),
                                   ((1, 7, 9), (5, 9, 4)), ((2, 3, 7, 9), (1, 3, 9, 4)), ((2, 3, 7, 9), (3, 9, 4)),
                                   ((9,), (5, 9, 4)), ((5, 7, 9), (9,)), ((9,), (9,)), ((0, 7, 9), (9, 4))])
def test_batched_and_broadcast_matmuls_match_torch(limbs_on, monkeypatch, cap, xs, ys):
    monkeypatch.setattr(ring_gemm, "SCRATCH_ELEMENTS", cap, raising=False)
    x, y = full_range(*xs, seed=1), full_range(*ys, seed=2)
    assert torch.equal(ring_gemm.matmul(x, y), torch.matmul(x, y))
    if len(xs) == len(ys) == 3 and xs[0] == ys[0]:
        assert torch.equal(ring_gemm.bmm(x, y), torch.bmm(x, y))
    expanded = x.expand(3, *x.shape) if x.dim() == 3 else x
    assert torch.equal(ring_gemm.matmul(expanded, y), torch.matmul(expanded, y))


# ------------------------------------------------------------------ the calibration

def test_a_failed_timing_serves_int64_and_never_raises_into_a_protocol_step(monkeypatch):
    monkeypatch.delenv("VEIL_RING_GEMM", raising=False)
    monkeypatch.setattr(ring_gemm, "_choice", None)

    def no_memory(*args):
        raise MemoryError

    monkeypatch.setattr(ring_gemm, "sum_of_products", no_memory)
    x, y = full_range(128, 128, seed=1), full_range(128, 128, seed=2)
    assert torch.equal(ring.BILINEAR_OPS["mm"](x, y), torch.mm(x, y))
    assert ring_gemm._choice is False  # decided once: not timed again at every later product


def test_first_products_from_many_party_threads_time_once_and_agree(monkeypatch):
    monkeypatch.delenv("VEIL_RING_GEMM", raising=False)
    monkeypatch.setattr(ring_gemm, "_choice", None)
    timings = []
    real = ring_gemm._time_both
    monkeypatch.setattr(ring_gemm, "_time_both", lambda *a: timings.append(1) or real(*a))
    x, y = full_range(128, 128, seed=1), full_range(128, 128, seed=2)
    want, results, start = torch.mm(x, y), [], threading.Barrier(6)

    def party():
        start.wait()
        results.append(torch.equal(ring.BILINEAR_OPS["mm"](x, y), want))

    threads = [threading.Thread(target=party) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * 6 and timings == [1]


def _child_choice(queue):
    import os

    os.environ["VEIL_RING_GEMM"] = "int64"
    queue.put(ring_gemm.limbs_pay())


def test_a_child_forked_while_another_thread_times_is_not_stuck(monkeypatch):
    """A fork while a thread of the parent held the calibration's lock left the child's copy locked
    forever: its first ring product waited on a thread that does not exist there."""
    monkeypatch.setattr(ring_gemm, "_choice", None)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with ring_gemm._choice_lock:  # (another party thread timing, as the fork happens)
        child = ctx.Process(target=_child_choice, args=(queue,))
        child.start()
    child.join(5)
    stuck = child.is_alive()
    if stuck:
        child.kill()
        child.join()
    assert not stuck and queue.get(timeout=5) is False


# ------------------------------------------------------------------ SPDZ2k's digit images at their bound

M128 = 1 << 128


@pytest.mark.parametrize("op,p_shape,x_shape,n", [("mm", (1, (1 << 19) - 1), ((1 << 19) - 1, 2), (1 << 19) - 1),
                                                  ("conv2d", (1, 58254, 3, 3), (1, 58254, 3, 3), 58254 * 9)])
def test_ring128_digit_images_at_the_2_19_bound_stay_exact(limbs_on, op, p_shape, x_shape, n):
    """Every digit 0xFFFF (the largest column sums) in both limbs: n (2^128 - 1)^2 mod 2^128 in every entry,
    through the float64 images just below 2^19 products per entry (from 2^19 on, int64 digits serve)."""
    from veil.mpc import ring128

    fn = ring.BILINEAR_OPS[op]
    p = (torch.full(p_shape, -1, dtype=torch.int64), torch.full(p_shape, -1, dtype=torch.int64))
    x = (torch.full(x_shape, -1, dtype=torch.int64), torch.full(x_shape, -1, dtype=torch.int64))
    assert ring128._float_digit_images(fn, p[0], x[0], True, {}) is not None
    longer = torch.full((1, 1 << 19), -1, dtype=torch.int64)
    assert ring128._float_digit_images(ring.BILINEAR_OPS["mm"], longer, longer.t(), True, {}) is None
    lo, hi = ring128.bilinear(fn, p, x)
    want = n * (M128 - 1) ** 2 % M128
    assert {ring128.to_int(a, b) for a, b in zip(lo.reshape(-1).tolist(), hi.reshape(-1).tolist())} == {want}
