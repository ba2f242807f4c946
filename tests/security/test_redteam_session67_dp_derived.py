"""Red team (session 67): DP releases on a tensor *derived* from DP-only data, not the owner's records.

A DP query calibrates its noise to one row (the bounds of one row's clipped value, a histogram's columns); that
is one record's influence only when the queried rows are the owner's records. Under ``dp-only`` a scientist cannot
derive anything (every op but a DP release is refused), but values derived under ``review`` are kept and get the
dp-only mark when the owner tightens the dataset to dp-only (README: "values computed under review stay held once
the dataset is tightened to dp-only"; a command across the tightening is marked too). Those marked values answered
the DP releases as the owner's data does.

Holes found (each test below failed on the code before its fix, checked by running this file against the commit
before it):

* ``veil.dp.query`` on ``y = (x[0:1, 0:1] > c).float().expand(N, 1)`` (or ``repeat``, ``x[[0] * N]``, ``cat``,
  broadcasting against zeros, a matmul with ones), derived under review and marked at the tightening: one record
  moved all N rows, the Laplace noise was for one. N = 4000, epsilon 0.01 per query (scale 100): 20 queries over
  both values of record 0's bit separated perfectly at N / 2 (a query's answer gives the bit with probability
  e^0.01 / (1 + e^0.01) = 0.5025 were it 0.01-DP for record 0); binary search over c reads the value.
* ``veil.dp.sanitized_gradient`` took such a value as plan state: owner data as state was refused
  (``owner_guard.DP_DATA_ARGS``, only the stored entries counted as owner data), a derived dp-only value was not.
  Its free dry run on a zero record read the state and quoted it: a plan indexing by ``state[0, 0] * 1e6``
  answered ``index 734000 is out of bounds``, record 0's value, uncharged, in one request.

Fixed in ``owner_guard.check_dp_data_args``: a DP release reads DP-only data only as the owner's stored data
itself (an entry the owner loaded), as its data argument; a value carrying the dp-only mark that the owner did
not load (derived from the data, a moved copy) is refused in every argument, before any charge, in one value-free
line. DP-SGD names its dataset (the owner's stored pair), so it has no derived input besides its arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.plan import Plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, quota_worker, request  # noqa: E402
from test_redteam_dp_release import IndexesByState  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

TOKEN = "redteam-s67-dp-derived-token"
N, EPS = 4000, 0.01
OP = {f: ALLOWLIST.by_func(f).name for f in (torch.Tensor.__getitem__, torch.gt, torch.Tensor.float,
                                             torch.Tensor.expand, torch.Tensor.repeat, torch.cat, torch.add,
                                             torch.matmul, torch.sum)}


class Owner:
    """A network worker: dataset ``#s`` (``[N, 3]``, record 0's first value set by the test) under ``review``,
    a DP dataset ``#c`` for training, and one scientist session with a budget."""

    def __init__(self, hook, name: str, first: float, n: int = N) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.rand(n, 3, generator=g)
        self.x[0, 0] = first
        self.srv = quota_worker(hook, name, TOKEN, None)
        self.srv.load(self.x, tags=("#s", "#data"), private=True, policy="review")
        self.srv.load(torch.rand(40, 3, generator=g), tags=("#c", "#data"), private=True)
        self.srv.load(torch.rand(40, 1, generator=g), tags=("#c", "#target"), private=True)
        self.dp = self.srv.enable_dp("c", max_grad_norm=1.0, noise_multiplier=1.0, budgets={"sci": (10.0, 1e-3)})
        self.s = open_session(self.srv, TOKEN)
        self.data = self.ref(["#s", "#data"])

    def ref(self, tags: list) -> m.ObjectRef:
        return m.ObjectRef(request(self.srv, self.s, m.SearchMessage(tags)).descriptors[0].id)

    def cmd(self, op: str, *args, n: int = 1):
        rids = [new_id() for _ in range(n)]
        return request(self.srv, self.s, m.CommandMessage(op, args, {}, rids)), rids

    def derive(self, op: str, *args) -> m.ObjectRef:
        reply, (rid,) = self.cmd(op, *args)
        assert type(reply) is m.OkReply, (op, reply)  # (computing under review is free; releases wait)
        return m.ObjectRef(rid)

    def query(self, x: m.ObjectRef, name: str = "sum", eps: float = EPS, lo=0.0, hi=1.0):
        return self.cmd("veil.dp.query", x, name, eps, 0.0, "laplace", lo, hi, None, f"rq-{new_id()}", n=2)

    def fetch(self, rids):
        reply = request(self.srv, self.s, m.GetObjectsMessage(rids))
        assert type(reply) is m.ObjectsReply, reply
        return reply.objects

    def spent(self) -> float:
        return self.dp.ledger.spent("sci")[0]

    def still_serves(self) -> None:
        """A DP count of the owner's own DP-only data is still answered and charged once."""
        before = self.spent()
        reply, rids = self.query(self.ref(["#c", "#data"]), "count")
        assert type(reply) is m.OkReply, reply
        value, cost = self.fetch(rids)
        assert value.numel() == 1 and cost[0].item() == EPS
        assert self.spent() == pytest.approx(before + EPS)


