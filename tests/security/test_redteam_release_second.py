"""Red team, second pass over today's release-path fixes: canonical floats, enforce_all(consume=False), the
received-object graphs, compat encode's value freedom, and FedAvg's update bound.

Follows ``test_redteam_provenance_second.py``, ``test_redteam_compat_surface.py`` and
``test_redteam_federated_third.py`` (not repeated here). Holes found, each a strict xfail on the code before
its fix (checked by running this file against ``git archive HEAD`` of the commit before):

- an MPC opening (``OpenMessage``: ``beaver_mask(x, y, a, b)`` returns ``x - a``) of an approved float let its
  NaN payloads and zero signs out: the get/move canonicalisation did not cover openings;
- an opening asked the owner's review one input at a time, using each approval up on the way: a second input
  still pending (or a step that then failed) burned the first approval, recorded as released though nothing
  left;
- a moved value's op graph travelled as a capability tag JSON-encoded with ``ensure_ascii``: each emoji of a
  dataset's description took 12 characters, the tag passed the receiver's 64 KiB limit, the receiver refused
  the object and the approval was used up (recorded as released) though nothing arrived;
- a release request matched a recomputed object by its bytes and its computation as the owner reads it, and
  that text leaves values out (a scientist's tensor shows as its shape, a tensor in the command as
  ``tensor[shape]``): recomputing ``d > t`` under the same id with another ``t`` answered with the same
  pending request exactly when the bytes were equal, a new one otherwise; an equality oracle on review data
  (a binary search on ``max(d)``) without any approval. Each graph node now has a key over all its values;
- ``clip_update`` squared a float64 update's entries: finite entries past 1e154 made the norm inf, and its
  ValueError stopped the whole FedAvg round instead of bounding that one client;
- a secure or encrypted round whose clients that finished all state 0 samples (every weight is within
  ``client_weight``'s 0..2^40) divided by the weight sum after the protocol ran: a ZeroDivisionError, not the
  one-line refusal the other degenerate rounds give.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import phe
import pytest
import torch

import veil as sy
from veil.federated import trainer as fl
from veil.federated.he_agg import EncryptedAggregation
from veil.federated.strategies import FedAvg
from veil.federated.strategies.base import ClientUpdate, clip_update
from veil.governance.requests import ReviewQueue
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.party import OpenMessage
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fl_helpers import make_model, make_parts  # noqa: E402
from server_sessions import open_session, request, run_command, send_tensor  # noqa: E402

SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])
SCI = "rt-rs2-sci-token"
CANONICAL_NAN = 0x7FC00000  # float32 bits of float("nan")


class Net:
    """A network worker's request path in process: one scientist session, a review-policy dataset."""

    def __init__(self, hook):
        tokens = sy.TokenTable()
        tokens.add(SCI, "sci", "scientist")
        self.srv = WebsocketServerWorker(hook, id=f"rt-rs2-{time.monotonic_ns()}", port=0, tokens=tokens)
        self.d = self.srv.load(SECRET.clone(), tags=("#d",), policy="review")
        self.sci = open_session(self.srv, SCI)
        self.queue = ReviewQueue(self.srv)

    def cmd(self, op, *args, **kw):
        reply, (rid,) = run_command(self.srv, self.sci, op, *args, **kw)
        assert type(reply) is m.OkReply, reply
        return rid

    def open(self, name, *ids):
        return request(self.srv, self.sci, OpenMessage(name, tuple(m.ObjectRef(i) for i in ids), {}))

    def approve_pending(self):
        for req in self.queue.list("pending"):
            self.queue.approve(req.id)

    def release_rows(self, rid):
        from veil.governance.state import governance

        return [r for r in governance(self.srv).db.audit_entries() if r["action"] == "release" and rid in r["detail"]]


def _payload_nans(w: Net) -> int:
    """``d`` packed into NaN payloads (each entry a quiet NaN holding |record|'s top 22 bits), on the worker."""
    bits = w.cmd("Tensor.view", m.ObjectRef(w.cmd("torch.abs", m.ObjectRef(w.d))), torch.int32)
    packed = w.cmd("torch.add", m.ObjectRef(w.cmd("torch.floor_divide", m.ObjectRef(bits), 1024)), CANONICAL_NAN)
    return w.cmd("torch.mul", m.ObjectRef(w.cmd("Tensor.view", m.ObjectRef(packed), torch.float32)), 1)


# ------------------------------------------------------------------------------------ openings (holes)


