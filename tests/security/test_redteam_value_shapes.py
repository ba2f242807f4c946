"""Red team: result shapes that follow protected values under review-before-release.

Every command's reply describes its result (its shape), and the scientist gets it without the owner's review.
On data under review (not released) a scientist asked for a result sized by a value and read the value off the
descriptor in one command: ``torch.zeros(v)`` for ``v = (x[1, 0] * 10).long()`` had 40 elements (x[1, 0] = 4.0),
``masked_select(arange(100), arange(100) < v)`` 40, ``x[x > 0]`` as many as positive values, ``unique(x)`` as
many as distinct ones, ``bincount`` and ``repeat_interleave`` their values' sum or maximum. The oblivious guard
refused such ops for secret inputs only; the DP plan check only in DP plans.

Fixed (veil/workers/value_shapes.py, run by veil/workers/handlers.py for torch ops on inputs with provenance):
value-shaped ATen ops, indexing by a reviewed mask and a reviewed value turned into a Python value (a size, a
bound, ``.item()``) are refused before they run, in one line, whatever the values; the worker keeps serving.
Each refusal test below failed on the code before (checked by running the file with value_shapes.guard replaced
by one returning None: the 6 refusal tests failed, the 2 guards passed).
Held (guards): shapes that follow only the shapes of owner data (arithmetic, reductions, views, a public mask)
are the same as plain torch's, and the results still wait for the owner's review.

Decision beside test_redteam_plans_fourth.py (it left a plan's refused-or-not outcome following a value-sized
intermediate because "the result's shape already tells that size"): that premise no longer holds, so plans
(veil.plan.run / fit, run on copies of the owner's tensors) are followed too: a value-sized op on data under
review is refused whatever the values, in a plan as in a command. Open data is not guarded (its results may be
fetched anyway); DP-only data answers only DP releases already (owner_guard.check_dp_only, plan_constants).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from veil.exceptions import PermissionDeniedError, ReviewPendingError
from veil.plans import func2plan, training_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import SECRET, review_owner, shows_number  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def reviewed(hook):
    """A pointer to :data:`SECRET` under review on an in-process owner, and ``v``: 10 * SECRET[1, 0] as a long."""
    owner = review_owner(hook, "value-shapes")
    x = owner.search("#d")[0]
    return x, (x[1, 0] * 10).long()


def _refused(make) -> str:
    with pytest.raises(PermissionDeniedError) as info:
        make()
    text = str(info.value)
    assert "\n" not in text and not shows_number(text, "40") and "review" in text, text
    return text


def _still_serves(x) -> None:
    s = x.sum(0)
    assert tuple(s.shape) == (3,)
    with pytest.raises(ReviewPendingError):
        s.get()


def test_a_size_taken_from_a_reviewed_value_is_refused(reviewed):
    x, v = reviewed
    assert tuple(torch.zeros(int(SECRET[1, 0] * 10)).shape) == (40,)  # what the descriptor told
    _refused(lambda: torch.zeros(v))
    _refused(lambda: torch.ones(v, 2))
    k = (x[0, 0] * 2).long()  # 3
    _refused(lambda: torch.topk(x.view(-1), k))
    _refused(lambda: x.view(-1).narrow(0, 0, k))
    _still_serves(x)


def test_a_mask_from_a_reviewed_value_sizes_no_selection(reviewed):
    x, v = reviewed
    _refused(lambda: torch.masked_select(torch.arange(100), torch.arange(100) < v))
    _refused(lambda: x[x > 0])
    _refused(lambda: torch.masked_select(x, x > 0))
    _still_serves(x)


@pytest.mark.parametrize("op", ["unique", "repeat_interleave"])
def test_value_shaped_ops_on_reviewed_values_are_refused(reviewed, op):
    x, v = reviewed
    counts = (x.abs() * 4).long().view(-1)
    calls = {"unique": lambda: torch.unique(x),
             "repeat_interleave": lambda: torch.repeat_interleave(counts)}
    _refused(calls[op])
    _still_serves(x)


def test_shapes_that_follow_only_the_owners_shapes_are_served(reviewed):
    x, v = reviewed
    plain = SECRET.clone()
    mask = torch.tensor([[True, False, True], [False, True, True]])
    pairs = [(x * 2 + 1, plain * 2 + 1), (x.sum(0), plain.sum(0)), (x.view(-1), plain.view(-1)),
             (x.max(1)[0], plain.max(1)[0]), (x @ torch.ones(3, 4), plain @ torch.ones(3, 4)),
             (torch.nn.functional.relu(x), torch.relu(plain)), (x.sort(1)[1], plain.sort(1)[1]),
             (x[mask.send(x.location)], plain[mask]), (torch.zeros_like(x), torch.zeros_like(plain))]
    for got, want in pairs:
        assert tuple(got.shape) == tuple(want.shape)
        with pytest.raises(ReviewPendingError):
            got.get()


def test_a_plan_sizes_no_result_by_reviewed_values(hook):
    """A plan (a worker function, run on copies of the owner's tensors) is followed too: its value-sized result
    (4 positive values of SECRET) was a descriptor of shape (4,)."""
    owner = review_owner(hook, "value-shapes-plan")
    x = owner.search("#d")[0]

    @func2plan(args_shape=[(2, 3)])
    def positives(d):
        return torch.masked_select(d, d > 0)

    @func2plan(args_shape=[(2, 3)])
    def masked(d):
        return d[d > 1]

    for plan in (positives, masked):
        _refused(lambda: plan.send(owner)(x))
    _still_serves(x)


def test_a_training_plan_on_reviewed_data_runs_as_plain_torch(hook):
    """fit on data under review: the same SGD steps as plain torch; the losses wait for review."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    want = copy.deepcopy(model)
    target = torch.randn(2, 2)
    opt = torch.optim.SGD(want.parameters(), lr=0.1)
    opt.zero_grad()
    nn.functional.mse_loss(want(SECRET), target).backward()
    opt.step()
    owner = review_owner(hook, "value-shapes-fit")
    x = owner.search("#d")[0]
    plan = training_plan(copy.deepcopy(model), nn.functional.mse_loss, 0.1, args_shape=[(-1, 3), (-1, 2)])
    ptr = plan.send(owner)
    losses = ptr.fit(x, target.send(owner), batch_size=2, epochs=1, shuffle=False)
    assert tuple(losses.shape) == (1,)
    with pytest.raises(ReviewPendingError):
        losses.get()
    stored = {oid: e.obj for oid, e in owner.monitor.owner_entries()}  # (the owner reads the trained state)
    got = [stored[p.id_at_location] for p in ptr.state]
    assert len(got) == 4 and all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want.parameters()))


