"""Red team, fourth pass: releases over the first ``max_records`` records of hidden-count data (ed345ab; the
earlier passes: test_redteam_hide_count.py, _second.py, _bound.py).

Holes found (each test asserts the safe behaviour):
- Past the bound a release reads the first N records: removing one of them moves record N+1 in, so against
  adding or removing a record such a release is as private as against replacing one. The noise and the
  charge were those of adding/removing one (documented "up to twice the epsilon", charged nowhere): a sum
  with signed bounds or a mean moved by u - l, a histogram by two counts, a DP-SGD step by a record replaced
  in the lot. Charging it only on data past the bound would tell n > N by the ledger, so every hidden-count
  release over the bound is now noised (queries) or accounted (DP-SGD: then at sigma / 2, now replace-one: veil.dp.replace_one) for a replaced record,
  whatever n is; a sum with one-signed bounds (u - l <= max |bound|) costs what it did.
- The machine-memory check read only cgroup v2's root ``memory.max``: a cgroup v1 container's limit, and a
  v2 limit set on the process's own (nested) cgroup, were missed, so a bound past the container's memory was
  accepted (each release then killed the worker).
- A sparse DP-only tensor under a hidden count: every release failed after its charge, in time following
  its stored values (index_select over a sparse tensor scans them: ~1 ms at 30 records, ~330 ms grown to
  2e6). Now a hidden-count tensor of any layout but strided is refused to the owner (load, enable_dp) and
  its releases are refused before any charge, on its layout only.
Held (tests that could fail): cgroup files saying "max", unlimited v1 figures, garbage (a digit int()
refuses included) or none leave the machine's memory; replies stay alike for n within and past the bound;
records past the bound never reach a mean; an open count's DP-SGD step is charged at the owner's sigma.
"""

from __future__ import annotations

import math

import pytest
import torch
from shape_trace import ShapeTrace

import veil as sy
from tests.security.test_redteam_hide_count import _Lin
from veil.dp import padding
from veil.dp.accountant import Accountant
from veil.dp.queries import gaussian_sigma
from veil.dp.remote import RemoteDPOwner
from veil.exceptions import PermissionDeniedError

BOUND = 64


def _hidden(hook, name: str, x: torch.Tensor, grown: torch.Tensor | None = None):
    """A worker holding ``x`` DP-only under hide_count (bound 64); ``grown`` replaces its records after
    enable_dp (the owner's ``x.data =``): a pointer to it and the worker."""
    w = sy.VirtualWorker(hook, id=name)
    w.load(x, tags=("#h", "#data"), private=True)
    w.load(torch.zeros(len(x), 1), tags=("#h", "#target"), private=True)
    w.enable_dp("h", budgets={"me": (1e6, 0.5)}, hide_count=True, max_records=BOUND)
    if grown is not None:
        x.data = grown
    return w, w.search(["#h", "#data"])[0]


def _neighbours_past_the_bound(first: float, moved_in: float) -> tuple[torch.Tensor, torch.Tensor]:
    """D: ``first``, then 63 zeros, then ``moved_in`` (65 records); D': D without its first record, so
    its first 64 records end with ``moved_in``: the pair a release past the bound must be noised for."""
    d = torch.cat([torch.tensor([first]), torch.zeros(BOUND - 1), torch.tensor([moved_in])]).reshape(-1, 1)
    return d, d[1:]


# ============================================================================================ holes