def test_an_opening_of_an_approved_float_leaves_with_canonical_nans_and_zeros(hook):
    """Attack: the owner approves ``y`` (the records packed into NaN payloads; the preview flags them, "a release
    clears them"); the scientist does not get it but opens it: ``beaver_mask(y, zeros, zeros, zeros)`` is
    an openable step whose first output is ``y - 0``, sent back as computed. Must hold: every NaN that leaves
    is the canonical one and every zero is positive, as a get would release it; other values as plain torch."""
    w = Net(hook)
    zeros = send_tensor(w.srv, w.sci, torch.zeros(2, 3))

    def opened(x):  # (the first opening files x's request; the owner approves it)
        reply = w.open("beaver_mask", x, zeros, zeros, zeros)
        assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
        w.approve_pending()
        reply = w.open("beaver_mask", x, zeros, zeros, zeros)
        assert type(reply) is m.ObjectsReply, reply
        return reply.objects[0]

    y = _payload_nans(w)
    nans = opened(y)
    assert nans.isnan().all() and (nans.view(torch.int32) == CANONICAL_NAN).all(), nans.view(torch.int32)
    signed = opened(w.cmd("torch.mul", m.ObjectRef(w.d), -0.0))  # (-0 where a record is positive)
    expected = SECRET * -0.0 - torch.zeros(2, 3)  # (plain torch: -0 - 0 is -0)
    assert torch.equal(signed, expected) and not signed.signbit().any(), signed
    stored = next(e.obj for i, e in w.srv.monitor.owner_entries() if i == y)
    assert (stored.view(torch.int32) != CANONICAL_NAN).any()  # (the worker's copy is as computed)


def test_an_opening_with_one_input_still_pending_uses_no_approval(hook):
    """Attack (burn an approval): ``a = d * 2`` is approved, ``b = d * 3`` not yet; the scientist opens
    ``beaver_mask(a, b, 0, 0)``. The review was asked input by input, each approval used up on the way: a's was
    marked released (and audited) before b's pending request refused the opening, so nothing left and the
    owner's record says a did. Must hold: the opening is refused naming b's request, a's approval stands, and
    once b is approved too the opening gives plain torch's values and records both releases once."""
    w = Net(hook)
    a = w.cmd("torch.mul", m.ObjectRef(w.d), 2.0)
    b = w.cmd("torch.mul", m.ObjectRef(w.d), 3.0)
    zeros = send_tensor(w.srv, w.sci, torch.zeros(2, 3))
    reply = request(w.srv, w.sci, m.GetObjectsMessage([a]))
    ra = reply.message.split("release request ")[1].split()[0]
    w.queue.approve(ra)
    reply = w.open("beaver_mask", a, b, zeros, zeros)
    assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
    assert w.queue.get(ra).state == "approved" and not w.release_rows(ra)
    w.approve_pending()
    reply = w.open("beaver_mask", a, b, zeros, zeros)
    assert type(reply) is m.ObjectsReply, reply
    assert torch.equal(reply.objects[0], SECRET * 2) and torch.equal(reply.objects[1], SECRET * 3), reply.objects
    assert w.queue.get(ra).state == "released" and len(w.release_rows(ra)) == 1


def test_an_opening_that_fails_uses_no_approval(hook):
    """Attack/failure: ``a`` approved, opened with a mask of another shape (``a - mask`` cannot broadcast): the
    step fails after the review passed. Must hold: the approval is not used up (a get then releases ``a``)."""
    w = Net(hook)
    a = w.cmd("torch.mul", m.ObjectRef(w.d), 2.0)
    zeros, odd = send_tensor(w.srv, w.sci, torch.zeros(2, 3)), send_tensor(w.srv, w.sci, torch.zeros(5))
    reply = request(w.srv, w.sci, m.GetObjectsMessage([a]))
    ra = reply.message.split("release request ")[1].split()[0]
    w.queue.approve(ra)
    reply = w.open("beaver_mask", a, zeros, odd, zeros)
    assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply
    assert w.queue.get(ra).state == "approved" and not w.release_rows(ra)
    got = request(w.srv, w.sci, m.GetObjectsMessage([a]))
    assert type(got) is m.ObjectsReply and torch.equal(got.objects[0], SECRET * 2), got


def test_an_opening_of_the_scientists_own_values_is_unchanged(hook):
    """Regression guard for the fix: an opening of ring elements and of the scientist's own floats (no owner
    data, no review) returns exactly what plain torch computes, and files no request."""
    w = Net(hook)
    x, y = torch.tensor([1.5, -0.0, 2.0]), torch.randint(-2**62, 2**62, (3,))
    xs, ys = send_tensor(w.srv, w.sci, x), send_tensor(w.srv, w.sci, y)
    zs, zi = send_tensor(w.srv, w.sci, torch.zeros(3)), send_tensor(w.srv, w.sci, torch.ones(3, dtype=torch.int64))
    reply = w.open("beaver_mask", xs, ys, zs, zi)
    assert type(reply) is m.ObjectsReply, reply
    assert torch.equal(reply.objects[0], x - torch.zeros(3)) and torch.equal(reply.objects[1], y - 1)
    assert not w.queue.list()