def test_a_network_command_sized_by_a_reviewed_value_is_refused_in_one_line(hook):
    """Over a worker's wire (raw frames, as a hostile scientist): the refusal is one line, audited, nothing is
    stored under the result's id, and the worker serves the next command."""
    from veil.messaging import messages as m
    from veil.messaging.allowlist import ALLOWLIST

    import plan_sessions
    from server_sessions import computed, run_command

    srv, s, xid = plan_sessions.setup(hook, "value-shapes-net", token="rt-value-shapes", policy="review")
    name = ALLOWLIST.by_func
    flat = computed(srv, s, name(torch.Tensor.view).name, m.ObjectRef(xid), -1)
    first = computed(srv, s, name(torch.Tensor.__getitem__).name, flat, 5)  # 3.5: a size of 35
    size = computed(srv, s, name(torch.Tensor.long).name, computed(srv, s, name(torch.mul).name, first, 10.0))
    assert tuple(torch.zeros(int(plan_sessions.SECRET.view(-1)[5] * 10)).shape) == (35,)  # what it told
    reply, (rid,) = run_command(srv, s, name(torch.zeros).name, size)
    plan_sessions.one_line(reply)
    assert reply.error == "ShapeRefused" and "review" in reply.message
    assert plan_sessions.get(srv, s, rid).__class__ is m.ErrorReply
    plan_sessions.serving(srv, s, xid, expected=plan_sessions.SECRET)


def test_open_data_beside_reviewed_data_keeps_its_value_sized_results(hook):
    """The guard follows only what needs review: an open dataset on the same worker selects as plain torch."""
    owner = review_owner(hook, "value-shapes-open")
    opened = torch.tensor([3.0, -1.0, 2.0, 0.0])
    owner.load(opened.clone(), tags=("#o",), policy="open")
    o = owner.search("#o")[0]
    assert torch.equal(torch.masked_select(o, o > 0).get(), torch.masked_select(opened, opened > 0))
    assert torch.equal(torch.zeros((o[0] * 2).long()).get(), torch.zeros(6))
