"""Red team, fresh eyes: serving actions sent as raw ServingMessages, and what search/list/users answer.

The attackers: a serving client (or a stranger holding a client token) probing which models a worker
serves, a model owner or client sending actions with the wrong number of arguments, a scientist sending the
owner's user management message.

Found here, and fixed (each test asserts the safe behaviour; each failed on the code before):
- a client told a model it may not query ("may not query model") from a name the worker does not serve
  ("serves no model named"): a client token listed the names of every other model on the worker by guessing.
  Both now get one answer;
- a serving action with too few arguments failed as a bare ``IndexError: list index out of range`` or
  ``ValueError: not enough values to unpack``, and one with extra arguments ran, the extras ignored: each
  action now takes a fixed number of arguments and says so in one line (before the service is looked up,
  so the count check tells nothing about which services exist);
- a claim whose batch the owner's session could not store (an id in use or invalid, its quota) had already
  moved the requests from the queue to "claimed": they sat there with nothing computing them. The batch is
  now stored first; a failed claim leaves the queue as it was;
- a respond with fewer row counts than request ids (``zip`` cut the rest) answered the first request with
  every row and left the others claimed for ever; negative, float, bool or string counts failed as bare
  torch/TypeErrors. Respond now takes one non-negative integer count per request id, refused before anything
  is released;
- a session that stored a plan (or another object without a shape) could never list its objects again:
  ListObjectsMessage failed with a bare ``AttributeError: 'PlanSpec' object has no attribute 'shape'``. A
  listing, as a search, now describes tensors only;
- every ``open`` of a new name kept that service's state for ever (closing, or the owner's session ending,
  only marked it closed): a scientist opening names in a loop grew the worker's memory without bound. A user
  now holds at most ``MAX_SERVICES_PER_USER`` services; its closed ones with nothing left to fetch make room;
- a service opened with a malformed ``input_shape`` (an int, strings, negative or float sizes) was accepted,
  and every client's submit then failed as a bare TypeError: open now refuses it in one line.

Held (regression guards): users management with any token but the admin's is refused; a search over too
many distinct terms is refused before it runs (repeated terms count once).
"""

from __future__ import annotations

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, VeilError
from veil.governance.users_wire import AdminUsersMessage
from veil.ids import new_id
from veil.messaging import messages as m
from veil.serving import protocol
from veil.serving.errors import ServingError


def _workers(hook, *names):
    tag = new_id() % 10**9
    return [sy.VirtualWorker(hook, id=f"fs_{name}_{tag}") for name in names]


def _served(hook):
    party, owner, client, stranger = _workers(hook, "party", "owner", "client", "stranger")
    protocol.call(owner, party, "open", "svc", [client.id], {"input_shape": [1, 3], "max_rows": 4})
    return party, owner, client, stranger


def _error(call):
    with pytest.raises(VeilError) as caught:
        call()
    return caught.value


def test_a_client_cannot_tell_an_unknown_model_from_one_it_may_not_query(hook):
    party, owner, client, stranger = _served(hook)
    protocol.call(owner, party, "open", "secret-model", ["someone-else"], {"input_shape": [1, 3]})
    for action, args in (("info", ()), ("submit", (new_id(), torch.zeros(1, 3, dtype=torch.int64))),
                         ("fetch", (new_id(),))):
        served = _error(lambda: protocol.call(client, party, action, "secret-model", *args))
        unknown = _error(lambda: protocol.call(client, party, action, "no-such-model", *args))
        assert isinstance(served, ServingError) and isinstance(unknown, ServingError)
        assert str(served).replace("secret-model", "X") == str(unknown).replace("no-such-model", "X")
    # the client's own model still answers
    assert protocol.call(client, party, "info", "svc")[0]["max_rows"] == 4