# --------------------------------------------------------------------- request matching (hole)


@pytest.mark.parametrize("probe", ["stored", "inline"])
def test_a_recomputed_probe_gets_a_new_request_whatever_its_bytes(hook, probe):
    """Attack (equality oracle): under one id X the scientist computes ``d > t`` with ``t`` all 100 (all False)
    and asks for it: request R, pending. Then it frees X, computes ``d > t'`` under X with another threshold
    (its own stored tensor, or a tensor written in the command) and asks again. The owner's text for both is
    ``torch.gt(d1, i1)`` (or ``tensor[2, 3]``): the same computation as read, so R came back exactly when the
    bytes were equal (every record at most t'), a new request otherwise: a binary search on ``max(d)`` with no
    approval. Must hold: the answer does not depend on the bytes (here: a new request for every other ``t'``),
    and the same computation redone (the same ``t'``) still finds its own request."""
    w = Net(hook)
    x = new_id()

    def asked(threshold: float) -> str:
        request(w.srv, w.sci, m.DeleteMessage([x]))
        t = torch.full((2, 3), threshold)
        arg = m.ObjectRef(send_tensor(w.srv, w.sci, t)) if probe == "stored" else t
        reply = request(w.srv, w.sci, m.CommandMessage("torch.gt", (m.ObjectRef(w.d), arg), {}, [x], False))
        assert type(reply) is m.OkReply, reply
        got = request(w.srv, w.sci, m.GetObjectsMessage([x]))
        assert type(got) is m.ErrorReply and got.error == "ReviewPendingError", got
        return got.message.split("release request ")[1].split()[0]

    assert torch.equal(SECRET > 10.0, SECRET > 100.0) and not torch.equal(SECRET > 5.0, SECRET > 100.0)
    answers = []
    for threshold in (10.0, 5.0):  # (plain torch: 10 gives the filed bytes, 5 does not)
        filed = asked(100.0)
        answers.append(asked(threshold) == filed)
    assert answers == [False, False], answers
    assert asked(7.0) == asked(7.0)  # (the same computation redone: the same request)


# ------------------------------------------------------------------------------- moves (hole)


def test_a_value_from_datasets_described_outside_ascii_moves_with_its_graph(hook):
    """Failure an owner meets (and a scientist can steer toward): 40 review datasets whose descriptions are
    emoji (300 each); the scientist sums them and the owner approves moving the sum to another worker. The
    graph tag (64 lines, 300 characters each) was written with ``ensure_ascii``: 108 KB, past the receiver's
    64 KiB limit, so the receiver refused the object ("malformed capability tag 'graph'") after the approval
    was used up. Must hold: the sum arrives (plain torch's value) with the sender's report, whose lines
    keep the descriptions' characters, and the approval is used up once."""
    from veil.exceptions import ReviewPendingError
    from veil.governance.provenance import GRAPH

    u = time.monotonic_ns()
    owner, other = sy.VirtualWorker(hook, id=f"rs2-own-{u}"), sy.VirtualWorker(hook, id=f"rs2-dst-{u}")
    other.load(torch.zeros(1), tags=("#o",), policy="review")  # (a worker under review records what it receives)
    description = "\U0001F637" * 300
    for i in range(40):
        owner.load(torch.tensor([float(i)]), tags=(f"#t{i}",), description=description, policy="review")
    total = owner.search(["#t0"])[0]
    for i in range(1, 40):
        total = total + owner.search([f"#t{i}"])[0]
    with pytest.raises(ReviewPendingError) as pending:
        total.move(other)
    owner.release_requests.approve(pending.value.request_id)
    moved = total.move(other)
    assert owner.release_requests.get(pending.value.request_id).state == "released"
    entry = next(e for i, e in other.monitor.owner_entries() if i == moved.id_at_location)
    report = [line for node in entry.meta[GRAPH].values() for line in node.get("report", [])]
    assert any("\U0001F637" * 20 in line for line in report), report[:3]
    assert torch.equal(moved.get(), torch.tensor([float(sum(range(40)))]))


# ---------------------------------------------------------------------------------- FedAvg bound (hole)


