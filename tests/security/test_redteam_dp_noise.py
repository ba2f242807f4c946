"""Red team: the DP noise and query layer as a *distribution* (ATTACKS.md class 10, and class 5 side channels).

Attacks on ``veil/dp/core.py`` (samplers, ``privatize`` / ``noisy_mean``), ``queries.py``, ``pate.py``,
``accountant.py``, ``budget.py`` and the worker functions, as a hostile scientist who chooses every parameter
(bounds, epsilon, dtype of the model's parameters, the plan) but not the owner's data.

Holes found (each test asserts the safe behaviour; all fixed):

1. DP-SGD's Gaussian noise was added in the parameters' floating-point type (Mironov 2012): the low bits of a
   released coordinate told whether the clipped sum was 0 or not -- one release distinguished neighbours.
   Fixed: ``core.snapped_gaussian`` adds it in float64, clamps to a public bound and rounds to a power-of-two
   grid set by public values (``snap_grid``), in ``noisy_mean`` and the local ``DPOptimizer``.
2. Half-precision trainable parameters: the clipped sum was accumulated in float16, so one extra record turned
   the release into ``inf``. Fixed: trainable parameters must be float32 or float64 (``RELEASE_DTYPES``).
3. ``dp_sum`` / ``dp_mean`` with huge (finite) bounds: owner values at ``upper`` overflowed the float64 sum, and
   the release failed iff two such records existed. Fixed: summed in units of a power of two near the bound
   (finite for any count), noised there, scaled back and saturated at the largest float64.

The other tests check attacks that are correctly refused and keep passing. Statistical tests state their
false-failure probability next to the assertion; all are seeded only by the OS CSPRNG (the point), so the
bounds are chosen to be astronomically safe.
"""

from __future__ import annotations

import math
import random
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

import dp_accounting
from dp_accounting import pld, rdp
from scipy.stats import norm

import veil as sy
from veil.dp import core, pate, queries
from veil.dp.accountant import Accountant, sgm_event
from veil.dp.audit import epsilon_lower_bound
from veil.dp.budget import BudgetLedger
from veil.dp.errors import BudgetExceededError, DPReleaseError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.plans.plan import Plan

from server_sessions import open_session, quota_worker, request

TOKEN = "redteam-dp-noise-scientist-token"


class NetOwner:
    """A network worker (in process, through ``serve_bytes``) holding DP dataset ``#c`` = (x, y)."""

    def __init__(self, hook, name: str, x: torch.Tensor, y: torch.Tensor, budget=(1e6, 1e-3),
                 clip: float = 1.0, sigma: float = 1.0) -> None:
        self.srv = quota_worker(hook, name, TOKEN, None)
        self.srv.load(x, tags=("#c", "#data"), private=True)
        self.srv.load(y, tags=("#c", "#target"), private=True)
        self.dp = self.srv.enable_dp("c", max_grad_norm=clip, noise_multiplier=sigma, budgets={"sci": budget})
        self.s = open_session(self.srv, TOKEN)
        reply = request(self.srv, self.s, m.SearchMessage(["#c", "#data"]))
        self.data = m.ObjectRef(reply.descriptors[0].id)

    def cmd(self, op, *args, n=1):
        rids = [new_id() for _ in range(n)]
        return request(self.srv, self.s, m.CommandMessage(op, args, {}, rids)), rids

    def fetch(self, rids):
        reply = request(self.srv, self.s, m.GetObjectsMessage(rids))
        assert type(reply) is m.ObjectsReply, reply
        return reply.objects

    def plan(self, module: nn.Module) -> m.ObjectRef:
        spec = Plan(module).build(torch.zeros(2, 3)).spec
        oid = new_id()
        assert type(request(self.srv, self.s, m.ObjectMessage([m.StoredObject(oid, spec)]))) is m.OkReply
        return m.ObjectRef(oid)

    def gradient(self, plan, params, trainable, loss="l1", q=1.0):
        reply, rids = self.cmd("veil.dp.sanitized_gradient", plan, "c", params, trainable, loss, q, None, None)
        if type(reply) is not m.OkReply:
            return reply
        return self.fetch(rids)[0]


