"""Capabilities in serving: a client's input and output shares are revealable only to that client."""

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.messaging import messages as m
from veil.serving import protocol
from veil.serving.errors import ServingError


def test_owner_cannot_reveal_client_shares_but_client_gets_its_answer(hook):
    party = sy.VirtualWorker(hook, id="cap_party")
    owner = sy.VirtualWorker(hook, id="cap_owner")  # the model owner's process
    client = sy.VirtualWorker(hook, id="cap_client")  # the client's process
    protocol.call(owner, party, "open", "svc", ["cap_client"], {"input_shape": [1, 3]})
    share = torch.tensor([[11, 22, 33]], dtype=torch.int64)
    protocol.call(client, party, "submit", "svc", 7, share)
    batch_id = 1001
    assert protocol.call(owner, party, "claim", "svc", [7], batch_id) == [1]
    with pytest.raises(PermissionDeniedError, match="designated recipient"):  # the input share
        owner.send_msg(m.GetObjectsMessage([batch_id]), party)
    # the owner computes on it (as its model does); results are still the client's
    owner.send_msg(m.CommandMessage("Tensor.mul", (m.ObjectRef(batch_id), 2), {}, [1002]), party)
    with pytest.raises(PermissionDeniedError, match="designated recipient"):  # the output share
        owner.send_msg(m.GetObjectsMessage([1002]), party)
    with pytest.raises(PermissionDeniedError, match="designated recipient"):
        owner.send_msg(m.MoveMessage([1002], "cap_owner", [5]), party)
    # a made-up output (not derived from the client's input) cannot be handed to the client
    bogus = torch.zeros(1, 3, dtype=torch.int64).send(party)
    with pytest.raises(PermissionDeniedError, match="not an output share"):
        protocol.call(owner, party, "respond", "svc", [7], [1], m.ObjectRef(bogus.id_at_location))
    protocol.call(owner, party, "respond", "svc", [7], [1], m.ObjectRef(1002))
    (answer,) = protocol.call(client, party, "fetch", "svc", 7)
    assert torch.equal(answer, share * 2)
    released = [r for r in party.monitor.audit_log if r["action"] == "release"]
    assert [r["outcome"] for r in released] == ["refused", "allowed"]
    # after the batch, the owner's own computations are its own again
    mine = torch.ones(2).send(party)
    assert torch.equal((mine * 3).get(), torch.full((2,), 3.0))


def test_other_users_cannot_fetch_or_submit(hook):
    party = sy.VirtualWorker(hook, id="cap_party2")
    owner = sy.VirtualWorker(hook, id="cap_owner2")
    stranger = sy.VirtualWorker(hook, id="cap_stranger")
    protocol.call(owner, party, "open", "svc", ["cap_client2"], {"input_shape": [1, 3]})
    with pytest.raises(ServingError, match="may not query"):
        protocol.call(stranger, party, "submit", "svc", 1, torch.zeros(1, 3, dtype=torch.int64))
