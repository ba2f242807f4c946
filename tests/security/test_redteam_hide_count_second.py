"""Red team, second pass: ways around the padding of hidden-count DP releases (``veil.dp.padding``, the
first pass: test_redteam_hide_count.py).

Holes found (each test asserts the safe behaviour; fixed by reading the records' rows into the padded
size at each release, an index gather of ``max_records`` rows whatever the count, instead of a cached
padded copy):
- The cached copy was remade only when the tensor's ``_version`` moved: the owner's writes through
  ``x.numpy()`` or ``x.data`` (no version bump) and ``x.data = other`` (another length) were released
  as the stale copy, a wrong answer (and a count that was no longer the data's).
- The cache held ``max_records`` rows per hidden-count tensor for the tensor's life, charged to nobody:
  every DP-only tensor (each Ray client's data and targets) cost the bound, not its own size.
- A histogram's padding went to one extra bin: at exactly ``max_records`` records there was none, and
  ``bincount`` returned one bin fewer (its work, an op's output shape, told n == max_records).
- (The first pass's documented limit, now fixed) the first release on DP-only data flagged after
  ``enable_dp`` copied its n records (work in proportion to the count).
- DP-SGD with a plan raising on every real record and never on a zero row: a failing record is run twice
  (its attempt, then the dummy record), a padding row once, so the lot's work was max_records + n runs.
  Fixed: on hidden-count data a plan whose ops may raise on values (``values_may_raise``) is refused, free.
- A client may flag its own object DP-only: one above the bound made the owner's next ``enable_dp`` fail
  (the bound check at ``enable_dp`` now covers the owner's own data only).
- DP-only data loaded after ``enable_dp`` past the bound was stored, and each release on it refused free
  (n > max_records told to any scientist): ``load(..., policy="dp-only")`` now refuses it to the owner.
  (Data re-flagged DP-only, or grown past the bound, is read to the bound: test_redteam_hide_count_bound.py.)
Held (tests that could fail): releases of 0 records and of exactly the bound do the same work as any
other count; NaN / inf in the records leave no trace in the padding's value or work; DP-SGD at other
sample rates draws lots of the bound's size; a gradient over 5 records in 64 slots is plain PyTorch's
over the records.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn as nn

import veil as sy
from tests.security.test_redteam_hide_count import BOUND, QUERY_ARGS, _gradient_lots, _Lin, _owner, _query_work
from tests.security.shape_trace import clipped_gradient_sum

# ============================================================================================ holes


@pytest.mark.parametrize("change", ["numpy", "data", "data_replaced"])
def test_an_owner_change_the_version_counter_misses_is_released_not_a_stale_copy(hook, change):
    """Attack (and owner correctness): the owner updates the stored tensor through ``x.numpy()`` or
    ``x.data`` (neither bumps ``x._version``) or swaps its storage with ``x.data = other``. Must hold: the
    next release is over the data as it is now (epsilon 1000: noise ~1e-2), never a copy of how it was."""
    x = torch.rand(200, 1)
    _, ptr, _ = _owner(hook, f"rt-hc2-stale-{change}", x)
    before = sy.dp.remote_query(ptr, "sum", epsilon=1e3, bounds=(0.0, 10.0)).value.item()
    if change == "numpy":
        x.numpy()[:] += 1.0
        want = x.double().sum().item()
    elif change == "data":
        x.data.add_(1.0)
        want = x.double().sum().item()
    else:
        x.data = torch.full((300, 1), 2.0)  # the owner's new records (within the bound)
        want = 600.0
    after = sy.dp.remote_query(ptr, "sum", epsilon=1e3, bounds=(0.0, 10.0)).value.item()
    assert abs(after - want) < 0.5, (before, after, want)


def _bound_sized_tensors(bound: int) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and o.dim() and o.shape[0] == bound)


def test_a_hidden_count_tensor_costs_its_owner_no_bound_sized_copy_between_releases(hook):
    """Attack (resources): each DP-only tensor under hide_count held a padded copy of ``max_records`` rows
    for its whole life, charged to no one (a Ray actor hosting 1000 clients held 2000 bound-sized copies).
    Must hold: after enable_dp and releases, no tensor of the bound's length stays alive."""
    bound = 77_773  # (a length no other live tensor has)
    held_before = _bound_sized_tensors(bound)
    w = sy.VirtualWorker(hook, id="rt-hc2-memory")
    x, y = torch.rand(10, 3), torch.rand(10, 1)
    w.load(x, tags=("#c", "#data"), private=True)
    w.load(y, tags=("#c", "#target"), private=True)
    w.enable_dp({"c": (x, y)}, budgets={"me": (1e6, 0.5)}, hide_count=True, max_records=bound)
    (ptr,) = w.search(["#c", "#data"])
    for name in sorted(QUERY_ARGS):
        sy.dp.remote_query(ptr, name, **QUERY_ARGS[name])
    assert _bound_sized_tensors(bound) == held_before