def _virtual_owner(hook, name, values, budget=(1e6, 0.5)):
    w = sy.VirtualWorker(hook, id=name)
    w.load(values, tags=("#v",), private=True)
    w.enable_dp(budgets={"me": budget})
    (ptr,) = w.search(["#v"])
    return w, ptr


def _query_outcome(ptr, *args, **kwargs):
    """'error:<type>' or 'finite' / 'nonfinite' for one remote query."""
    try:
        r = sy.dp.remote_query(ptr, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the outcome type is what is compared
        return f"error:{type(e).__name__}"
    return "finite" if bool(torch.isfinite(r.value).all()) else "nonfinite"


# =============================================================================================== holes

def _off_grid_near_zero(o: torch.Tensor, radius: float, grid: float) -> int:
    """Coordinates with |o| < radius that are not multiples of ``grid``."""
    o = o.double()
    return int(((o.abs() < radius) & (torch.remainder(o, grid) != 0)).sum())


def test_dp_sgd_release_low_bits_do_not_reveal_the_clipped_sum():
    # D: one record whose clipped gradient is 2^-6 in each of 4096 coordinates (norm exactly C = 1);
    # D': the record removed (sum 0). A released coordinate o = fl32(s + fl32(noise)). Under D, any o with
    # |o| < 2^-8 is s + n computed exactly (Sterbenz), hence a multiple of 2^-30; under D' o = fl32(n) has
    # ulp <= 2^-32 there, so ~3/4 of those o are off the 2^-30 grid. The event "near zero and off grid" has
    # probability 0 under D and ~0.0024 per coordinate under D': a distinguisher of infinite privacy loss.
    d = 4096
    record = torch.full((1, d), 2.0 ** -6)
    like = [torch.zeros(d)]
    off_d = off_dp = 0
    for _ in range(8):
        with_record = core.privatize([record.clone()], like, 1.0, 1.0, 1.0)[0]
        without = core.privatize([torch.zeros(0, d)], like, 1.0, 1.0, 1.0)[0]
        off_d += _off_grid_near_zero(with_record, 2.0 ** -8, 2.0 ** -30)
        off_dp += _off_grid_near_zero(without, 2.0 ** -8, 2.0 ** -30)
    # Expected off_dp ~ 80 (Poisson): P(off_dp < 20) < 1e-15. For a mechanism that is DP per coordinate
    # (sensitivity 2^-6, sigma 1: epsilon ~0.05 at delta 1e-9) off_d is ~off_dp, so P(off_d == 0 while
    # off_dp >= 20) < 1e-8: the assertion's false-failure probability once fixed.
    assert not (off_d == 0 and off_dp >= 20), (off_d, off_dp)


class Wide(nn.Module):
    """4096 float32 biases; output 1e6 + sum(b) / 64: with an l1 loss every record's gradient is 2^-6 per
    coordinate (norm exactly C = 1), whatever the record."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(4096))

    def forward(self, inp):
        return inp.sum(-1, keepdim=True) * 0 + self.b.sum() / 64 + 1e6


def test_worker_dp_sgd_release_low_bits_do_not_reveal_membership(hook):
    # End to end through a network worker: D has 2 records (clipped sum 2^-5 per coordinate), D' has 1
    # (2^-6). q = 1, so the public divisor q n is 2 or 1 (a power of two: multiplying back is exact). Under D
    # every near-zero coordinate (|o| < 2^-8) is on the 2^-29 grid; under D' ~1/4 of them are not.
    off = {}
    for n in (2, 1):
        o = NetOwner(hook, f"rt_noise_wide_{n}", torch.zeros(n, 3), torch.zeros(n, 1))
        plan = o.plan(Wide())
        off[n] = sum(_off_grid_near_zero(o.gradient(plan, [torch.zeros(4096)], [True], q=1.0) * n,
                                         2.0 ** -8, 2.0 ** -29) for _ in range(24))
    # off[1] ~ Poisson(~75) (a quarter of ~13 near-zero coordinates per release): P(< 10) < 1e-20. Once fixed
    # (noise not leaking its grid) off[2] ~ off[1] and P(off[2] == 0 while off[1] >= 10) < 1e-8.
    assert not (off[2] == 0 and off[1] >= 10), off


class HalfBias(nn.Module):
    """One float16 trainable bias; output 1e6 + b: with an l1 loss each record's gradient is exactly 1 = C."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(1, dtype=torch.float16))

    def forward(self, inp):
        return inp.sum(-1, keepdim=True) * 0 + self.b.float() + 1e6


def test_half_precision_release_finiteness_does_not_depend_on_one_record(hook):
    # Neighbouring datasets of 65519 and 65520 records, every record's gradient is C = 1 (an owner with
    # MNIST-sized data). The clipped float16 sum is 65504 vs inf: the release is finite on D and inf on D',
    # deterministically. The safe behaviour: same finiteness (or the same refusal) on both.
    outcomes = []
    for n in (65519, 65520):
        o = NetOwner(hook, f"rt_noise_half_{n}", torch.zeros(n, 3), torch.zeros(n, 1))
        res = o.gradient(o.plan(HalfBias()), [torch.zeros(1, dtype=torch.float16)], [True], q=1.0)
        outcomes.append(("refused", res.error) if isinstance(res, m.ErrorReply)
                        else ("released", bool(torch.isfinite(res).all())))
    assert outcomes[0] == outcomes[1], outcomes


def test_sum_and_mean_overflow_error_does_not_depend_on_the_data(hook):
    inf = float("inf")
    d = torch.tensor([inf, inf, 1.0, 2.0]).reshape(-1, 1)  # two records whose value is +inf (float32)
    d_prime = torch.tensor([inf, 1.0, 2.0]).reshape(-1, 1)  # one of them removed
    outcomes = {}
    for label, values in (("D", d), ("D'", d_prime)):
        _, ptr = _virtual_owner(hook, f"rt_noise_overflow_{label}", values)
        # epsilon 1000: noise scale 1e305, so the release never overflows because of the noise.
        outcomes[label] = (_query_outcome(ptr, "sum", epsilon=1000.0, bounds=(-1e308, 1e308)),
                           _query_outcome(ptr, "mean", epsilon=1000.0, bounds=(-1e308, 1e308)))
    # Today: D -> ('error:DPReleaseError', 'error:DPReleaseError'), D' -> ('finite', 'finite'), every run.
    assert outcomes["D"] == outcomes["D'"], outcomes


# ================================================================================ correctly refused

def test_query_noise_low_bits_are_not_a_side_channel():
    # The Mironov experiment on the query path (OpenDP's discretized Laplace): dp_sum of D (sum 0.5) and
    # D' (sum 0) with scale 1. Outputs near zero must be as finely spaced under D as under D'.
    x_d, x_dp = torch.tensor([[0.5]]), torch.zeros(0, 1)
    off_d = off_dp = 0
    for _ in range(1500):
        off_d += _off_grid_near_zero(queries.dp_sum(x_d, 0.0, 1.0, 1.0).value, 0.125, 2.0 ** -25)
        off_dp += _off_grid_near_zero(queries.dp_sum(x_dp, 0.0, 1.0, 1.0).value, 0.125, 2.0 ** -25)
    # P(|o| < 1/8) ~ 0.10 (D) / 0.12 (D'), almost all off the 2^-25 grid: each count ~ Binomial(1500, ~0.1)
    # with mean >= 140; P(either < 20) < 1e-30.
    assert off_d >= 20 and off_dp >= 20, (off_d, off_dp)


def test_noise_and_sampling_come_from_the_os_csprng_not_a_seedable_prng():
    def draws():
        return (queries.dp_sum(torch.ones(5, 1), 0.0, 1.0, 1.0, generator=torch.Generator().manual_seed(1)).value,
                queries.dp_count(torch.ones(5, 1), 1.0).value,
                core.gaussian_noise((64,), 1.0),
                core.poisson_mask(256, 0.5),
                pate.lnmax(torch.zeros(1, 64), 0.1))

    outs = []
    for _ in range(2):
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        outs.append(draws())
    a, b = outs
    # Equal twice under the same global seeds only if seeded: the continuous draws collide with probability
    # ~0 and the 256-record mask with 2^-256 (the count and the argmax are drawn but not compared).
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[2], b[2]) and not torch.equal(a[3], b[3])


