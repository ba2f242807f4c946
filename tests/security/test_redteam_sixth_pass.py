"""Red team, sixth pass: the fixes of d92fffa (float16 refusals, restore_policy, histogram on halves), 1ddd008
(encrypted sums need a majority of the round's clients) and 3a51190 (hide_dp_counts, DP releases get their data
uncopied, poisson_indices by geometric gaps).

Holes found (each test asserts the safe behaviour; fixed):
- ``restore_policy`` only ran for a worker whose ``worker.db`` is an ``OwnerDB``; an in-process worker keeps
  its run-time decisions in the governance state's in-memory database, so a reload of a tightened dataset
  with no policy came back open. Fixed: ``state.has_decisions_store`` (an owner database, or governance
  state already made) gates it.
The other tests assert what held.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter

import phe
import pytest
import torch

import veil as sy
from veil.dp import core
from veil.dp.errors import PrivacyParameterError
from veil.dp.queries import dp_histogram
from veil.exceptions import ConnectionLostError
from veil.federated import trainer as fl
from veil.federated.he_agg import EncryptedAggregation, EncryptedAggregationError
from veil.governance.state import policy_of
from veil.ids import new_id
from veil.messaging import messages as m

from fl_helpers import attempt, honest_fedavg, make_model, make_parts, uid
from server_sessions import open_session, quota_worker, request

TOKEN = "redteam-sixth-pass-token"


def _cmd(srv, s, op, *args, n=1, **kwargs):
    rids = [new_id() for _ in range(n)]
    return request(srv, s, m.CommandMessage(op, args, kwargs, rids)), rids


def _find(srv, s, *tags) -> list:
    reply = request(srv, s, m.SearchMessage(list(tags)))
    assert type(reply) is m.DescriptorsReply, reply
    return reply.descriptors


# ============================================================ 3a51190: DP releases get the owner's data itself


def test_uncopied_dp_query_neither_writes_nor_aliases_owner_data(hook):
    """float64 data (``x.to(float64)`` is ``x`` itself), every query and mechanism, then in-place writes on the
    released results: the owner's tensor must stay bit-identical (no in-place step on x, no result aliasing it)."""
    srv = quota_worker(hook, uid("rt6-alias"), TOKEN, None)
    g = torch.Generator().manual_seed(3)
    data = (torch.rand(29, 2, generator=g, dtype=torch.float64) * 4 - 2)
    data[0, 0], data[1, 1], data[2, 0] = float("nan"), float("inf"), -0.0
    target = torch.rand(29, 1, generator=g, dtype=torch.float64)
    srv.load(data, tags=("#a6", "#data"), private=True)
    srv.load(target, tags=("#a6", "#target"), private=True)
    srv.enable_dp("a6", budgets={"sci": (500.0, 0.5)})
    before = data.clone()
    s = open_session(srv, TOKEN)
    (d,) = _find(srv, s, "#a6", "#data")
    x = m.ObjectRef(d.id)
    calls = [("count", {}), ("sum", dict(lower=-1.0, upper=1.0)), ("mean", dict(lower=-1.0, upper=1.0)),
             ("histogram", dict(lower=-1.0, upper=1.0, bins=4))]
    for (name, kw), mech in itertools.product(calls, ("laplace", "gaussian")):
        delta = 1e-6 if mech == "gaussian" else 0.0
        reply, rids = _cmd(srv, s, "veil.dp.query", x, name, 1.0, delta, mech, kw.get("lower"), kw.get("upper"),
                           kw.get("bins"), n=2)
        assert type(reply) is m.OkReply, (name, mech, reply)
        for rid in rids:
            for op in ("Tensor.add_", "Tensor.mul_", "Tensor.copy_"):
                arg = m.ObjectRef(rid)
                request(srv, s, m.CommandMessage(op, (arg, 1e6 if op != "Tensor.copy_" else arg), {}, [0]))
            wrote = request(srv, s, m.CommandMessage("Tensor.fill_", (m.ObjectRef(rid), 7.0), {}, [0]))
            assert type(wrote) is m.OkReply, wrote  # the requester's own result: writable
        assert torch.equal(torch.nan_to_num(data, nan=123.0), torch.nan_to_num(before, nan=123.0)), (name, mech)
        assert torch.isnan(data[0, 0]) and math.copysign(1.0, float(data[2, 0])) == -1.0
    # the data argument is the only place owner data may enter, uncopied or not
    reply, _ = _cmd(srv, s, "veil.dp.query", x, "sum", 1.0, 0.0, "laplace", x, 1.0, None, n=2)
    assert type(reply) is m.ErrorReply and "data argument" in reply.message, reply