@pytest.mark.parametrize("name", ["histogram", "sum", "mean"])
def test_a_release_at_exactly_the_bound_does_the_work_of_any_other_count(hook, name):
    """Attack: the histogram's padding rows went to an extra bin that ``bincount`` made only when there
    was padding: at n == max_records its output was one bin shorter. Must hold: the same ATen ops on the
    same sizes at n = bound, bound - 1 and 0 (the empty case too: no op is skipped)."""
    bound, work = 64, {}
    for n in (bound, bound - 1, 0):
        _, ptr, _ = _owner(hook, f"rt-hc2-full-{name}-{n}", torch.rand(n, 3), max_records=bound)
        work[n] = _query_work(ptr, name, **QUERY_ARGS[name])
    assert work[bound] == work[bound - 1] == work[0], \
        [(a, b) for a, b in zip(work[bound], work[bound - 1]) if a != b][:3]


def test_a_release_on_data_flagged_dp_only_after_enable_dp_copies_no_records(hook):
    """Attack: the owner loads data as private and later tightens it to DP-only (``set_policy``) after
    ``enable_dp``; the scientist traces the first (charged) sum. Must hold: the same work for 300 and 3000
    records, at the first release and later ones."""
    first, second = {}, {}
    for n in (300, 3000):
        w = sy.VirtualWorker(hook, id=f"rt-hc2-reflag-{n}")
        w.load(torch.rand(n, 3), tags=("#late",), private=True)
        w.enable_dp(budgets={"me": (1e6, 0.5)}, hide_count=True, max_records=BOUND)
        sy.governance.set_policy(w, "#late", "dp-only")
        (ptr,) = w.search(["#late"])
        first[n] = _query_work(ptr, "sum", **QUERY_ARGS["sum"])
        second[n] = _query_work(ptr, "sum", **QUERY_ARGS["sum"])
    assert first[300] == first[3000] and second[300] == second[3000]


class _Trap(nn.Module):
    """Indexes a one-row table by a record's value: fine on a zero row (the dry run, the padding), an
    IndexError on every real record in (0.01, 1]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 1)
        self.table = nn.Parameter(torch.ones(1, 1))

    def forward(self, x):
        return self.fc(x) * self.table[(x[:, 0] * 1000).long()]


def test_a_plan_failing_on_every_real_record_does_not_count_the_records_of_a_padded_lot(hook, monkeypatch):
    """Attack: DP-SGD at q = 1 with a plan that raises on every real record and never on a zero row: each
    failing record is run twice (its failed attempt, then the dummy record), the padding rows once, so the
    release's work (and time) was max_records + n runs (553 for 40 records, 913 for 400, bound 512).
    Must hold: the same number of per-record runs for 40 and 400 records, or a refusal before any charge
    (decided from the plan and the public settings alone)."""
    from veil.dp import per_sample
    from veil.dp.errors import PrivacyParameterError
    from veil.dp.remote import RemoteDPOwner

    runs, real = [], per_sample._loop_record

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    outcome = {}
    for n in (40, 400):
        w = sy.VirtualWorker(hook, id=f"rt-hc2-trap-{n}")
        x, y = torch.rand(n, 3) * 0.98 + 0.02, torch.rand(n, 1)
        w.load(x, tags=("#c", "#data"), private=True)
        w.load(y, tags=("#c", "#target"), private=True)
        w.enable_dp("c", budgets={"me": (1e6, 0.5)}, hide_count=True, max_records=512, max_grad_norm=1.0,
                    noise_multiplier=1.0, nominal_count=100)
        model = _Trap()
        owner = RemoteDPOwner(w, "c", model, example=torch.zeros(2, 3), loss="mse")
        runs.clear()
        monkeypatch.setattr(per_sample, "_loop_record", counted)
        try:
            owner.sanitized_gradient(model, None, None, 1.0)
            outcome[n] = len(runs)
        except PrivacyParameterError as e:
            assert "\n" not in str(e) and str(n) not in str(e), str(e)
            assert sy.dp.remaining_budget(w, spent=True) == (0.0, 0.0)
            outcome[n] = "refused"
        finally:
            monkeypatch.setattr(per_sample, "_loop_record", real)
    assert outcome[40] == outcome[400], outcome


def test_a_scientists_own_dp_only_object_does_not_block_the_owners_enable_dp(hook):
    """Attack (roles): a client may mark its own object DP-only (capabilities only restrict); one of 5000
    rows on a worker whose owner hides counts under max_records=64 made the owner's next ``enable_dp``
    (a budget added) fail, as if the owner's data were past the bound. Must hold: the owner's call
    succeeds, the owner's own data above the bound is still refused to the owner."""
    from veil.messaging import messages as m
    from veil.workers.capabilities import CAP_PREFIX

    w = sy.VirtualWorker(hook, id="rt-hc2-foreign")
    w.load(torch.rand(30, 2), tags=("#c", "#data"), private=True)
    w.load(torch.rand(30, 1), tags=("#c", "#target"), private=True)
    w.enable_dp("c", budgets={"me": (1.0, 0.0)}, hide_count=True, max_records=64)
    hook.local_worker.send_msg(m.ObjectMessage([m.StoredObject(77_001, torch.rand(5000, 2),
                                                               (CAP_PREFIX + "dp_only",))]), w)
    ws = w.enable_dp("c", budgets={"me": (1.0, 0.0), "bob": (2.0, 0.0)}, hide_count=True, max_records=64)
    assert ws.remaining("bob") == (2.0, 0.0)
    w.load(torch.rand(65, 2), tags=("#big",), private=True)
    w.set_policy("#big", "dp-only")
    with pytest.raises(ValueError, match="max_records"):
        w.enable_dp("c", hide_count=True, max_records=64)