def test_opendp_maps_and_gaussian_calibration_match_what_veil_charges():
    for scale in (0.5, 2.0, 1e3):  # Laplace (float and integer): epsilon = L1 / scale exactly
        assert core._measurement("laplace", False, scale).map(1.0) == pytest.approx(1.0 / scale, rel=1e-9)
        assert core._measurement("laplace", True, scale).map(1) == pytest.approx(1.0 / scale, rel=1e-9)
    assert core._measurement("gaussian", False, 3.0).map(1.0) == pytest.approx(1 / 18, rel=1e-9)  # rho
    for eps, delta in ((0.1, 1e-6), (1.0, 1e-5), (5.0, 1e-3), (20.0, 1e-8)):
        s = queries.gaussian_sigma(1.0, eps, delta)  # analytic Gaussian (Balle & Wang 2018, Thm. 8)
        actual = norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)
        assert actual <= delta * (1 + 1e-9), (eps, delta, actual)


def test_neighbouring_audits_stay_below_the_charged_epsilon():
    # Empirical lower bounds on epsilon (Clopper-Pearson threshold tests, alpha = 1e-6 each, so the
    # false-failure probability of the 4 audits together is < 4e-6) must not exceed the charge.
    n = 3000
    zeros = torch.zeros(20, 1)
    plus_one = torch.cat([zeros, torch.ones(1, 1)])  # one record at the upper bound added
    eps = 1.0
    audits = {
        "count": ([queries.dp_count(zeros, eps).value.item() for _ in range(n)],
                  [queries.dp_count(plus_one, eps).value.item() for _ in range(n)]),
        "mean": ([queries.dp_mean(zeros, 0.0, 1.0, eps).value.item() for _ in range(n)],
                 [queries.dp_mean(plus_one, 0.0, 1.0, eps).value.item() for _ in range(n)]),
        "histogram": ([queries.dp_histogram(zeros, 2, 0.0, 1.0, eps).value[1].item() for _ in range(n)],
                      [queries.dp_histogram(plus_one, 2, 0.0, 1.0, eps).value[1].item() for _ in range(n)]),
    }
    # PATE LNMax: one teacher moves its vote (counts [5, 5] -> [6, 4]); charged 2 gamma.
    gamma = 0.5
    audits["lnmax"] = (pate.lnmax(torch.tensor([[5.0, 5.0]] * n), gamma).double().numpy(),
                       pate.lnmax(torch.tensor([[6.0, 4.0]] * n), gamma).double().numpy())
    charged = {"count": eps, "mean": eps, "histogram": eps, "lnmax": 2 * gamma}
    for name, (a, b) in audits.items():
        bound = epsilon_lower_bound(np.asarray(a), np.asarray(b), alpha=1e-6, thresholds=20)
        assert bound <= charged[name], (name, bound)


