"""Red team, second pass over federated rounds: secure aggregation's ring and the work and memory a round
costs the clients' workers.

Attackers: a scientist session on a client's worker (any user a worker lets coordinate rounds: scientist or
admin), an honest coordinator whose clients' inputs are each in range, and a client that refuses its peers'
deposits. Hostile-coordinator attacks on the protocol itself (model inconsistency, per-client weights,
trap layers) are outside the README's model for secure aggregation ("assumes an honest-but-curious
coordinator and clients that follow the protocol"), and a scientist may keep what it computes from data
under the default ``open`` policy, so they are not tested here as holes (see the report).

Every test asserts the SAFE behaviour. These were holes (strict xfails) when written, fixed in
veil/federated/secure_agg.py:

- ``share_keys`` computed Shamir shares for as many clients as the scientist named (O(n * t) big-integer work
  per secret, t > n / 2): now at most ``MAX_SECAGG_CLIENTS`` clients per round, checked at ``advertise`` and
  ``share_keys``.
- a round's state lived outside the object store, charged to no quota, and never expired: now at most
  ``MAX_LIVE_ROUNDS`` live rounds per network session, freed when the session ends or ``ROUND_TTL_S`` old.
- each client's fixed-point input was checked against the ring alone (|x| < 2^38), so three in-range inputs
  wrapped around Z/2^64 silently: now a client refuses a value n of which could wrap, and the coordinator
  checks the recovered weight sum (and each recovered key) before it returns anything.
- a completed round left its state on clients that did not answer ``unmask``; malformed replies crashed or
  corrupted the round; a client's refusal text reached ``fl.train`` uncut; a peer's deposit could hold many
  share rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.federated import secagg_crypto as sc
from veil.federated import secagg_client, secure_agg as sa
from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, quota_worker, request  # noqa: E402

TOKEN = "rt-fl2-scientist-token"


def _fn(srv, sess, name, *args, ids=None):
    """``veil.secagg.<name>(*args)`` on the network request path of a scientist session."""
    return request(srv, sess, m.CommandMessage(f"veil.secagg.{name}", args, {}, [new_id()] if ids is None else ids,
                                               False))


def _clients(hook, prefix, values, worker_cls=sy.VirtualWorker):
    workers = [worker_cls(hook, id=f"{prefix}_{i}") for i in range(len(values))]
    plain = {w.id: torch.full((4,), float(v), dtype=torch.float64) for w, v in zip(workers, values)}
    return workers, plain


def _still_aggregates(hook, prefix):
    """An honest round on fresh workers still returns the exact sum."""
    workers, plain = _clients(hook, prefix, [1.5, -2.0, 3.25])
    inputs = {w.id: sa.ClientInput(w, [plain[w.id].send(w)], 1.0) for w in workers}
    result = sa.secure_aggregate(inputs, tag=int(new_id()))
    torch.testing.assert_close(result.total[0], sum(plain.values()), atol=1e-5, rtol=0)


# ================================================================== a scientist session against a client's worker


def test_a_scientist_cannot_make_share_keys_share_keys_for_100k_clients(hook, monkeypatch):
    """A scientist (a user allowed to coordinate rounds) advertises a round for n = 100,000 clients, t = 50,001
    (a majority, as ``share_keys`` demands), then sends ``share_keys`` with 100,000 distinct ids (its own
    worker's key in its row, zeros elsewhere). The worker computes 100,000 Shamir shares of a degree-50,000
    polynomial for each of its two secrets before it tries to reach a single peer: n*t = 5e9 521-bit
    multiply-mods per secret (measured: 1.3 s for n = 4,000; about 13 minutes per secret at n = 100,000), one
    request, no refusal. Must hold: the worker refuses such a round before it computes shares whose cost is
    past 1e9 Horner steps: ``advertise`` refuses n > ``MAX_SECAGG_CLIENTS``, and ``share_keys`` refuses more
    ids than that whatever the round was advertised with. ``sc.share`` is replaced by a recorder that stops
    the request, so the test measures what would be computed without computing it."""
    srv = quota_worker(hook, "rt_fl2_share_dos", TOKEN, None)
    sess = open_session(srv, TOKEN)
    asked = []

    def recorder(secret, n, threshold):
        asked.append((n, threshold))
        raise RuntimeError("red team: share computation stopped")

    monkeypatch.setattr(sc, "share", recorder)
    n, tag = 100_000, 9_200_001
    advertised = _fn(srv, sess, "advertise", tag, n, n // 2 + 1)
    if type(advertised) is m.OkReply:
        public = srv.__dict__["_secagg_rounds"][("sci", tag)].public
        ids = [srv.id] + [f"ghost_{i}" for i in range(n - 1)]
        table = torch.zeros(n, 32, dtype=torch.int64)
        table[0] = sc.bytes_tensor(public)
        reply = _fn(srv, sess, "share_keys", tag, ids, table)
        assert type(reply) is m.ErrorReply, reply  # (the recorder stops it either way)
        _fn(srv, sess, "discard", tag, ids=[])
    worst = max((k * t for k, t in asked), default=0)
    assert worst <= 10**9, f"the worker set out to compute shares for n={asked[0][0]}, t={asked[0][1]}"
    assert type(advertised) is m.ErrorReply
    # share_keys checks the cap itself (here lowered under a round advertised before)
    assert type(_fn(srv, sess, "advertise", tag + 1, 4, 3)) is m.OkReply
    monkeypatch.setattr(secagg_client, "MAX_SECAGG_CLIENTS", 3)
    ids = [srv.id] + [f"ghost_{i}" for i in range(3)]
    reply = _fn(srv, sess, "share_keys", tag + 1, ids, torch.zeros(4, 32, dtype=torch.int64), ids=[])
    assert type(reply) is m.ErrorReply and "threshold ids" in reply.message and not asked, reply
    assert type(_fn(srv, sess, "discard", tag + 1, ids=[])) is m.OkReply


def test_round_state_of_one_session_is_bounded(hook):
    """A scientist session with a 1 MiB quota calls ``advertise`` 20,000 times with fresh tags and no result
    id (nothing enters the object store, so nothing is charged). Each call leaves a ``_Round`` (an X25519 key
    pair, a self-mask seed, its dicts: about 750 bytes measured) in ``worker._secagg_rounds`` until the same
    user ends it; no cap, no expiry (about 5,000 calls a second in process: megabytes a second from one
    session, and a round that went through ``share_keys`` also keeps one public key per named client). Must
    hold: calls past ``MAX_LIVE_ROUNDS`` live rounds of this session are refused, and the worker holds no more."""
    srv = quota_worker(hook, "rt_fl2_rounds", TOKEN, 1 << 20)
    sess = open_session(srv, TOKEN)
    calls = 20_000
    refused = 0
    for k in range(calls):
        reply = _fn(srv, sess, "advertise", 9_300_000 + k, 3, 2, ids=[])
        refused += type(reply) is m.ErrorReply
    live = sum(1 for user, _ in srv.__dict__.get("_secagg_rounds", {}) if user == "sci")
    for k in range(calls):  # (frees them whatever the outcome)
        _fn(srv, sess, "discard", 9_300_000 + k, ids=[])
    assert not srv.__dict__.get("_secagg_rounds")  # the owner of the rounds can still end them all
    assert refused > 0 and live <= sa.MAX_LIVE_ROUNDS, f"{live} rounds held for one session, {refused} refused"


def test_a_sessions_rounds_end_with_it_and_stale_rounds_expire(hook):
    """Round state is freed without its coordinator's discard: a closed session's rounds go with it (a
    session-end handler), and a round ``ROUND_TTL_S`` old is dropped at the worker's next ``advertise``."""
    srv = quota_worker(hook, "rt_fl2_round_ends", TOKEN, None)
    sess = open_session(srv, TOKEN)
    for k in range(3):
        assert type(_fn(srv, sess, "advertise", 9_350_000 + k, 3, 2)) is m.OkReply
    rounds = srv.__dict__["_secagg_rounds"]
    assert len(rounds) == 3  # (premise)
    srv.end_session(sess)
    assert not rounds
    sess = open_session(srv, TOKEN)
    assert type(_fn(srv, sess, "advertise", 9_350_010, 3, 2)) is m.OkReply
    rounds[("sci", 9_350_010)].started -= sa.ROUND_TTL_S + 1
    assert type(_fn(srv, sess, "advertise", 9_350_011, 3, 2)) is m.OkReply
    assert list(rounds) == [("sci", 9_350_011)]
    assert type(_fn(srv, sess, "discard", 9_350_011)) is m.OkReply


# ================================================================== the ring of the sum


def test_the_secure_sum_never_wraps_silently(hook):
    """Three honest clients, weight 250,000 samples each, a state entry of 1e6 (a BatchNorm running variance
    of raw features, a large count buffer): each weighted input 2.5e11 is inside the encoding's range
    (|x| < 2^62 / 2^24 = 2.7e11) so every client's ``masked_input`` accepts it, but the sum 7.5e11 is not:
    it wraps around Z/2^64 and decodes as -3.5e11, the round's average is -4.7e5 instead of 1e6, and nothing
    warns. Must hold: the round fails, never a wrong model update: each client refuses an input of which
    the round's 3 could wrap (|x| * 2^24 >= 2^63 / 3), so fewer than t masked inputs arrive."""
    workers, plain = _clients(hook, "rt_fl2_wrap", [1e6, 1e6, 1e6])
    weight = 2.5e5
    inputs = {w.id: sa.ClientInput(w, [plain[w.id].send(w)], weight) for w in workers}
    with pytest.raises(sa.SecureAggregationError, match="finished masked_input"):
        sa.secure_aggregate(inputs, tag=int(new_id()))
    assert all(not w.__dict__.get("_secagg_rounds") for w in workers)
    _still_aggregates(hook, "rt_fl2_wrap_after")


def test_one_client_input_beyond_the_ring_is_dropped_not_wrapped(hook):
    """One client's weighted input (3e11) is past the encoding's range; it must not enter the ring reduced
    mod 2^64 (a wrapped input would shift the sum by a multiple of 2^40 without a trace). Must hold: that client
    is refused at ``masked_input`` (dropped), and the other two clients' exact sum is recovered."""
    workers, plain = _clients(hook, "rt_fl2_big", [1.0, -2.5, 3e11])
    inputs = {w.id: sa.ClientInput(w, [plain[w.id].send(w)], 1.0) for w in workers}
    result = sa.secure_aggregate(inputs, tag=int(new_id()))
    assert result.dropped == [workers[2].id] and sorted(result.survivors) == sorted(w.id for w in workers[:2])
    torch.testing.assert_close(result.total[0], plain[workers[0].id] + plain[workers[1].id], atol=1e-5, rtol=0)
    assert result.weight_sum == pytest.approx(2.0)


class _RefusingPeer(sy.VirtualWorker):
    """A client that takes part in every stage it is asked to run but answers every deposit its peers send it
    with a long error text (what a hostile ``veil worker`` could reply on a peer link)."""

    def _recv_msg(self, data):
        from veil.messaging.serde import deserialize

        try:
            msg = deserialize(bytes(data), self._decode_ctx)[0]
        except Exception:  # noqa: BLE001  (parts of a large request: not a deposit)
            msg = None
        if isinstance(msg, m.CommandMessage) and msg.op == "veil.secagg.deposit":
            return self._error_bytes(sa.RemoteExecutionError("MALLORY-TEXT " * 20_000))
        return super()._recv_msg(data)


def test_a_peer_refusing_deposits_drops_only_itself_and_its_text_stays_out(hook):
    """Client M answers every peer deposit with a 260 kB error. The honest clients' ``share_keys`` must not
    fail because of a peer (nor carry its text back): M, lacking their shares, refuses its masked input and
    is dropped; the honest pair's exact sum is recovered and no result or client state holds M's text."""
    workers = [sy.VirtualWorker(hook, id="rt_fl2_ref_0"), sy.VirtualWorker(hook, id="rt_fl2_ref_1"),
               _RefusingPeer(hook, id="rt_fl2_ref_2")]
    plain = {w.id: torch.full((4,), float(k) + 0.5, dtype=torch.float64) for k, w in enumerate(workers)}
    inputs = {w.id: sa.ClientInput(w, [plain[w.id].send(w)], 1.0) for w in workers}
    result = sa.secure_aggregate(inputs, tag=int(new_id()))
    assert result.dropped == ["rt_fl2_ref_2"]
    torch.testing.assert_close(result.total[0], plain["rt_fl2_ref_0"] + plain["rt_fl2_ref_1"], atol=1e-5, rtol=0)
    assert "MALLORY" not in repr(result)
    for w in workers[:2]:  # the honest clients' rounds ended with their unmask: nothing of M's text kept
        assert not w.__dict__.get("_secagg_rounds")


# ================================================================== what a round leaves on its clients


def test_a_completed_round_leaves_no_state_on_clients_it_dropped(hook):
    """``fl.train(secure_aggregation=True)`` over three clients; the third's targets are in the millions, so
    its weighted loss (about 1e13) is past the fixed-point range and its ``masked_input`` is refused every round:
    it is dropped alive. The round then completes over the other two; ``unmask`` deletes their round state,
    and ``discard`` is sent only when a round fails. The dropped client keeps, per round, its X25519 private
    key, its self-mask seed and every peer's Shamir shares, for ever (a client that keeps timing out at
    ``masked_input``, or fails at ``share_keys``, piles up one such round per training round; the docstring
    says round state "is deleted after unmask or discard"). Must hold: after training no client holds any
    secure-aggregation round (the coordinator discards the round on every client that did not answer
    ``unmask``, whether the round succeeded or not)."""
    import warnings

    import torch.nn.functional as F

    from veil import federated as fl

    from fl_helpers import make_model, make_parts, uid

    parts = make_parts(3)
    x2, y2 = parts[2]
    parts[2] = (x2, y2 * 3e6)
    workers = [sy.VirtualWorker(hook, id=uid("linger")) for _ in parts]
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        history = fl.train(make_model(), fed, rounds=3, lr=0.01, batch_size=8, secure_aggregation=True,
                           min_workers=2, progress=False, loss_fn=F.mse_loss)
    assert all(workers[2].id in r.dropped for r in history.rounds)  # (the attack's premise)
    assert all(r.clients == [workers[0].id, workers[1].id] for r in history.rounds)
    held = {w.id: len(w.__dict__.get("_secagg_rounds", {})) for w in workers}
    assert held == {w.id: 0 for w in workers}, held


def test_a_hidden_serving_share_cannot_enter_a_secure_sum(hook):
    """The coordinator (here in process, as the serving owner is on its parties) holds two workers' additive
    shares of a value revealable only to "carol" (a serving client's input), each under a pointer it may
    not ``.get()``. It runs a secure-aggregation round with those shares as the two clients' states and a
    weight of 2^-30 (which brings ring elements into the encoding's range): the recovered sum would be the
    client's input up to float rounding. Must hold: both masked inputs are refused (the oblivious guard
    follows masked_input's ops), nothing is recovered, and the workers still aggregate."""
    from veil.mpc.encoding import encode, make_encoding
    from veil.mpc.sharing import split
    from veil.tensors.pointer import PointerTensor
    from veil.workers.monitor import Kind, Principal

    me = hook.local_worker
    workers = [sy.VirtualWorker(hook, id=f"rt_fl2_hidden_{i}") for i in range(2)]
    secret = torch.tensor([3.75, -1.5, 1234.5])
    inputs = {}
    for w, share in zip(workers, split(encode(secret, make_encoding()), 2)):
        oid = new_id()
        w.monitor.store(Principal(me.id, me.id), oid, share, kind=Kind.SHARE, reveal_to=("carol",))
        inputs[w.id] = sa.ClientInput(w, [PointerTensor(w, oid, me, share.shape, share.dtype)], 2.0 ** -30)
    with pytest.raises(VeilError):  # (premise: the share itself is not revealable to the coordinator)
        inputs[workers[0].id].state[0].get(delete=False)
    with pytest.raises(sa.SecureAggregationError, match="masked_input"):
        sa.secure_aggregate(inputs, tag=int(new_id()))
    assert all(not w.__dict__.get("_secagg_rounds") for w in workers)  # the failed round was discarded
    _still_aggregates(hook, "rt_fl2_hidden_after")


# ================================================================== a client's malformed protocol replies


def _malformed(mode, t):
    """What the hostile client answers instead of ``t`` (None: ``t`` is not the reply this mode rewrites).
    Linear(3, 1): a masked input has 3 + 1 + 2 = 6 entries; a public key is 32 byte values."""
    if t.dtype != torch.int64:
        return None
    if t.shape == (32,):
        return {"key_33_bytes": torch.cat([t, t[:1]]), "key_float": t.to(torch.float64)}.get(mode)
    if t.shape == (6,):
        return {"masked_one_entry": t[:1], "masked_float": t.to(torch.float64),
                "masked_7_entries": torch.cat([t, t[:1]])}.get(mode)
    if t.dim() == 2 and t.shape[1] == sc.SHARE_BYTES:
        return {"shares_out_of_range": t + 1000, "shares_no_rows": t[:0]}.get(mode)
    return None


class _MalformedClient(sy.VirtualWorker):
    """Trains honestly, then answers one secure-aggregation fetch (its public key, its masked input or its
    unmask shares) with a tensor of another shape or dtype (what a hostile or mismatched ``veil worker``
    can send)."""

    mode = None

    def _recv_msg(self, data):
        from veil.messaging.serde import deserialize, serialize

        reply = super()._recv_msg(data)
        msg = deserialize(reply)[0]
        if type(msg) is m.ObjectsReply and len(msg.objects) == 1 and isinstance(msg.objects[0], torch.Tensor):
            new = _malformed(self.mode, msg.objects[0])
            if new is not None:
                return serialize(m.ObjectsReply([new]), sender=self.id)
        return reply


@pytest.mark.parametrize("mode", ["key_33_bytes", "key_float", "masked_one_entry", "masked_float",
                                  "masked_7_entries", "shares_out_of_range", "shares_no_rows"])
def test_a_malformed_secure_aggregation_reply_drops_only_that_client(hook, mode):
    """``fl.train(secure_aggregation=True)`` over three clients, the first hostile: it answers the
    coordinator's fetch of its public key (33 bytes, or float64), of its masked input (1 or 7 entries
    instead of 6, or float64) or of its unmask shares (bytes past 255, no rows) with a tensor of another
    shape or dtype. The README promises that a malformed update ("another count, shape or dtype") drops that
    client; today ``secure_aggregate`` uses the tensors as they come: ``torch.stack`` of the keys or
    ``total + y`` raises a RuntimeError, ``_recover`` a ValueError/IndexError, each out of ``fl.train`` (one
    client aborts the training); a float64 key table makes every honest client refuse ``share_keys`` (the
    round fails); a one-entry masked input broadcasts and a float64 one promotes the ring sum, and the model
    is silently replaced by garbage (weights of 4.6e10). Must hold: the training completes, the malformed
    client is dropped (key, masked input) or its answer set aside (unmask shares: the other two answers
    suffice), and the model is FedAvg over the clients whose update is in the sum."""
    import warnings

    from veil import federated as fl

    from fl_helpers import honest_fedavg, make_model, make_parts, uid

    parts = make_parts(3)
    bad = _MalformedClient(hook, id=uid("a-malformed"))  # ("a-": first in the round's id order)
    bad.mode = mode
    workers = [bad, sy.VirtualWorker(hook, id=uid("ok")), sy.VirtualWorker(hook, id=uid("ok"))]
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    model = make_model()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        history = fl.train(model, fed, rounds=1, lr=0.05, batch_size=8, secure_aggregation=True, progress=False)
    in_sum = parts if mode.startswith("shares") else parts[1:]
    assert history.rounds[0].clients == [w.id for w, p in zip(workers, parts) if any(p is q for q in in_sum)]
    for got, want in zip(model.parameters(), honest_fedavg(in_sum)):
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)