@pytest.mark.parametrize("action,args", [
    ("open", ()), ("open", ([],)), ("claim", ()), ("claim", ([1],)), ("respond", ([1], [1])), ("fail", ([1],)),
    ("requeue", ()), ("submit", ()), ("submit", (1,)), ("fetch", ()),
    ("claim", ([1], 5, "extra")), ("unfetched", ("extra",)), ("info", ("extra",)), ("close", ("why", "extra")),
])
def test_a_serving_action_with_the_wrong_arguments_gets_one_clear_line(hook, action, args):
    party, owner, client, _ = _served(hook)
    sender = client if action in protocol.CLIENT_ACTIONS else owner
    error = _error(lambda: protocol.call(sender, party, action, "svc", *args))
    assert isinstance(error, ServingError), f"{type(error).__name__}: {error}"
    assert "argument" in str(error) and "\n" not in str(error)
    # the worker still serves: a well-formed request goes through
    rid = new_id()
    protocol.call(client, party, "submit", "svc", rid, torch.ones(1, 3, dtype=torch.int64))
    assert [r[0] for r in protocol.call(owner, party, "pending", "svc")] == [rid]


def test_the_argument_count_is_checked_before_the_service_is_looked_up(hook):
    party, owner, client, _ = _served(hook)
    served = _error(lambda: protocol.call(client, party, "submit", "svc"))
    unknown = _error(lambda: protocol.call(client, party, "submit", "no-such-model"))
    assert str(served) == str(unknown)


def test_well_formed_waits_still_count_as_optional_arguments(hook):
    party, owner, client, _ = _served(hook)
    rid = new_id()
    protocol.call(client, party, "submit", "svc", rid, torch.full((1, 3), 5, dtype=torch.int64))
    assert [r[0] for r in protocol.call(owner, party, "pending", "svc", 0, [])] == [rid]
    assert protocol.call(client, party, "fetch", "svc", rid, 0) == []
    protocol.call(owner, party, "claim", "svc", [rid], 4242)
    owner.send_msg(m.CommandMessage("Tensor.mul", (m.ObjectRef(4242), 3), {}, [4243]), party)
    protocol.call(owner, party, "respond", "svc", [rid], [1], m.ObjectRef(4243))
    (answer,) = protocol.call(client, party, "fetch", "svc", rid)
    assert torch.equal(answer, torch.full((1, 3), 15, dtype=torch.int64))


def test_users_management_is_refused_to_anyone_but_the_admin(hook):
    worker, scientist = _workers(hook, "users_host", "users_sci")
    for action in ("list", "revoke", "restore", "bogus"):
        with pytest.raises(PermissionDeniedError, match="admin token"):
            scientist.send_msg(AdminUsersMessage(action, "alice"), worker)


def test_a_search_over_too_many_terms_is_refused_before_it_runs(hook):
    from veil.compat.search_terms import MAX_TERMS

    worker, scientist = _workers(hook, "terms_host", "terms_sci")
    with pytest.raises(VeilError, match="at most"):
        scientist.send_msg(m.SearchMessage([f"#t{i}" for i in range(MAX_TERMS + 1)]), worker)
    repeated = scientist.send_msg(m.SearchMessage(["#same"] * (10 * MAX_TERMS)), worker).descriptors
    assert repeated == []


def test_every_serving_action_has_an_argument_count():
    assert set(protocol.ARGUMENTS) == set(protocol.ACTIONS)


def test_a_claim_that_cannot_store_its_batch_leaves_the_requests_queued(hook):
    party, owner, client, _ = _served(hook)
    rid = new_id()
    protocol.call(client, party, "submit", "svc", rid, torch.ones(2, 3, dtype=torch.int64))
    taken = torch.zeros(1).send(party).id_at_location  # an id the owner's session already holds
    for bad_id in (0, taken, "x"):
        with pytest.raises(VeilError):
            protocol.call(owner, party, "claim", "svc", [rid], bad_id)
        assert [r[:2] for r in protocol.call(owner, party, "pending", "svc")] == [[rid, 2]]
    assert protocol.call(owner, party, "claim", "svc", [rid], new_id()) == [2]