def test_hidden_count_on_restored_and_late_dp_only_data_every_descriptor(hook, tmp_path):
    """A dataset that becomes DP-only through ``restore_policy`` (a reload of a tightened tag set, no
    policy given) after ``enable_dp(hide_count=True)``: search, and a DP release on it, never state its count."""
    from veil.workers.persistence import OwnerDB
    from veil.workers.websocket_server import WebsocketServerWorker

    tokens = sy.TokenTable()
    tokens.add(TOKEN, "sci", "scientist")
    srv = WebsocketServerWorker(hook, id=uid("rt6-hide"), port=0, tokens=tokens, db=OwnerDB(tmp_path / "o.db"))
    srv.load(torch.rand(31, 2), tags=("#h6", "#data"), private=True)
    srv.load(torch.rand(31, 1), tags=("#h6", "#target"), private=True)
    srv.enable_dp("h6", hide_count=True, max_records=100, budgets={"sci": (50.0, 1e-3)})
    srv.load(torch.rand(53, 3), tags=("#late6",), private=True)
    srv.set_policy("#late6", "dp-only")
    again = srv.load(torch.rand(67, 3), tags=("#late6", "#v2"), private=True)  # no policy: restored
    assert policy_of(srv, again) == "dp-only"
    s = open_session(srv, TOKEN)
    shapes = [tuple(d.shape) for d in _find(srv, s)]
    assert all(sh[0] == 0 for sh in shapes if len(sh) > 1 and sh[1] in (2, 3)), shapes
    (d,) = _find(srv, s, "#v2")
    reply, rids = _cmd(srv, s, "veil.dp.query", m.ObjectRef(d.id), "sum", 1.0, 0.0, "laplace", 0.0, 1.0, None, n=2)
    assert type(reply) is m.OkReply, reply
    reply = request(srv, s, m.ListObjectsMessage())
    assert type(reply) is m.DescriptorsReply
    assert all(67 not in tuple(x.shape) for x in reply.descriptors), reply.descriptors
    for op in ("torch.mul", "Tensor.reshape"):
        err, _ = _cmd(srv, s, op, m.ObjectRef(d.id), -1 if op == "Tensor.reshape" else 2)
        text = err.message.replace(str(d.id), "<id>").replace(srv.id, "<worker>")  # (random ids hold any digits)
        assert type(err) is m.ErrorReply and "67" not in text, err


# ============================================================ 3a51190: poisson_indices


def test_poisson_indices_is_one_bernoulli_per_record():
    """Every subset of 3 records has probability q^k (1-q)^(3-k): chi-square over 8 cells."""
    q, draws = 0.3, 40_000
    seen = Counter(tuple(core.poisson_indices(3, q).tolist()) for _ in range(draws))
    chi = 0.0
    for k in range(4):
        for subset in itertools.combinations(range(3), k):
            expected = draws * q ** k * (1 - q) ** (3 - k)
            chi += (seen.get(subset, 0) - expected) ** 2 / expected
    assert set(seen) <= {s for k in range(4) for s in itertools.combinations(range(3), k)}, seen
    assert chi < 30.0, (chi, seen)  # 7 d.o.f.: p < 1e-4


