"""Secure aggregation with dropouts: kill clients at every stage; the coordinator sees only masked values."""

import warnings

import pytest
import torch
from scipy import stats
from torch import nn

import veil as sy
from veil import federated as fl
from veil.exceptions import ConnectionLostError
from veil.federated import secure_agg as sa
from veil.federated.secure_agg import STAGES, ClientInput, SecureAggregationError, secure_aggregate
from veil.messaging.allowlist import ALLOWLIST
from veil.mpc.encoding import encode
from veil.tensors import remote_ops


class KillableWorker(sy.VirtualWorker):
    dead = False

    def _recv_msg(self, data):
        if self.dead:
            raise ConnectionLostError(f"worker {self.id} is unreachable")
        return super()._recv_msg(data)


def _clients(hook, prefix, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    workers = [KillableWorker(hook, id=f"{prefix}_{i}") for i in range(n)]
    states = {w.id: [torch.randn(4, 3, generator=g), torch.randn(3, generator=g)] for w in workers}
    weights = {w.id: float(10 + 7 * i) for i, w in enumerate(workers)}
    inputs = {w.id: ClientInput(w, [t.send(w) for t in states[w.id]], weights[w.id]) for w in workers}
    return workers, states, weights, inputs


def _plain_sum(states, weights, ids):
    return [sum(weights[w] * states[w][k] for w in ids) for k in range(2)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kills", [1, 2])
def test_dropouts_at_every_stage_recover_the_survivors_sum(hook, stage, kills):
    workers, states, weights, inputs = _clients(hook, f"sad_{stage}_{kills}")
    victims = workers[-kills:]

    def before(name):
        if name == stage:
            for w in victims:
                w.dead = True

    result = secure_aggregate(inputs, tag=1000 + kills, threshold=3, before_stage=before)
    # a client whose masked input arrived (killed at confirm or unmask) is in the sum: its masks are recovered
    expected_ids = [w.id for w in workers] if stage in ("confirm", "unmask") else [w.id for w in workers[:-kills]]
    assert sorted(result.survivors) == sorted(expected_ids)
    for got, want in zip(result.total, _plain_sum(states, weights, expected_ids)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert result.weight_sum == pytest.approx(sum(weights[w] for w in expected_ids))
    for got, want in zip(result.average(), _plain_sum(states, weights, expected_ids)):
        torch.testing.assert_close(got, want / result.weight_sum, atol=1e-6, rtol=0)
    assert all(not w.__dict__.get("_secagg_rounds") for w in workers if not w.dead)  # nothing left behind


@pytest.mark.parametrize("stage", STAGES)
def test_too_many_dropouts_recover_nothing(hook, stage):
    workers, _, _, inputs = _clients(hook, f"sa_many_{stage}")

    def before(name):
        if name == stage:
            for w in workers[2:]:
                w.dead = True

    with pytest.raises(SecureAggregationError, match="3 needed"):
        secure_aggregate(inputs, tag=7, threshold=3, before_stage=before)
    assert all(not w.__dict__.get("_secagg_rounds") for w in workers[:2])  # discarded on the reachable ones


def test_the_coordinator_receives_only_values_independent_of_an_update(hook, monkeypatch):
    """Everything the coordinator fetches, over many rounds with a dropout at unmask, is uniform and
    does not depend on the update: client 0's update is 0 on half its coordinates and 1e6 on the other
    half; the masked values' top bytes are compared between the halves and against uniform."""
    received = []
    real_fetch = sa._fetch
    monkeypatch.setattr(sa, "_fetch", lambda r: received.append(real_fetch(r)) or received[-1])
    workers = [KillableWorker(hook, id=f"sau_{i}") for i in range(3)]
    update = torch.cat([torch.zeros(32), torch.full((32,), 1e6)])
    others = [torch.randn(64) for _ in workers[1:]]
    tops = []
    for rnd in range(60):
        for w in workers:
            w.dead = False
        ptrs = {w.id: [t.send(w)] for w, t in zip(workers, [update, *others])}
        inputs = {w: ClientInput(p[0].location, p, 1.0) for w, p in ptrs.items()}
        received.clear()

        def before(name):
            if name == "unmask":
                workers[2].dead = True  # recovery path: its pair masks are removed with reconstructed keys

        result = secure_aggregate(inputs, tag=50_000 + rnd, threshold=2, before_stage=before)
        torch.testing.assert_close(result.total[0], update + sum(others), atol=1e-3, rtol=0)
        masked = [r for r in received if isinstance(r, torch.Tensor) and r.shape == (66,)]
        assert len(masked) == 3
        own = masked[0]  # client 0 answers first
        assert not torch.equal(own[:64], encode(update, sa.ENCODING))
        tops.append(own[:64])
    tops = torch.stack(tops)
    top_byte = ((tops >> 56) & 0xFF)
    zero_half, big_half = top_byte[:, :32].flatten(), top_byte[:, 32:].flatten()
    bins = 16
    h0 = torch.bincount(zero_half // (256 // bins), minlength=bins).numpy()
    h1 = torch.bincount(big_half // (256 // bins), minlength=bins).numpy()
    assert stats.chisquare(h0).pvalue > 1e-4 and stats.chisquare(h1).pvalue > 1e-4  # uniform
    assert stats.chi2_contingency([h0, h1]).pvalue > 1e-4  # same distribution for 0 and 1e6
    # the fixed-point encoding of the update would put every "0" coordinate at top byte 0
    assert (zero_half == 0).float().mean() < 0.05


def test_a_client_never_reveals_both_masks_of_anyone(hook):
    workers, _, _, inputs = _clients(hook, "sa_both", n=3)
    tag = 99
    ids = [w.id for w in workers]
    def call(name, args, w):
        return remote_ops.call(ALLOWLIST.by_name(f"veil.secagg.{name}"), args, {}, location=w)
    pks = torch.stack([call("advertise", (tag, 3, 2), w).get() for w in workers])
    for w in workers:
        call("share_keys", (tag, ids, pks), w)
    for w in workers:
        call("masked_input", (tag, ids, inputs[w.id].state, 1.0, None), w).get()
    w0 = workers[0]
    with pytest.raises(Exception, match="refused"):  # u both survivor and dropped: sk_u and b_u
        call("unmask", (tag, ids, [ids[1]]), w0).get()
    with pytest.raises(Exception, match="refused"):  # a second masked input for the same round
        call("masked_input", (tag, ids, inputs[w0.id].state, 1.0, None), w0).get()
    # (the consistency round: t = 2 clients confirm the survivor set w0 unmasks over)
    tags = {w.id: sa._fetch(call("confirm", (tag, ids[:2]), w)) for w in workers[:2]}
    b_shares, sk_shares = sa._fetch(call("unmask", (tag, ids[:2], [ids[2]],
                                                    sa.secagg_confirm.for_client(tags, ids[:2], w0.id)), w0))
    assert b_shares.shape == (2, 66) and sk_shares.shape == (1, 66)
    with pytest.raises(Exception, match="no secure-aggregation round"):  # answered once: the round is gone
        sa._fetch(call("unmask", (tag, ids, []), w0))
    assert w0.__dict__.get("_secagg_rounds") == {}


def test_training_with_a_client_killed_mid_protocol_never_reads_a_state(hook, monkeypatch):
    from veil.plans.remote import PlanPointer

    def no_state(self):
        raise AssertionError("the coordinator read a client's state in the clear")

    monkeypatch.setattr(PlanPointer, "get_state", no_state)
    torch.manual_seed(0)
    x, y = torch.randn(60, 3), torch.randn(60, 1)
    workers = [KillableWorker(hook, id=f"sat_{i}") for i in range(4)]
    fed = fl.federate(torch.utils.data.TensorDataset(x, y), workers)
    real = sa.secure_aggregate

    def killing(inputs, tag, threshold=None, before_stage=None, **options):
        def before(name):
            if name == "masked_input":
                workers[3].dead = True
        return real(inputs, tag, threshold, before, **options)

    monkeypatch.setattr(sa, "secure_aggregate", killing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hist = fl.train(nn.Linear(3, 1), fed, rounds=1, lr=0.01, secure_aggregation=True, progress=False)
    assert "sat_3" in hist.rounds[0].dropped and len(hist.rounds[0].clients) == 3
    assert hist.rounds[0].train_loss == hist.rounds[0].train_loss  # the masked loss sum is a number (not NaN)


def test_another_scientist_cannot_touch_a_round_over_the_network(hook, websocket_servers):
    """A second data scientist's token (user "hospital") tries every secagg function on the coordinator's
    round on three peered `veil worker` processes: each is refused like a missing round, no share or mask
    comes back, and the coordinator's round then completes with the exact plain-torch sum."""
    from veil.exceptions import VeilError

    scientist, other = "test-scientist-token", "test-hospital-token"  # tests/conftest.py's session servers

    names = ("alice", "bob", "charlie")
    port = {n: websocket_servers[n].port for n in names}

    def connect(name, token):
        return sy.WebsocketClientWorker(hook, id=name, host="127.0.0.1", port=port[name], token=token, timeout=60)

    coord = {n: connect(n, scientist) for n in names}
    states = {n: [torch.randn(3, 2), torch.randn(2)] for n in names}
    attacker = {}
    try:
        def call(name, args, w):
            return remote_ops.call(ALLOWLIST.by_name(f"veil.secagg.{name}"), args, {}, location=w)

        tag = 7_000_000 + int(torch.randint(1 << 20, (1,)))
        ids = list(names)
        pks = torch.stack([call("advertise", (tag, 3, 2), coord[n]).get() for n in names])
        for n in names:
            call("share_keys", (tag, ids, pks), coord[n])
        attacker = {n: connect(n, other) for n in names}
        fake = torch.zeros(1, 66, dtype=torch.int64)
        attempts = {
            "share_keys": lambda w: call("share_keys", (tag, ids, pks), w),
            "masked_input": lambda w: call("masked_input", (tag, ids, [torch.ones(3, 2), torch.ones(2)], 1.0,
                                                            None), w).get(),
            "unmask": lambda w: sa._fetch(call("unmask", (tag, ids[:2], [ids[2]]), w)),
            "deposit": lambda w: call("deposit", (tag, "scientist", "alice", fake, fake), w),
        }
        for n in names:
            for fname, attempt in attempts.items():
                with pytest.raises(VeilError) as info:
                    attempt(attacker[n])
                text = str(info.value)
                if fname == "deposit":
                    assert "no secure-aggregation round" in text, fname
                else:  # word for word what a round that does not exist gets: its existence is not revealed
                    assert f"no secure-aggregation round {tag}" in text, (fname, text)
            call("discard", (tag,), attacker[n])  # silent, and ends nothing
            # the attacker's own round under the same tag is a separate round (no interference)
            assert call("advertise", (tag, 3, 2), attacker[n]).get().shape == (32,)
            call("discard", (tag,), attacker[n])
        # the coordinator's round is intact: masked inputs and recovery give the exact sum
        masked = {n: call("masked_input", (tag, ids, [t.send(coord[n]) for t in states[n]], 1.0, None),
                          coord[n]).get() for n in names}
        tags = {n: sa._fetch(call("confirm", (tag, ids), coord[n])) for n in names}
        answers = {n: sa._fetch(call("unmask", (tag, ids, [], sa.secagg_confirm.for_client(tags, ids, n)), coord[n]))
                   for n in names}
        total = sa._recover(masked, answers, ids, ids, [], {n: sa.sc.tensor_bytes(pks[i]) for i, n in enumerate(ids)},
                            2, 10, tag)
        flat = sa.decode(total, sa.ENCODING, dtype=torch.float64)
        want = torch.cat([sum(states[n][0] for n in names).flatten(), sum(states[n][1] for n in names)])
        torch.testing.assert_close(flat[:8].float(), want, atol=1e-4, rtol=0)
        for n in names:  # both workers still serve both users
            assert float((torch.ones(2).send(attacker[n]) * 3).get().sum()) == 6.0
    finally:
        for w in list(coord.values()) + list(attacker.values()):
            w.close()