@pytest.mark.parametrize("sizes", [[2], [1, 1, 0], [3, -1], "2", [1.0, 1.0], [True, True]])
def test_a_respond_whose_sizes_do_not_name_each_request_is_refused_and_changes_nothing(hook, sizes):
    party, owner, client, _ = _served(hook)
    first, second = new_id(), new_id()
    for rid in (first, second):
        protocol.call(client, party, "submit", "svc", rid, torch.full((1, 3), 7, dtype=torch.int64))
    protocol.call(owner, party, "claim", "svc", [first, second], 777)
    owner.send_msg(m.CommandMessage("Tensor.add", (m.ObjectRef(777), 1), {}, [778]), party)
    error = _error(lambda: protocol.call(owner, party, "respond", "svc", [first, second], sizes, m.ObjectRef(778)))
    assert isinstance(error, ServingError) and "\n" not in str(error)
    assert protocol.call(client, party, "fetch", "svc", first) == []  # nothing half-answered
    protocol.call(owner, party, "respond", "svc", [first, second], [1, 1], m.ObjectRef(778))
    for rid in (first, second):
        (answer,) = protocol.call(client, party, "fetch", "svc", rid)
        assert torch.equal(answer, torch.full((1, 3), 8, dtype=torch.int64))


def test_a_stored_plan_does_not_break_the_listing_of_the_sessions_objects(hook):
    from veil.plans.ops import PlanOp, PlanSpec, SlotRef

    worker, scientist = _workers(hook, "list_host", "list_sci")
    plan = PlanSpec("ident", 1, 0, 2, [PlanOp("torch.mul", (SlotRef(0), 1.0), {}, [1], False)], SlotRef(1))
    plan_id, tensor_id = new_id(), new_id()
    scientist.send_msg(m.ObjectMessage([m.StoredObject(plan_id, plan),
                                        m.StoredObject(tensor_id, torch.ones(2, 3))]), worker)
    listed = {d.id: tuple(d.shape) for d in scientist.send_msg(m.ListObjectsMessage(), worker).descriptors}
    assert listed.get(tensor_id) == (2, 3) and plan_id not in listed


def test_a_user_opening_services_in_a_loop_is_bounded_and_closed_ones_make_room(hook):
    party, owner, client, other = _served(hook)
    info = {"input_shape": [1, 3]}
    names = [f"loop-{i}" for i in range(protocol.MAX_SERVICES_PER_USER - 1)]  # "svc" is the first
    for name in names:
        protocol.call(owner, party, "open", name, [client.id], info)
    error = _error(lambda: protocol.call(owner, party, "open", "one-too-many", [client.id], info))
    assert isinstance(error, ServingError) and "already has" in str(error)
    assert len(protocol._SERVICES[party]) == protocol.MAX_SERVICES_PER_USER
    protocol.call(other, party, "open", "another-users", [client.id], info)  # other users are not held back
    protocol.call(owner, party, "open", "svc", [client.id], info)  # reopening one of its own is fine
    protocol.call(owner, party, "close", names[0], "done")  # a closed one with nothing to fetch makes room
    protocol.call(owner, party, "open", "one-more", [client.id], info)
    assert protocol.call(client, party, "info", "one-more")[0]["input_shape"] == [1, 3]


@pytest.mark.parametrize("shape", [5, "1,3", [1, "3"], [1, -3], [1.0, 3], {"a": 1}])
def test_a_service_with_a_malformed_input_shape_is_refused_at_open(hook, shape):
    party, owner, client, _ = _served(hook)
    error = _error(lambda: protocol.call(owner, party, "open", "bad-shape", [client.id], {"input_shape": shape}))
    assert isinstance(error, ServingError) and "input_shape" in str(error)
    with pytest.raises(ServingError, match="may not query"):  # nothing was opened
        protocol.call(client, party, "info", "bad-shape")
