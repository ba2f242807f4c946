"""Red team, third pass: the owner's public bound ``max_records`` on a hidden record count (``veil.dp.padding``;
the first two passes: test_redteam_hide_count.py, test_redteam_hide_count_second.py).

Holes found (each test asserts the safe behaviour):
- Data made DP-only after ``enable_dp`` (``set_policy``), or grown past the bound in place (``x.data =``),
  was refused at every release, free: any scientist learned n > max_records. Fixed: such data is
  released over its first max_records records, the rest unread, so the reply, error (none), charge and
  work are those of data within the bound. A DP-SGD slot is a record only when its data and its target
  both are (data grown without its targets paired records with padding targets once the refusal went).
- Each hidden-count release holds the bound's rows (float64 working copies) uncharged, and the owner's
  bound was never weighed against the worker's memory: ``max_records=10**12`` was accepted, and every
  release then failed after its charge (or took the worker's memory). Fixed: ``enable_dp`` and a DP-only
  ``load`` refuse, to the owner with the figures, a bound whose release would hold more than a quarter of
  the machine's memory; a release on rows grown wider since is refused before its charge, on public
  figures only.
Held (tests that could fail): a plan feeding a record's value into an op's scalar parameter (the ops a
failing record could reach on hidden-count data besides those ``values_may_raise`` refuses) is refused
by the dry run before any charge, the same for any count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from shape_trace import ShapeTrace, clipped_gradient_sum

import veil as sy
from tests.security.test_redteam_hide_count import QUERY_ARGS, _Lin
from veil.dp import padding, worker_functions
from veil.dp.errors import PrivacyParameterError
from veil.dp.remote import RemoteDPOwner
from veil.exceptions import PermissionDeniedError

BOUND = 64


def _requester_view(w, ws, ptr) -> tuple:
    """What a scientist sees of the four charged queries on ``ptr``: each reply's costs and shape, or its
    error text; the ledger rows left (worker id taken out); the ATen ops each ran (its work)."""
    replies, work = [], []
    for name in sorted(QUERY_ARGS):
        trace = ShapeTrace()
        try:
            with trace:
                r = sy.dp.remote_query(ptr, name, **QUERY_ARGS[name])
            replies.append((r.epsilon, r.delta, r.noise_scale, tuple(r.value.shape)))
        except Exception as e:  # noqa: BLE001 - the refusal is what the scientist sees
            replies.append((type(e).__name__, str(e).replace(w.id, "W")))
        work.append(trace.ops)
    rows = [(eps, dlt, reason.replace(w.id, "W")) for eps, dlt, reason, _ in ws.ledger.history("me")]
    return replies, rows, work


def _made_dp_only_later(hook, name: str, x: torch.Tensor):
    w = sy.VirtualWorker(hook, id=name)
    w.load(x, tags=("#late",), private=True)
    ws = w.enable_dp(budgets={"me": (1e6, 0.5)}, hide_count=True, max_records=BOUND)
    w.set_policy("#late", "dp-only")
    return w, ws, w.search(["#late"])[0]


def _grown_later(hook, name: str, n_at_load: int, n_now: int):
    w = sy.VirtualWorker(hook, id=name)
    x = torch.rand(n_at_load, 2)
    w.load(x, tags=("#c", "#data"), private=True)
    w.load(torch.rand(n_at_load, 1), tags=("#c", "#target"), private=True)
    ws = w.enable_dp("c", budgets={"me": (1e6, 0.5)}, hide_count=True, max_records=BOUND)
    x.data = torch.rand(n_now, 2)  # the owner's own update of the stored records, past its bound or not
    return w, ws, w.search(["#c", "#data"])[0]


# ============================================================================================ holes

@pytest.mark.parametrize("how", ["made_dp_only_later", "grown_later"])
def test_data_past_the_bound_looks_to_the_requester_like_data_within_it(hook, how):
    """Attack: the scientist asks a sum / mean / histogram / count of DP-only data of 50 and of 6173
    records (bound 64), made DP-only after enable_dp or grown in place after its checks. Must hold: the
    same replies (costs, shapes, no error), ledger rows and ATen work for both: no free n > N bit."""
    seen = {}
    for n in (50, 6173):
        if how == "made_dp_only_later":
            w, ws, ptr = _made_dp_only_later(hook, f"rt-hc3-view-{how}-{n}", torch.rand(n, 2))
        else:
            w, ws, ptr = _grown_later(hook, f"rt-hc3-view-{how}-{n}", 40, n)
        seen[n] = _requester_view(w, ws, ptr)
    assert seen[50][0] == seen[6173][0], (seen[50][0], seen[6173][0])
    assert seen[50][1] == seen[6173][1] and len(seen[50][1]) == 4
    assert seen[50][2] == seen[6173][2]


def test_a_release_past_the_bound_is_plain_pytorchs_over_the_first_bound_records(hook):
    """The answer over data past the bound is the DP answer over its first max_records records (epsilon
    1000: noise ~1e-3), the later ones unread; within the bound, over all of them."""
    x = torch.rand(500, 2) * 2
    _, _, ptr = _made_dp_only_later(hook, "rt-hc3-values", x)
    got = sy.dp.remote_query(ptr, "sum", epsilon=1e3, bounds=(0.0, 2.0)).value
    want = x[:BOUND].double().sum(0)
    assert torch.allclose(got, want, atol=0.05), (got, want)
    got = sy.dp.remote_query(ptr, "histogram", epsilon=1e3, bounds=(0.0, 2.0), bins=4).value
    want = torch.histc(x[:BOUND].double().flatten(), bins=4, min=0.0, max=2.0)
    assert (got.double() - want).abs().max() <= 1, (got, want)


def _gradient(hook, monkeypatch, name: str, x, y, grown_x, grown_y, model) -> tuple:
    """DP-SGD at q = 1, noise ~1e-9, on data grown after enable_dp: (the gradient, the per-record batches)."""
    w = sy.VirtualWorker(hook, id=name)
    w.load(x, tags=("#c", "#data"), private=True)
    w.load(y, tags=("#c", "#target"), private=True)
    w.enable_dp("c", budgets={"me": (1e20, 0.5)}, hide_count=True, max_records=BOUND, max_grad_norm=1.0,
                noise_multiplier=1e-9, nominal_count=100)
    x.data, y.data = grown_x, grown_y
    seen, real = [], worker_functions.per_sample_gradients

    def counted(compiled, state, trainable, xs, *args, **kwargs):
        seen.append(len(xs))
        return real(compiled, state, trainable, xs, *args, **kwargs)

    owner = RemoteDPOwner(w, "c", model, example=grown_x[:2], loss="mse")
    monkeypatch.setattr(worker_functions, "per_sample_gradients", counted)
    try:
        return owner.sanitized_gradient(model, None, None, 1.0), seen
    finally:
        monkeypatch.setattr(worker_functions, "per_sample_gradients", real)


@pytest.mark.parametrize("targets_grown", [True, False])
def test_a_gradient_on_data_grown_past_the_bound_is_over_its_first_record_pairs(hook, monkeypatch, targets_grown):
    """Attack: the owner's dataset (40 records) grows to 400 after enable_dp (bound 64): its DP-SGD
    releases were refused, free. Must hold: the lot is the bound's size, and the gradient is plain
    PyTorch's clipped sum over the first 64 (data, target) pairs, or over the 40 pairs that exist when
    only the data grew (a record is never paired with a padding target) / (q * nominal_count)."""
    torch.manual_seed(7)
    x, y = torch.rand(40, 3), torch.rand(40, 1) * 3
    big_x, big_y = torch.rand(400, 3), torch.rand(400, 1) * 3
    model = _Lin()
    with torch.no_grad():
        model.fc.bias.fill_(0.8)
    grads, seen = _gradient(hook, monkeypatch, f"rt-hc3-grad-{targets_grown}", x, y, big_x,
                            big_y if targets_grown else y.clone(), model)
    assert seen == [1, BOUND], seen
    pairs = BOUND if targets_grown else 40
    total = clipped_gradient_sum(model, big_x[:pairs], (big_y if targets_grown else y)[:pairs])
    for (name, _), want in zip(model.named_parameters(), total):
        assert torch.allclose(grads[name], want / 100, atol=1e-5), (name, grads[name], want / 100)


def _small_machine(monkeypatch) -> None:
    """A machine of 16 MiB: one release may hold 4 MiB."""
    monkeypatch.setattr(padding, "_machine_memory", lambda: 16 << 20, raising=False)  # (the code before the fix had none)


def test_a_bound_the_worker_memory_cannot_hold_is_refused_to_the_owner(hook, monkeypatch):
    """Attack (resources): the owner's bound sizes every release's working memory, uncharged. Must hold:
    enable_dp refuses, in one line naming max_records and the figures, a bound whose release would not fit
    the machine (10^12 rows here; 10^5 rows of 3 values on a machine of 16 MiB), before any data too;
    nothing changes (the worker keeps serving its earlier settings); a bound that fits is accepted."""
    free = sy.VirtualWorker(hook, id="rt-hc3-mem-machine")
    free.load(torch.rand(10, 3), tags=("#c", "#data"), private=True)
    free.load(torch.rand(10, 1), tags=("#c", "#target"), private=True)
    with pytest.raises(PrivacyParameterError, match="max_records=1000000000000"):
        free.enable_dp("c", budgets={"me": (10.0, 0.0)}, hide_count=True, max_records=10**12)
    with pytest.raises(PrivacyParameterError, match="max_records"):  # (before any data: one-value rows)
        sy.VirtualWorker(hook, id="rt-hc3-mem-empty").enable_dp(hide_count=True, max_records=10**12)
    _small_machine(monkeypatch)
    w = sy.VirtualWorker(hook, id="rt-hc3-mem-small")
    w.load(torch.rand(10, 3), tags=("#c", "#data"), private=True)
    w.load(torch.rand(10, 1), tags=("#c", "#target"), private=True)
    ws = w.enable_dp("c", budgets={"me": (10.0, 0.0)}, hide_count=True, max_records=1000)
    with pytest.raises(PrivacyParameterError) as e:
        w.enable_dp("c", budgets={"me": (10.0, 0.0)}, hide_count=True, max_records=100_000)
    text = str(e.value)
    assert "max_records=100000" in text and "MiB" in text and "\n" not in text, text
    assert sy.dp.dp_settings(w) is ws  # the refusal changed nothing
    (data,) = w.search(["#c", "#data"])
    assert sy.dp.remote_query(data, "sum", epsilon=1.0, bounds=(0.0, 1.0)).value.shape == (3,)


def test_wide_rows_past_the_memory_are_refused_to_the_owner_at_load_and_freely_on_public_figures(hook, monkeypatch):
    """Attack (resources): under a bound that fits narrow rows (1000 on a machine of 16 MiB), the owner loads
    DP-only rows of 1000 float64 values (a release: ~46 MiB), or widens the stored rows in place. Must hold:
    the load is refused to the owner (nothing stored); a release on the widened rows is refused before its
    charge, in one line naming no count, the same for 10 and 900 records; the worker serves the rest."""
    _small_machine(monkeypatch)
    seen = {}
    for n in (10, 900):
        w = sy.VirtualWorker(hook, id=f"rt-hc3-wide-{n}")
        x = torch.rand(n, 3)
        w.load(x, tags=("#c", "#data"), private=True)
        w.load(torch.rand(n, 1), tags=("#c", "#target"), private=True)
        w.enable_dp("c", budgets={"me": (10.0, 0.0)}, hide_count=True, max_records=1000)
        with pytest.raises(ValueError, match="max_records"):
            w.load(torch.rand(5, 1000, dtype=torch.float64), tags=("#wide",), private=True, policy="dp-only")
        assert not w.search(["#wide"])
        x.data = torch.rand(n, 1000, dtype=torch.float64)  # the owner's in-place widening
        (data,) = w.search(["#c", "#data"])
        with pytest.raises(PermissionDeniedError) as e:
            sy.dp.remote_query(data, "sum", epsilon=1.0, bounds=(0.0, 1.0))
        seen[n] = str(e.value).replace(w.id, "W")
        assert "max_records" in seen[n] and str(n) not in seen[n] and "\n" not in seen[n], seen[n]
        assert sy.dp.remaining_budget(w, spent=True) == (0.0, 0.0)
        (target,) = w.search(["#c", "#target"])
        assert sy.dp.remote_query(target, "count", epsilon=1.0).value.shape == ()  # still serves
    assert seen[10] == seen[900]


# ============================================================================================ held

class _ScalarFromRecord(nn.Module):
    """Feeds a record's value into an op's scalar parameter: a hardtanh whose min passes its max, or a
    uniform_ whose low end passes its high end, raises on such a record and not on a zero row."""

    def __init__(self, kind: str):
        super().__init__()
        self.fc, self.kind = nn.Linear(3, 1), kind

    def forward(self, x):
        h, v = self.fc(x), x[0, 0] * 1000
        if self.kind == "hardtanh":
            return F.hardtanh(h, min_val=v, max_val=1.0)
        return h * torch.zeros_like(h).uniform_(v, 1.0)


@pytest.mark.parametrize("kind", ["hardtanh", "uniform_"])
def test_a_plan_raising_through_a_scalar_from_a_record_is_refused_free_on_hidden_counts(hook, kind):
    """Attack: on hidden-count data, a plan failing on every real record (never on a zero row) by an op not
    in ``values_may_raise``'s list: each failing record would cost its attempt plus a run on the dummy,
    a padding row one run. Must hold: refused by the dry run before any charge, the same for 40 and 400."""
    seen = {}
    for n in (40, 400):
        w = sy.VirtualWorker(hook, id=f"rt-hc3-scalar-{kind}-{n}")
        w.load(torch.rand(n, 3) * 0.98 + 0.02, tags=("#c", "#data"), private=True)
        w.load(torch.rand(n, 1), tags=("#c", "#target"), private=True)
        w.enable_dp("c", budgets={"me": (1e6, 0.5)}, hide_count=True, max_records=512, max_grad_norm=1.0,
                    noise_multiplier=1.0, nominal_count=100)
        model = _ScalarFromRecord(kind)
        owner = RemoteDPOwner(w, "c", model, example=torch.zeros(2, 3), loss="mse")
        with pytest.raises(PrivacyParameterError) as e:
            owner.sanitized_gradient(model, None, None, 1.0)
        seen[n] = str(e.value)
        assert sy.dp.remaining_budget(w, spent=True) == (0.0, 0.0)
    assert seen[40] == seen[400] and "\n" not in seen[40], seen