def test_dp_only_data_past_the_bound_is_refused_to_the_owner_at_load_not_to_a_scientist(hook):
    """Attack: DP-only data the owner loads after ``enable_dp`` with more records than max_records was
    stored, and every release on it refused, free: a scientist learned n > max_records at no cost. Must
    hold: the owner's ``load(..., policy="dp-only")`` of such data fails (nothing stored); data within
    the bound loads and is released."""
    w = sy.VirtualWorker(hook, id="rt-hc2-late-big")
    w.enable_dp(budgets={"me": (10.0, 0.0)}, hide_count=True, max_records=64)
    with pytest.raises(ValueError, match="max_records"):
        w.load(torch.rand(65, 2), tags=("#big",), private=True, policy="dp-only")
    assert not w.search(["#big"])
    w.load(torch.rand(64, 2), tags=("#fits",), private=True, policy="dp-only")
    (fits,) = w.search(["#fits"])
    assert sy.dp.remote_query(fits, "sum", epsilon=1.0, bounds=(0.0, 1.0)).value.shape == (2,)


# ============================================================================================ held

def test_special_values_in_the_records_leave_no_trace_in_the_padding(hook):
    """NaN, +inf and -inf records: the released sum / histogram are plain PyTorch's over the records
    (NaN to lower, inf to the bounds), none of the padding rows counts, and the work is that of finite
    records (epsilon 1000)."""
    x = torch.tensor([[float("nan")], [float("inf")], [-float("inf")], [0.25]])
    _, ptr, _ = _owner(hook, "rt-hc2-special", x, max_records=50)
    _, clean, _ = _owner(hook, "rt-hc2-finite", torch.full((4, 1), 0.5), max_records=50)
    lo, hi = 0.0, 1.0
    want = torch.nan_to_num(x.double(), nan=lo, posinf=hi, neginf=lo).clamp(lo, hi)
    got = sy.dp.remote_query(ptr, "sum", epsilon=1e3, bounds=(lo, hi)).value
    assert torch.allclose(got, want.sum(0), atol=0.05), (got, want.sum(0))
    got = sy.dp.remote_query(ptr, "histogram", epsilon=1e3, bounds=(lo, hi), bins=4).value
    assert (got.double() - torch.histc(want.flatten(), bins=4, min=lo, max=hi)).abs().max() <= 1, got
    assert _query_work(ptr, "sum", **QUERY_ARGS["sum"]) == _query_work(clean, "sum", **QUERY_ARGS["sum"])


@pytest.mark.parametrize("q", [0.25, 0.7])
def test_a_hidden_count_lot_at_any_sample_rate_is_drawn_over_the_bound(hook, monkeypatch, q):
    """DP-SGD at q < 1: the lot's size is Binomial(max_records, q) whatever n, so over ten releases the
    lot sizes for 20 and 500 records come from the same distribution: their means lie within 5 sigma
    of q * bound, and never near q * n for the small dataset."""
    bound = 512
    for n in (20, 500):
        x, y = torch.rand(n, 3), torch.rand(n, 1)
        sizes = []
        for k in range(10):
            _, seen = _gradient_lots(hook, monkeypatch, f"rt-hc2-q-{q}-{n}-{k}", x, y, _Lin(), q,
                                     max_records=bound)
            sizes.append(sum(seen[1:]))
        mean, sd = np.mean(sizes), (bound * q * (1 - q) / 10) ** 0.5
        assert abs(mean - q * bound) < 5 * sd, (n, sizes)


def test_a_padded_gradient_of_a_few_records_is_plain_pytorchs_over_them(hook, monkeypatch):
    """DP-SGD at q = 1 with noise ~1e-9, 5 records, the bound 64: the gradient is the records' clipped sum
    over q * nominal_count (plain PyTorch), the 59 padding slots (filled from the records' rows)
    adding nothing."""
    torch.manual_seed(5)
    x, y = torch.rand(5, 3), torch.rand(5, 1) * 3
    model = _Lin()
    with torch.no_grad():
        model.fc.bias.fill_(0.9)
    grads, seen = _gradient_lots(hook, monkeypatch, "rt-hc2-grad", x, y, model, 1.0, sigma=1e-9,
                                 budgets={"me": (1e20, 0.5)}, max_records=64)
    assert seen == [1, 64]
    total = clipped_gradient_sum(model, x, y)
    for (name, _), want in zip(model.named_parameters(), total):
        assert torch.allclose(grads[name], want / 100, atol=1e-5), (name, grads[name], want / 100)