def _bit(o: Owner) -> m.ObjectRef:
    """``(x[0:1, 0:1] > 0.5).float()``: record 0's bit, one row (computed under review)."""
    head = o.derive(OP[torch.Tensor.__getitem__], o.data, (slice(0, 1), slice(0, 1)))
    return o.derive(OP[torch.Tensor.float], o.derive(OP[torch.gt], head, 0.5))


DERIVATIONS = {
    "expand": lambda o, b: o.derive(OP[torch.Tensor.expand], b, N, 1),
    "repeat": lambda o, b: o.derive(OP[torch.Tensor.repeat], b, N, 1),
    "index": lambda o, b: o.derive(OP[torch.Tensor.__getitem__], b, ([0] * N, slice(None))),
    "cat": lambda o, b: o.derive(OP[torch.cat], [b] * N),
    "broadcast": lambda o, b: o.derive(OP[torch.add], b, torch.zeros(N, 1)),
    "matmul": lambda o, b: o.derive(OP[torch.matmul], torch.ones(N, 1), b),
}


@pytest.mark.parametrize("how", sorted(DERIVATIONS))
def test_a_dp_query_on_record_zero_copied_to_every_row_tells_nothing(hook, how):
    """Attack: under review the scientist derives ``y`` with record 0's bit (``x[0, 0] > 0.5``) in each of N rows;
    the owner tightens the dataset to dp-only (y gets the mark); the scientist asks DP sums of y at epsilon 0.01,
    bounds (0, 1), and decodes ``answer > N / 2``. 20 queries, 10 with the bit 1 and 10 with it 0.

    Must hold: no query decodes the bit better than its charged epsilon allows (with 20 queries at 0.01, ten or
    more right guesses are expected by chance; all 20 right is the leak). Today: every query is refused before its
    charge, in the same one line, naming no value; the owner's own data is still answered."""
    outcomes, right, spent = [], 0, []
    for bit in (1, 0):
        o = Owner(hook, f"rt-s67dpd-{how}-{bit}", first=0.9 if bit else 0.1)
        y = DERIVATIONS[how](o, _bit(o))
        o.srv.set_policy("#s", "dp-only")
        for _ in range(10):
            reply, rids = o.query(y)
            if type(reply) is m.OkReply:
                value, cost = o.fetch(rids)
                assert cost[0].item() <= 0.1
                right += int((float(value) > N / 2) == bool(bit))
                outcomes.append(("answered", float(value)))
            else:
                outcomes.append((type(reply).__name__, reply.error, reply.message.replace(o.srv.id, "W")))
        spent.append(o.spent())
        o.still_serves()
    assert right < 20, f"{how}: the answers decoded record 0's bit {right}/20 times at epsilon {EPS} per query"
    assert spent == [0.0, 0.0], spent  # (refused before the charge)
    assert len(set(outcomes)) == 1, outcomes
    kind, error, text = outcomes[0]
    assert kind == "ErrorReply" and error == "PermissionDeniedError", outcomes[0]
    assert "\n" not in text and "derived" in text and "0.9" not in text and "4000" not in text, text


