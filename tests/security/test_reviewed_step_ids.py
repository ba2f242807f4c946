"""A reviewed step (secure aggregation's masked input on review-policy data) refused for its return ids keeps the
owner's approval: the ids are checked before the approval is used up (``handlers._check_return_ids``), as the
round's value-free checks are (``owner_guard.run_value_free_checks``). Before, a taken or malformed return id
was refused only after the approval had gone, and the scientist's next masked input waited for the owner again."""

from __future__ import annotations

import pytest

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from tests.security.test_redteam_session63 import MASKED, Setup

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def setup(hook):
    return Setup(hook)


def _masked_input(setup: Setup, tag: int, ids) -> object:
    msg = m.CommandMessage(MASKED, (tag, [setup.srv.id, "p1"], [m.ObjectRef(setup.y)], 1.0), {}, ids, False)
    return deserialize(setup.srv.serve_bytes(serialize(msg, sender="client"), setup.s1))[0]


@pytest.mark.parametrize("ids", ["taken", "negative", "not a list", "none", "two"])
def test_a_masked_input_refused_for_its_return_ids_leaves_the_approval(setup, ids):
    setup.approve_one()
    tag = setup.round()
    # (none: the masked value would be dropped unstored; two: it returns one tensor; both found by the red team)
    bad = {"taken": [setup.y], "negative": [-5], "not a list": 7, "none": [], "two": [new_id(), new_id()]}[ids]
    reply = _masked_input(setup, tag, bad)
    assert type(reply) is m.ErrorReply, reply
    assert "pending" not in str(reply).lower() and "review" not in str(reply).lower(), reply
    assert not setup.went_through(tag)
    # the approval still stands: the same update goes once on a fresh round, then the next one waits again
    tag = setup.round()
    assert type(setup.masked_input(tag, 1.0)) is m.OkReply
    assert setup.went_through(tag)
    reply = setup.masked_input(setup.round(), 1.0)
    assert type(reply) is m.ErrorReply and "pending" in str(reply).lower(), reply


def test_a_masked_input_past_the_room_is_refused_before_its_approval_is_used(setup):
    """Under a quota, a masked input whose state would not fit the session's room (its float64 copy, encoding and
    result, from the state's shapes) is refused before the approval is used up, so the same update still goes once
    the room is there; before, the quota refused its result after the approval was spent (and the step had made
    ~24x a bool state's bytes)."""
    setup.approve_one()
    held = setup.srv.monitor.session_bytes(setup.s1.id)
    setup.srv.monitor.max_session_bytes = held + 64  # (y has 7 entries: 24 x 9 bytes do not fit)
    tag = setup.round()
    reply = setup.masked_input(tag, 1.0)
    assert type(reply) is m.ErrorReply and reply.error == "QuotaExceededError", reply
    assert "\n" not in reply.message.strip() and not setup.went_through(tag)
    setup.srv.monitor.max_session_bytes = None
    tag = setup.round()
    assert type(setup.masked_input(tag, 1.0)) is m.OkReply  # the approval stood
    assert setup.went_through(tag)