def test_poisson_indices_edges():
    assert core.poisson_indices(0, 0.5).numel() == 0 and core.poisson_indices(0, 0.5).dtype == torch.int64
    assert core.poisson_indices(5, 1.0).tolist() == list(range(5))
    near_one = 1 - 2 ** -53
    assert core.poisson_indices(1000, near_one).tolist() == list(range(1000))
    for tiny in (5e-324, 1e-300, 1e-17):
        assert core.poisson_indices(10**6, tiny).numel() == 0
    ones = sum(core.poisson_indices(1, 0.25).numel() for _ in range(8000))
    assert abs(ones - 2000) < 200, ones  # P(record 0) = q, not shifted by the -1 start
    for n in (16, 17, 100, 1000):  # sorted, unique, in range, a batch boundary included
        for _ in range(50):
            lot = core.poisson_indices(n, 0.9)
            assert torch.all(lot[1:] > lot[:-1]) and (lot.numel() == 0 or (lot[0] >= 0 and lot[-1] < n))
    big = [core.poisson_indices(2000, 0.9).numel() for _ in range(200)]  # mean 1800, sd 13.4 per draw
    assert abs(sum(big) / len(big) - 1800) < 10, sum(big) / len(big)


def test_poisson_indices_time_does_not_grow_with_n_at_a_tiny_rate():
    def t(n):
        ts = []
        for _ in range(15):
            t0 = time.perf_counter()
            core.poisson_indices(n, 1e-7)
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[7]
    t(1000)
    small, big = t(1000), t(10**9)
    assert big < 3 * small + 0.001, (small, big)


# ============================================================ d92fffa: histogram on halves


@pytest.mark.parametrize("lower,upper,bins", [(0.0, 1.0, 10), (-1.0, 1.0, 4), (0.0, 0.3, 3),
                                              (-1.7e308, 1.7e308, 4), (-5e-324, 5e-324, 2), (0.0, 1e-320, 5)])
def test_histogram_on_halves_bins_every_value_once(lower, upper, bins):
    """Each value lands in exactly one bin (sensitivity d), edges, -0.0, NaN, +-inf included; the top edge in
    the last bin. epsilon 1000 with the discrete Laplace: scale 1e-3, so the noisy counts are the counts."""
    width = (upper / bins - lower / bins)
    edges = [lower + k * width for k in range(bins + 1)]
    v = torch.tensor([*edges, -0.0, 0.0, float("nan"), float("inf"), float("-inf"), upper, lower],
                     dtype=torch.float64).reshape(-1, 1)
    res = dp_histogram(v, bins, lower, upper, epsilon=1000.0)
    counts = res.value
    assert counts.shape == (bins,) and float(counts.sum()) == v.numel(), counts
    assert counts[0] >= 1 and counts[-1] >= 2  # lower (and NaN, -inf) first; upper, +inf last
    with pytest.raises(PrivacyParameterError):
        dp_histogram(v, bins, upper, lower, epsilon=1.0)


# ============================================================ d92fffa: float16 refused before the charge


def test_float16_and_bfloat16_refused_before_any_charge():
    for dt in (torch.float16, torch.bfloat16, torch.complex64):
        with pytest.raises(PrivacyParameterError):
            core.check_release_dtypes([torch.zeros(2, dtype=dt)])
    net = torch.nn.Linear(2, 1).to(torch.bfloat16)
    with pytest.raises(PrivacyParameterError):
        sy.dp.DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=4)


# ============================================================ d92fffa: restore_policy