def test_degenerate_noise_scale_fails_the_same_on_neighbours_and_is_charged(hook):
    # lower/upper finite but huge with the smallest epsilon: the scale in the bounds' units is inf. The sum
    # is noised in units of a power of two near the bound (a finite scale there) and the release saturates
    # at the largest float64: charged, finite, and the same whatever the data.
    outcomes = []
    for label, values in (("D", torch.zeros(5, 1)), ("D'", torch.zeros(6, 1))):
        w, ptr = _virtual_owner(hook, f"rt_noise_scale_{label}", values)
        outcomes.append(_query_outcome(ptr, "sum", epsilon=1e-6, bounds=(0.0, 1e308)))
        assert sy.dp.remaining_budget(w, spent=True)[0] == pytest.approx(1e-6)  # charged all the same
    assert outcomes == ["finite"] * 2


def test_empty_and_non_finite_data_give_the_same_shape_and_finite_releases(hook):
    nan, inf = float("nan"), float("inf")
    for label, values in (("empty", torch.zeros(0, 2)), ("full", torch.tensor([[nan, inf], [-inf, 1.0]]))):
        w, ptr = _virtual_owner(hook, f"rt_noise_shape_{label}", values)
        for name, kw in (("count", {}), ("sum", {"bounds": (0.0, 1.0)}), ("mean", {"bounds": (0.0, 1.0)}),
                         ("histogram", {"bounds": (0.0, 1.0), "bins": 3})):
            r = sy.dp.remote_query(ptr, name, epsilon=1.0, **kw)
            want = {"count": (), "sum": (2,), "mean": (2,), "histogram": (3,)}[name]
            assert tuple(r.value.shape) == want and bool(torch.isfinite(r.value).all()), (label, name, r.value)
        assert sy.dp.remaining_budget(w, spent=True)[0] == pytest.approx(4.0)  # 0 rows are charged too


