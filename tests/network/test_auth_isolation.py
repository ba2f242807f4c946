"""Authentication, per-client isolation, the owner's get rules and the audit trail."""

import pytest
import torch

import veil as sy
from veil.exceptions import ObjectNotFoundError, PermissionDeniedError
from veil.messaging import messages as m
from veil.workers.websocket_admin import AdminObjectsMessage
from veil.workers.websocket_transport import BlockingConnection

from network_helpers import ADMIN, HOSPITAL, OTHER, TOKEN


def test_wrong_or_missing_token_is_refused_before_any_message(owner_server, connect):
    with pytest.raises(PermissionDeniedError, match="refused the access token"):
        connect(owner_server, token="not-the-token")
    with pytest.raises(PermissionDeniedError, match="refused"):
        connect(owner_server, token=TOKEN, extra_tokens=["forged-token-1234"])  # every token must be valid
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus, match="401"):
        BlockingConnection(f"ws://127.0.0.1:{owner_server.port}", {})


def test_quickstart_and_private_dataset(owner_server, connect):
    alice = connect(owner_server)
    x = torch.tensor([1.0, 2.0]).send(alice)
    assert torch.equal((x + x).get(), torch.tensor([2.0, 4.0]))
    data, target = alice.search(["#boston"])
    assert data.shape == (506, 13) and target.shape == (506, 1)
    assert "#housing" in data.tags and "#target" in target.tags
    with pytest.raises(PermissionDeniedError, match="private"):
        data.get()
    with pytest.raises(PermissionDeniedError):
        target.move(alice)
    mean = target.mean().get()  # computing on private data is allowed; results are the requester's
    assert 22 < float(mean) < 23


def test_allow_rule_lets_only_that_user_get(owner_server, connect):
    alice = connect(owner_server, token=TOKEN, extra_tokens=[HOSPITAL])
    (target,) = alice.search(["#boston", "#target"])
    (data,) = alice.search(["#boston", "#data"])
    with pytest.raises(PermissionDeniedError):
        target.get()  # as the default user "scientist"
    assert target.get(user="hospital").shape == (506, 1)
    with pytest.raises(PermissionDeniedError):
        data.get(user="hospital")  # the rule names #target only
    assert len(alice.search(["#boston"])) == 2  # the owner's data is never taken by a get


def test_claimed_user_needs_that_users_token(owner_server, connect):
    alice = connect(owner_server)
    p = torch.tensor([1.0]).private_tensor(allowed_users=("hospital",)).send(alice)
    with pytest.raises(PermissionDeniedError, match="did not authenticate as user 'hospital'"):
        p.get(user="hospital")
    assert torch.equal((p + 1).get(), torch.tensor([2.0]))


def test_clients_cannot_name_or_list_each_others_objects(owner_server, connect, hook):
    a = connect(owner_server)
    b = connect(owner_server, token=OTHER)
    pa = torch.tensor([42.0]).tag("#mine").send(a)
    me = hook.local_worker
    oid = pa.id_at_location
    with pytest.raises(ObjectNotFoundError):
        me.send_msg(m.GetObjectsMessage([oid]), b)
    with pytest.raises(ObjectNotFoundError):
        me.send_msg(m.CommandMessage("torch.add", (m.ObjectRef(oid), 1), {}, [123456789]), b)
    with pytest.raises(ObjectNotFoundError):
        me.send_msg(m.MoveMessage([oid], "bob", [5555]), b)
    me.send_msg(m.DeleteMessage([oid]), b)  # silently ignored: not b's object
    assert sy.search(b, ["#mine"]) == [] and len(sy.search(a, ["#mine"])) == 1
    assert [d.id for d in sy.list_objects(a)] == [oid] and sy.list_objects(b) == []
    assert torch.equal(pa.get(), torch.tensor([42.0]))


def test_sender_field_cannot_impersonate(owner_server, connect, hook):
    from veil.messaging.serde import deserialize, serialize

    a = connect(owner_server)
    b = connect(owner_server, token=OTHER)
    pa = torch.tensor([7.0]).send(a)
    forged = serialize(m.GetObjectsMessage([pa.id_at_location]), sender="session-whatever")
    reply, _, _ = deserialize(b._recv_msg(forged))
    assert type(reply) is m.ErrorReply and reply.error == "ObjectNotFoundError"


def test_disconnect_frees_that_clients_objects(owner_server, connect):
    owner = connect(owner_server, token=ADMIN, id="alice-owner")
    before = len(owner._objects)
    a = connect(owner_server)
    keep = connect(owner_server, token=OTHER)
    ps = [torch.randn(10).send(a) for _ in range(5)]
    q = torch.randn(3).send(keep)
    assert len(owner._objects) == before + 6
    a.close()
    import time

    deadline = time.monotonic() + 5
    while len(owner._objects) != before + 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(owner._objects) == before + 1
    assert q.get().shape == (3,)
    for p in ps:
        p.mark_freed()


def test_admin_view_needs_admin_token(owner_server, connect, hook):
    a = connect(owner_server)
    with pytest.raises(PermissionDeniedError, match="admin token"):
        hook.local_worker.send_msg(AdminObjectsMessage(None), a)
    with pytest.raises(PermissionDeniedError):
        a.load(torch.ones(2), tags=("#fake",))