def test_clip_update_bounds_a_float64_update_whose_square_overflows():
    """Attack (a client of a float64 model): its state's entries are finite but 1e200 (check_state passes them);
    ``clip_update`` squared them to inf and raised, which stopped the round for every client (FedAvg.aggregate
    and the streaming aggregator call it outside the client-failure handling). Must hold: the update is
    bounded to ``max_update_norm`` in its own direction, as plain torch computes on a scaled copy."""
    g = [torch.zeros(4, dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    hostile = [torch.tensor([1e200, -1e200, 3e199, 0.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64)]
    bounded = clip_update(hostile, g, 1.0)
    direction = (hostile[0] / 1e200) / (hostile[0] / 1e200).norm()  # (plain torch on the update / 1e200)
    assert torch.allclose(bounded[0], direction, rtol=1e-12, atol=0) and torch.equal(bounded[1], g[1]), bounded
    assert math.isclose(float(torch.cat([b - x for b, x in zip(bounded, g)]).norm()), 1.0, rel_tol=1e-12)


def test_a_fedavg_round_with_one_overflowing_client_still_averages_the_others():
    """The same client in a FedAvg(max_update_norm=1) round with an honest one (weights 1 and 3). Must hold:
    both aggregations (all at once, streaming) give plain torch's bounded weighted average."""
    g = [torch.zeros(3, dtype=torch.float64)]
    honest = [torch.tensor([0.1, 0.2, -0.2], dtype=torch.float64)]  # (norm 0.3: kept as is)
    hostile = [torch.tensor([1e300, 0.0, 0.0], dtype=torch.float64)]
    expected = (torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) * 1 + honest[0] * 3) / 4
    updates = [ClientUpdate("evil", hostile, 1, 0.0), ClientUpdate("good", honest, 3, 0.0)]
    strategy = FedAvg(max_update_norm=1.0)
    assert torch.allclose(strategy.aggregate(updates, g)[0], expected, rtol=1e-12, atol=1e-15)
    streaming = strategy.aggregator(g)
    for u in updates:
        streaming.add(u)
    assert torch.allclose(streaming.result()[0], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_update_is_plain_torchs_norm_bound_on_ordinary_updates(dtype):
    """Regression guard for the rewrite: ordinary updates are bounded exactly as ``g + d * bound / ||d||`` in
    plain torch (and returned untouched under the bound); NaN/inf updates are still refused."""
    gen = torch.Generator().manual_seed(7)
    g = [torch.randn(5, 4, generator=gen, dtype=dtype), torch.arange(3)]
    s = [g[0] + torch.randn(5, 4, generator=gen, dtype=dtype), torch.arange(3) + 5]
    d = (s[0] - g[0]).to(torch.float64)
    expected = (g[0].to(torch.float64) + d * (0.5 / float(d.norm()))).to(dtype)
    out = clip_update(s, g, 0.5)
    assert torch.allclose(out[0], expected, rtol=1e-6 if dtype == torch.float32 else 1e-12) and out[1] is s[1]
    assert clip_update(s, g, 1e9)[0] is s[0]
    with pytest.raises(ValueError):
        clip_update([s[0] * float("nan"), s[1]], g, 0.5)


@pytest.mark.parametrize("aggregation", ["secure", "encrypted"])
def test_a_round_whose_clients_hold_no_samples_is_refused_in_one_line(hook, aggregation):
    """Clients that state 0 rows (a valid FedAvg weight: a DP worker hiding its count states 0) and finish
    training: their weights sum to 0. A secure round ran the protocol and then divided by it (ZeroDivisionError
    from the mean loss; the average itself 0/0), an encrypted one divided before asking anyone. Must hold: the
    round is refused with a one-line RuntimeError saying why, and the model keeps its weights (plain torch)."""
    u = time.monotonic_ns()
    workers = [sy.VirtualWorker(hook, id=f"rs2-fl{i}-{u}") for i in range(3)]
    fed = sy.FederatedDataset([sy.BaseDataset(x[:0], y[:0]).send(w) for (x, y), w in zip(make_parts(3), workers)])
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    if aggregation == "secure":
        options = {"secure_aggregation": True}
    else:
        public, private = phe.generate_paillier_keypair(n_length=1024)
        options = {"encrypted_aggregation": EncryptedAggregation(public_key=public, private_key=private)}
    with warnings.catch_warnings(), pytest.raises(RuntimeError) as refused:
        warnings.simplefilter("ignore")
        fl.train(model, fed, rounds=1, lr=0.05, batch_size=8, progress=False, **options)
    assert "0 samples" in str(refused.value) and "\n" not in str(refused.value), refused.value
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