@pytest.mark.parametrize("name", ["sum", "mean"])
def test_a_signed_sum_or_mean_past_the_bound_is_noised_for_the_record_that_moves_in(hook, name):
    """Attack: data of 65 records (bound 64); its neighbour without record 0 reads record 64 in its place:
    the first 64 records' clipped sums (plain PyTorch) differ by u - l = 2, twice an add/remove step.
    Must hold: the Laplace scale covers that difference at the sum's epsilon (the mean's half); the reply
    is the same for 10 records (no n > N bit); one-signed bounds keep their add/remove scale."""
    d, d_minus = _neighbours_past_the_bound(-1.0, 1.0)
    moved = (d[:BOUND].clamp(-1, 1).sum() - d_minus[:BOUND].clamp(-1, 1).sum()).abs().item()
    assert moved == 2.0
    eps, sum_eps = 1.0, (1.0 if name == "sum" else 0.5)
    seen = {}
    for n, grown in ((10, None), (65, d.clone())):
        _, ptr = _hidden(hook, f"rt-hc4-{name}-{n}", torch.zeros(10, 1), grown)
        r = sy.dp.remote_query(ptr, name, epsilon=eps, bounds=(-1.0, 1.0))
        seen[n] = (r.epsilon, r.delta, r.noise_scale, tuple(r.value.shape))
        assert r.noise_scale >= moved / sum_eps - 1e-12, (r.noise_scale, moved / sum_eps)
        one_signed = sy.dp.remote_query(ptr, name, epsilon=eps, bounds=(0.0, 1.0))
        assert one_signed.noise_scale == pytest.approx(1.0 / sum_eps)  # (u - l <= max|bound|: nothing more)
    assert seen[10] == seen[65]


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_a_histogram_past_the_bound_is_noised_for_the_record_that_moves_in(hook, mechanism):
    """Attack: as above, record 0 in the first bin and record 64 in the last: the neighbours' counts over
    their first 64 records differ in two bins (L1 2, L2 sqrt 2). Must hold: the noise is calibrated to that
    difference at the asked epsilon, the same for 10 records."""
    d, d_minus = _neighbours_past_the_bound(0.0, 0.99)
    counts = [torch.histc(v[:BOUND].flatten(), bins=4, min=0.0, max=1.0) for v in (d, d_minus)]
    l1, l2 = (counts[0] - counts[1]).abs().sum().item(), (counts[0] - counts[1]).norm().item()
    assert (l1, l2) == (2.0, pytest.approx(math.sqrt(2)))
    delta = 1e-6 if mechanism == "gaussian" else 0.0
    want = l1 / 1.0 if mechanism == "laplace" else gaussian_sigma(l2, 1.0, delta)
    seen = {}
    for n, grown in ((10, None), (65, d.clone())):
        _, ptr = _hidden(hook, f"rt-hc4-hist-{mechanism}-{n}", torch.zeros(10, 1), grown)
        r = sy.dp.remote_query(ptr, "histogram", epsilon=1.0, delta=delta, mechanism=mechanism,
                               bounds=(0.0, 1.0), bins=4)
        seen[n] = (r.epsilon, r.delta, r.noise_scale, tuple(r.value.shape))
        assert r.noise_scale >= want * (1 - 1e-9), (r.noise_scale, want)
    assert seen[10] == seen[65]


def _training_worker(hook, name: str, n: int, sigma: float = 1.0, delta: float = 1e-5):
    """A worker hiding its count (bound 64) with ``n`` records of DP-only training data: (worker, model, client)."""
    w = sy.VirtualWorker(hook, id=name)
    x, y = torch.rand(40, 3), torch.rand(40, 1)
    w.load(x, tags=("#c", "#data"), private=True)
    w.load(y, tags=("#c", "#target"), private=True)
    w.enable_dp("c", budgets={"me": (1e6, 0.5)}, hide_count=True, max_records=BOUND, max_grad_norm=1.0,
                noise_multiplier=sigma, nominal_count=100, delta=delta)
    x.data, y.data = torch.rand(n, 3), torch.rand(n, 1)
    model = _Lin()
    return w, model, RemoteDPOwner(w, "c", model, example=torch.zeros(2, 3), loss="mse")