class _Killable(sy.VirtualWorker):
    dead = False

    def _recv_msg(self, data):
        from veil.exceptions import ConnectionLostError

        if self.dead:
            raise ConnectionLostError(f"worker {self.id} is unreachable")
        return super()._recv_msg(data)


@pytest.mark.parametrize("secret", ["self_mask", "dropped_key"])
def test_a_shifted_unmask_share_fails_the_round_not_the_model(hook, monkeypatch, secret):
    """The first client to answer ``unmask`` sends well-formed shares, one of them shifted by (p + 1) / 2:
    with t = 2 the coordinator reconstructs from the first two answers (points 1 and 2, Lagrange weight 2 for
    point 1), so the secret comes out one more than it is, another valid 32-byte value: a survivor's self-mask
    seed, or the key of a client dropped at ``masked_input``. The masks removed are then wrong and the sum is
    garbage that decodes without a trace. Must hold: the round fails (SecureAggregationError), never a wrong
    sum: the decoded weight sum is checked against the survivors' weights, and a reconstructed key against
    the public key its client advertised."""
    workers, plain = _clients(hook, f"rt_fl2_shift_{secret}", [1.5, -2.0, 3.25], worker_cls=_Killable)
    inputs = {w.id: sa.ClientInput(w, [plain[w.id].send(w)], 1.0) for w in workers}
    real, shifted = sa._fetch, []

    def shifting(result):
        got = real(result)
        if isinstance(got, (tuple, list)) and len(got) == 2 and not shifted:  # the first unmask answer
            shares, row = (got[0], 1) if secret == "self_mask" else (got[1], 0)
            y = sc.from_tensor(shares[row:row + 1])[0]
            shares[row] = sc.to_tensor([(y + (sc.PRIME + 1) // 2) % sc.PRIME])[0]
            shifted.append(row)
        return got

    def before(name):
        if name == "masked_input" and secret == "dropped_key":
            workers[2].dead = True

    monkeypatch.setattr(sa, "_fetch", shifting)
    caught = "survivors' weights" if secret == "self_mask" else "its public key"
    with pytest.raises(sa.SecureAggregationError, match=caught):
        sa.secure_aggregate(inputs, tag=int(new_id()), threshold=2, before_stage=before)
    assert shifted  # (premise: an answer was shifted)
    assert all(not w.__dict__.get("_secagg_rounds") for w in workers if not w.dead)
    _still_aggregates(hook, f"rt_fl2_shift_{secret}_after")


class _LoudDenial(sy.VirtualWorker):
    """Answers the coordinator's masked-input request with a RequestDeniedError of 2 MB of text (as if its
    owner had denied the release; the coordinator cannot tell)."""

    def _recv_msg(self, data):
        from veil.messaging.serde import deserialize, serialize

        try:
            msg = deserialize(bytes(data), self._decode_ctx)[0]
        except Exception:  # noqa: BLE001
            msg = None
        if isinstance(msg, m.CommandMessage) and msg.op == "veil.secagg.masked_input":
            return serialize(m.ErrorReply("RequestDeniedError", "D" * 2_000_000), sender=self.id)
        return super()._recv_msg(data)


def test_a_clients_review_refusal_text_is_cut(hook):
    """A client answers ``masked_input`` with a RequestDeniedError carrying 2 MB of text. Refusing the round is
    the documented outcome (an owner's denial stops it), but ``secure_aggregate`` builds the exception it
    raises out of ``fl.train`` from ``"; ".join(str(e) for e in review)``: every client's full text, 2 MB
    each (the scientist's traceback, logs and memory), where every other path keeps at most 1 KiB of a
    client's error (``pooled.error_text``; README: "the error text kept per client ... is cut to 1 KiB").
    Must hold: the refusal names the client's error in at most a few KiB."""
    import warnings

    from veil import federated as fl
    from veil.exceptions import RequestDeniedError

    from fl_helpers import make_model, make_parts, uid

    parts = make_parts(3)
    workers = [_LoudDenial(hook, id=uid("loud")), sy.VirtualWorker(hook, id=uid("ok")),
               sy.VirtualWorker(hook, id=uid("ok"))]
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RequestDeniedError) as refused:
            fl.train(make_model(), fed, rounds=1, lr=0.05, batch_size=8, secure_aggregation=True, progress=False)
    assert all(not w.__dict__.get("_secagg_rounds") for w in workers)  # (the round was discarded everywhere)
    assert sum(len(str(w.message)) for w in caught) <= 8192
    assert len(str(refused.value)) <= 8192, f"{len(str(refused.value))} characters of a client's error text"


# ================================================================== a peer's deposit


@pytest.mark.parametrize("rows", [2, 20_000])
def test_a_peer_deposit_holds_exactly_one_share_per_secret(hook, rows):
    """A peer of the round ("mallory", authenticated by its peer token, depositing under its own name as it
    may) sends its deposit with ``rows`` rows per share instead of one. ``_deposit`` checks only the column
    count and byte range, converts every row to a Python int (20,000 rows: 1.3 M ints; a 256 MiB frame,
    about 240,000 rows a share, costs the worker on the order of a GB while it validates) and keeps them in
    the round state, charged to no quota. With 2 rows the client's ``unmask`` concatenates them among the
    survivors' rows, every row after mallory's shifts, and the coordinator reconstructs wrong secrets:
    ``sc.reconstruct`` raises OverflowError out of ``secure_aggregate`` and ``fl.train`` (checked in
    process), or the sum is silently wrong. Must hold: the deposit is refused, nothing is held for mallory."""
    from veil.workers.websocket_server import WebsocketServerWorker

    tokens = sy.TokenTable()
    tokens.add("rt-fl2-coordinator-tok", "coord", "scientist")
    tokens.add("rt-fl2-peer-mallory", "mallory", "peer")
    srv = WebsocketServerWorker(hook, id=f"rt_fl2_deposit_{rows}", port=0, tokens=tokens)
    coord, mallory = open_session(srv, "rt-fl2-coordinator-tok"), open_session(srv, "rt-fl2-peer-mallory")
    tag = 9_400_000 + rows
    assert type(_fn(srv, coord, "advertise", tag, 3, 2)) is m.OkReply
    shares = torch.randint(0, 256, (rows, sc.SHARE_BYTES), dtype=torch.int64)
    reply = _fn(srv, mallory, "deposit", tag, "coord", "mallory", shares, shares.clone(),
                torch.arange(32, dtype=torch.int64))
    held = srv.__dict__["_secagg_rounds"][("coord", tag)].held
    kept = tuple(held["mallory"][0].shape) if "mallory" in held else None
    honest = _fn(srv, mallory, "deposit", tag, "coord", "mallory", shares[:1], shares[:1],
                 torch.arange(32, dtype=torch.int64))  # (premise: a one-row deposit is what is taken)
    assert type(_fn(srv, coord, "discard", tag)) is m.OkReply
    assert type(reply) is m.ErrorReply and kept is None, f"held a {kept} share for mallory"
    assert type(honest) is m.OkReply, honest