def test_accountant_matches_dp_accounting_directly():
    history = [(1.1, 0.01, 30), (2.0, 0.05, 10), (0.8, 0.002, 50)]
    delta = 1e-5
    for mech, make in (("rdp", rdp.RdpAccountant), ("pld", pld.PLDAccountant)):
        acc = Accountant(mech)
        direct = make()
        for s, q, c in history:
            for _ in range(c):
                acc.step(s, q)
            direct.compose(sgm_event(s, q), c)
        assert acc.get_epsilon(delta) == pytest.approx(direct.get_epsilon(delta), rel=1e-6), mech
    # PATE: LNMax basic composition and GNMax's data-independent RDP
    assert pate.lnmax_epsilon(7, 0.05) == pytest.approx(0.7)
    g = rdp.RdpAccountant(list(pate.DEFAULT_ORDERS))
    g.compose(dp_accounting.GaussianDpEvent(40 / math.sqrt(2)), 100)
    assert pate.gnmax_epsilon_data_independent(100, 40.0, 1e-5) == pytest.approx(g.get_epsilon(1e-5), rel=1e-9)


def test_training_charges_compose_to_the_accountant_even_from_racing_ledgers(tmp_path):
    # Two BudgetLedger objects on one SQLite file (two worker processes of one owner) and 4 threads each
    # charge DP-SGD steps for the same user: the total charged must be the RDP epsilon of all steps
    # (no lost read-modify-write of the training state), and delta charged once.
    path = tmp_path / "ledger.sqlite3"
    ledgers = [BudgetLedger(path), BudgetLedger(path)]
    ledgers[0].set_budget("sci", 100.0, 1e-3)
    steps_per_thread, threads = 5, 8
    start = threading.Barrier(threads)
    errors = []

    def go(i):
        start.wait()
        try:
            for _ in range(steps_per_thread):
                ledgers[i % 2].charge_training_step("sci", 1.0, 0.02, 1e-5)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(threads)]
    [t.start() for t in ts]
    [t.join(120) for t in ts]
    assert not errors, errors
    direct = rdp.RdpAccountant()
    direct.compose(sgm_event(1.0, 0.02), steps_per_thread * threads)
    eps, dlt = ledgers[0].spent("sci")
    assert eps == pytest.approx(direct.get_epsilon(1e-5), rel=1e-6) and dlt == pytest.approx(1e-5)
    # ... and a query after training composes by basic composition, refused once the budget is gone
    ledgers[1].charge("sci", 100.0 - eps - 1e-9, 0.0, "rest")
    with pytest.raises(BudgetExceededError):
        ledgers[0].charge_training_step("sci", 1.0, 0.02, 1e-5)
    for led in ledgers:
        led.close()


def test_a_failed_release_is_charged_and_value_free():
    # The core's post-charge failure is the value-free DPReleaseError (its text never quotes the data).
    err = core.generic_failure("DP sum on w", ValueError("secret value 123.456"))
    assert isinstance(err, DPReleaseError) and "123.456" not in str(err)