def test_rows_mixed_or_reordered_are_no_records_either(hook):
    """Attack: the same tightening with ``x.sum(0, keepdim=True)`` (every record in one row) and ``x[[1, 0]]``
    (records reordered) queried as "records". Must hold: refused before any charge, like the copies."""
    o = Owner(hook, "rt-s67dpd-mixed", first=0.3, n=50)
    summed = o.derive(OP[torch.sum], o.data, 0, True)
    swapped = o.derive(OP[torch.Tensor.__getitem__], o.data, ([1, 0], slice(None)))
    o.srv.set_policy("#s", "dp-only")
    for y, hi in ((summed, 50.0), (swapped, 1.0)):
        for name in ("sum", "mean", "count"):
            reply, _ = o.query(y, name, hi=hi)
            assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError", (name, reply)
    assert o.spent() == 0.0
    o.still_serves()



def test_a_derived_dp_only_value_is_no_plan_state_of_a_dp_gradient(hook):
    """Attack: ``x[0:2]`` derived under review, marked at the tightening, sent as the plan state (a buffer) of a
    DP-SGD step whose plan indexes a record by ``state[0, 0] * 1e6``: the free dry run on a zero record read it.
    Must hold: refused before the dry run and the charge, in one line naming no value; DP-SGD with the
    scientist's own state still runs."""
    o = Owner(hook, "rt-s67dpd-state", first=0.734, n=40)
    head = o.derive(OP[torch.Tensor.__getitem__], o.data, (slice(0, 2), slice(None)))
    o.srv.set_policy("#s", "dp-only")
    spec = Plan(IndexesByState()).build(torch.zeros(2, 3)).spec
    pid = new_id()
    assert type(request(o.srv, o.s, m.ObjectMessage([m.StoredObject(pid, spec)]))) is m.OkReply
    for state in (head, [head]):
        params = [torch.zeros(1), state] if isinstance(state, m.ObjectRef) else [torch.zeros(1), *state]
        reply, _ = o.cmd("veil.dp.sanitized_gradient", m.ObjectRef(pid), "c", params, [True, False], "mse", 0.5,
                         None, f"rq-{new_id()}")
        assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError", reply
        assert "734" not in reply.message and "\n" not in reply.message, reply.message
    assert o.spent() == 0.0
    # the same plan on the scientist's own zero state: in bounds, trained and charged
    reply, rids = o.cmd("veil.dp.sanitized_gradient", m.ObjectRef(pid), "c", [torch.zeros(1), torch.zeros(2, 3)],
                        [True, False], "mse", 0.5, None, f"rq-{new_id()}")
    assert type(reply) is m.OkReply, reply
    assert o.spent() > 0.0
    o.still_serves()


def test_a_dp_query_on_a_derived_value_under_review_waits_for_the_owner(hook):
    """Held: without the tightening, a DP query of a value derived under review is computed but its answer is a
    derived value like any other: held for the owner's approval (who sees the op graph, the expand included)."""
    o = Owner(hook, "rt-s67dpd-review", first=0.9, n=100)
    y = o.derive(OP[torch.Tensor.expand], _bit(o), 100, 1)
    reply, rids = o.query(y)
    assert type(reply) is m.OkReply, reply
    got = request(o.srv, o.s, m.GetObjectsMessage(rids))
    assert type(got) is m.ErrorReply and "review" in got.message, got
    o.still_serves()