def test_a_gradient_step_past_the_bound_is_charged_for_a_record_replaced_in_its_lot(hook):
    """Attack: a DP-SGD step on data grown past the bound: removing one of the first 64 records brings
    record 65 into the slots the lot is drawn from, a replaced record (clipped gradients up to 2C apart),
    where the ledger charged an added/removed one (sensitivity C). Must hold: the step's charge is above the
    tightest add/remove one (PLD at the owner's sigma), the same for 40 and 400 (its replace-one value:
    tests/dp/test_replace_one_accounting.py)."""
    sigma, q, delta = 1.0, 0.5, 1e-5
    want = Accountant("pld")
    want.step(sigma, q)
    spent = {}
    for n in (40, 400):
        w, model, client = _training_worker(hook, f"rt-hc4-sgd-{n}", n, sigma=sigma, delta=delta)
        client.sanitized_gradient(model, None, None, q)
        spent[n] = sy.dp.remaining_budget(w, spent=True)
    assert spent[40] == spent[400]
    assert spent[40][0] > want.get_epsilon(delta) * 1.1, (spent[40], want.get_epsilon(delta))
    replaced = Accountant("rdp")
    replaced.step(sigma, q, replace_one=True)
    assert spent[40][0] == replaced.get_epsilon(delta)


_MACHINE = 4 << 30