def test_restore_policy_on_a_worker_with_an_owner_db(hook, tmp_path):
    from veil.workers.persistence import OwnerDB
    from veil.workers.websocket_server import WebsocketServerWorker

    db = OwnerDB(tmp_path / "owner.db")
    tokens = sy.TokenTable()
    tokens.add(TOKEN, "sci", "scientist")
    a = WebsocketServerWorker(hook, id=uid("rt6-rp-a"), port=0, tokens=tokens, db=db)
    a.load(torch.rand(4, 2), tags=("#rp6",), allowed_users=("sci",))  # allowed_users only: still protected
    a.set_policy("#rp6", "review")
    b = WebsocketServerWorker(hook, id=uid("rt6-rp-b"), port=0, tokens=tokens, db=db)  # a replica
    assert policy_of(b, b.load(torch.rand(4, 2), tags=("#rp6", "#new"))) == "review"
    assert policy_of(b, b.load(torch.rand(4, 2), tags=("#rp6",), policy="dp-only")) == "dp-only"
    assert policy_of(b, b.load(torch.rand(4, 2), tags=("#other",))) == "open"


def test_reload_without_policy_keeps_the_tightening_on_an_in_process_worker(hook):
    w = sy.VirtualWorker(hook, id=uid("rt6-rp-virt"))
    w.load(torch.rand(5, 2), tags=("#tight6",), private=True)
    w.set_policy("#tight6", "dp-only")
    explicit = w.load(torch.rand(5, 2), tags=("#tight6",), private=True, policy="open")
    assert policy_of(w, explicit) == "dp-only"  # the explicit "open" load gets the stored decision...
    implicit = w.load(torch.rand(5, 2), tags=("#tight6",), private=True)
    assert policy_of(w, implicit) == "dp-only"  # ...and so must the load that passes no policy


# ============================================================ 1ddd008: encrypted sums need a majority


class _FailsTraining(sy.VirtualWorker):
    def _recv_msg(self, data):
        if b"veil.plan.load_state" in bytes(data):
            raise ConnectionLostError(f"client {self.id!r} went away")
        return super()._recv_msg(data)


class _FailsEncrypting(sy.VirtualWorker):
    def _recv_msg(self, data):
        if b"veil.fl.encrypt_state" in bytes(data):
            raise ConnectionLostError(f"client {self.id!r} went away")
        return super()._recv_msg(data)


@pytest.mark.parametrize("failing", [_FailsTraining, _FailsEncrypting])
def test_he_half_of_four_clients_gone_is_not_decrypted(hook, failing):
    """4 clients, 2 fail (training, or at the encryption): the remaining pair (e.g. a victim and an attacker who
    subtracts its own update) is no majority of 4: nothing decrypted, whichever stage they failed at."""
    pub, priv = phe.generate_paillier_keypair(n_length=512)
    workers = [sy.VirtualWorker(hook, id=uid("rt6-he-ok")) for _ in range(2)] + \
        [failing(hook, id=uid("rt6-he-gone")) for _ in range(2)]
    parts = make_parts(4)
    model = make_model()
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    _, err, _ = attempt(lambda: fl.train(model, fed, rounds=1, lr=0.05, batch_size=8, progress=False,
                                         encrypted_aggregation=EncryptedAggregation(public_key=pub, private_key=priv)))
    pair = honest_fedavg(parts[:2])
    leaked = err is None and torch.allclose(model.weight.detach(), pair[0], atol=1e-5)
    assert not leaked and isinstance(err, EncryptedAggregationError), repr(err)


def test_he_started_smaller_than_given_is_ignored(hook):
    """A ``started`` below the clients given cannot lower the majority (max(started, given))."""
    pub, priv = phe.generate_paillier_keypair(n_length=512)
    he = EncryptedAggregation(public_key=pub, private_key=priv)
    ok = [sy.VirtualWorker(hook, id=uid("rt6-he-s")) for _ in range(1)]
    gone = [_FailsEncrypting(hook, id=uid("rt6-he-sg")) for _ in range(2)]
    pointers = {w.id: [torch.ones(3).send(w)] for w in ok + gone}
    with pytest.raises(EncryptedAggregationError):
        he.aggregate(pointers, {wid: 1 / 3 for wid in pointers}, started=1)
    with pytest.raises(EncryptedAggregationError):
        he.aggregate(pointers, {wid: 1 / 3 for wid in pointers}, started=0)