def _memory_seen(monkeypatch, files: dict) -> int:
    """The machine memory padding reads on a 4 GiB machine whose files are ``files`` (path -> text; any
    other path is missing)."""
    def fake_open(path, *args, **kwargs):
        if str(path) not in files:
            raise FileNotFoundError(path)
        import io
        return io.StringIO(files[str(path)])

    monkeypatch.setattr(padding, "open", fake_open, raising=False)
    monkeypatch.setattr(padding.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": _MACHINE // 4096}[name])
    return padding._machine_memory.__wrapped__()


@pytest.mark.parametrize("case", ["v1_namespaced", "v1_host_view", "v2_nested", "v2_parent_lower"])
def test_the_machine_memory_reads_cgroup_v1_and_nested_v2_limits(monkeypatch, case):
    """Attack (resources): a worker in a cgroup v1 container, or in a v2 cgroup below the root (systemd's
    service, a pod), held a limit the check never read: a bound past it was accepted. Must hold: the
    effective limit (the lowest along the process's cgroup path) is the machine's memory."""
    mib = 1 << 20
    files = {
        "v1_namespaced": {"/proc/self/cgroup": "5:memory:/\n3:cpu,cpuacct:/\n",
                          "/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{512 * mib}\n"},
        "v1_host_view": {"/proc/self/cgroup": "9:memory:/docker/abc\n",
                         "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
                         "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{512 * mib}\n"},
        "v2_nested": {"/proc/self/cgroup": "0::/system.slice/veil.service\n",
                      "/sys/fs/cgroup/system.slice/veil.service/memory.max": f"{512 * mib}\n",
                      "/sys/fs/cgroup/system.slice/memory.max": "max\n"},
        "v2_parent_lower": {"/proc/self/cgroup": "0::/kubepods/pod1\n",
                            "/sys/fs/cgroup/kubepods/pod1/memory.max": "max\n",
                            "/sys/fs/cgroup/kubepods/memory.max": f"{512 * mib}\n"},
    }[case]
    assert _memory_seen(monkeypatch, files) == 512 * mib


# ============================================================================================ held

@pytest.mark.parametrize("files", [
    {},  # no cgroup files at all
    {"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/memory.max": "max\n"},
    {"/proc/self/cgroup": "0::/a\n", "/sys/fs/cgroup/a/memory.max": "garbage\n"},
    {"/proc/self/cgroup": "0::/a\n", "/sys/fs/cgroup/a/memory.max": "\u00b2\n"},  # a digit int() refuses
    {"/proc/self/cgroup": "4:memory:/\n", "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"},
    {"/sys/fs/cgroup/memory.max": f"{64 << 30}\n"},  # above the machine: the machine's
], ids=["none", "v2_max", "garbage", "unicode_digit", "v1_unlimited", "above_machine"])
def test_cgroup_files_without_a_lower_limit_leave_the_machines_memory(monkeypatch, files):
    assert _memory_seen(monkeypatch, files) == _MACHINE


def test_the_root_cgroup_v2_limit_still_counts(monkeypatch):
    files = {"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/memory.max": f"{1 << 30}\n"}
    assert _memory_seen(monkeypatch, files) == 1 << 30
    assert _memory_seen(monkeypatch, {"/sys/fs/cgroup/memory.max": f"{1 << 30}\n"}) == 1 << 30


def test_records_past_the_bound_never_reach_a_mean(hook):
    """The records past the bound are unread by a mean too (its sum and its count): with them at 1e30,
    NaN and -inf, the mean at epsilon 1e3 is plain PyTorch's over the first 64 records."""
    torch.manual_seed(3)
    first = torch.rand(BOUND, 2)
    grown = torch.cat([first, torch.tensor([[1e30, float("nan")], [float("-inf"), 1e30]]).repeat(50, 1)])
    _, ptr = _hidden(hook, "rt-hc4-mean-unread", torch.zeros(10, 2), grown)
    got = sy.dp.remote_query(ptr, "mean", epsilon=1e3, bounds=(-1.0, 1.0)).value
    assert torch.allclose(got, first.double().mean(0), atol=0.01), (got, first.mean(0))


def test_a_gradient_step_without_a_hidden_count_is_charged_as_before(hook):
    """The replaced-record charge is for hidden-count releases only: an open count's step costs the
    accountant's epsilon at the owner's sigma."""
    sigma, q, delta = 1.0, 0.25, 1e-5
    want = Accountant("rdp")
    want.step(sigma, q)
    w = sy.VirtualWorker(hook, id="rt-hc4-sgd-open")
    w.load(torch.rand(40, 3), tags=("#c", "#data"), private=True)
    w.load(torch.rand(40, 1), tags=("#c", "#target"), private=True)
    w.enable_dp("c", budgets={"me": (1e6, 0.5)}, max_grad_norm=1.0, noise_multiplier=sigma, delta=delta)
    model = _Lin()
    RemoteDPOwner(w, "c", model, example=torch.zeros(2, 3), loss="mse").sanitized_gradient(model, None, None, q)
    assert sy.dp.remaining_budget(w, spent=True)[0] == pytest.approx(want.get_epsilon(delta))


# ============================================================================================ sparse

def test_a_sparse_hidden_count_tensor_is_refused_to_the_owner_and_before_any_charge(hook):
    """Attack: DP-only data stored sparse (made DP-only by the owner's set_policy: a tightening is not
    refused). Every release failed after its charge, in time following the stored values. Must hold: the
    owner's DP-only load of a sparse tensor is refused (nothing stored); a release on one is refused
    before any charge and any read of it, in one line naming no count, the same for 30 and 200000 records."""
    seen = {}
    for n in (30, 200_000):
        w = sy.VirtualWorker(hook, id=f"rt-hc4-sparse-{n}")
        w.enable_dp(budgets={"me": (1e6, 0.5)}, hide_count=True, max_records=BOUND)
        with pytest.raises(ValueError, match="layout"):
            w.load(torch.rand(10, 2).to_sparse(), tags=("#bad",), private=True, policy="dp-only")
        assert not w.search(["#bad"])
        w.load(torch.rand(n, 2).to_sparse(), tags=("#s",), private=True)
        w.set_policy("#s", "dp-only")
        (ptr,) = w.search(["#s"])
        trace = ShapeTrace()
        with pytest.raises(PermissionDeniedError) as e, trace:
            sy.dp.remote_query(ptr, "sum", epsilon=1.0, bounds=(0.0, 1.0))
        seen[n] = str(e.value).replace(w.id, "W")
        assert str(n) not in seen[n] and "\n" not in seen[n], seen[n]
        assert not any("index_select" in op for op in map(str, trace.ops)), trace.ops
        assert sy.dp.remaining_budget(w, spent=True) == (0.0, 0.0)
        assert sy.dp.remote_query(ptr, "count", epsilon=1.0).value.shape == ()  # a count still answers
    assert seen[30] == seen[200_000]
