"""Hostile batches of deferred commands against a running ``veil worker`` (issue 19 pipelining).

A batch (the prelude of a frame) runs each command as if it came alone: through the
reference monitor in the sender's session, under the session's memory quota and
the per-command time limit; a failure stops the batch, names the op and its
position, and leaves other sessions' objects untouched.
"""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from veil.exceptions import CommandTimeoutError, ObjectNotFoundError
from veil.workers.monitor import QuotaExceededError
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.plans import training_plan
from veil.tensors import remote_ops

from network_helpers import OTHER, base_args


def _raw(client, msg, prelude):
    """A hand-made frame over the client's authenticated connection; the decoded reply."""
    return deserialize(client._recv_msg(serialize(msg, sender="me", prelude=prelude)))[0]


def test_batch_naming_another_sessions_ids_fails_like_an_unknown_id(spawn, connect):
    wp = spawn("alice", base_args())
    victim = connect(wp)
    attacker = connect(wp, token=OTHER, id="alice-attacker")
    secret = torch.tensor([4.25, 2.5]).send(victim)
    victim.flush()
    vid = secret.id_at_location
    steal = [["torch.mul", [m.ObjectRef(vid), 1], {}, [5_000_001], False],
             ["Tensor.add_", [m.ObjectRef(vid), 100], {}, [0], False]]
    reply = _raw(attacker, m.GetObjectsMessage([5_000_001], False, None), steal)
    assert type(reply) is m.ErrorReply and reply.error == "ObjectNotFoundError"
    assert "#1 of 2" in reply.message and "4.25" not in reply.message
    probe = _raw(attacker, m.DeleteMessage([]), [["torch.mul", [m.ObjectRef(777), 1], {}, [5_000_002], False]])
    assert reply.message.replace(str(vid), "ID") == probe.message.replace("777", "ID").replace("#1 of 1", "#1 of 2")
    assert torch.equal(secret.get(), torch.tensor([4.25, 2.5]))  # unchanged, still the victim's
    assert (torch.ones(1).send(attacker) + 1).get().tolist() == [2.0]  # both keep being served


def test_memory_quota_applies_to_each_command_of_a_batch(spawn, connect):
    wp = spawn("alice", base_args(["--max-session-mb", "1"]))
    alice = connect(wp)
    x = torch.ones(64 * 1024 // 4).send(alice)  # 64 KiB
    results = [x + i for i in range(40)]  # 40 x 64 KiB, queued: more than the session's 1 MiB
    with pytest.raises(QuotaExceededError, match=r"deferred command 'Tensor.add' \(#16 of 40 in the batch\)"):
        alice.flush()
    assert torch.equal(results[0].get(), torch.ones(64 * 1024 // 4))  # stored before the limit
    with pytest.raises(ObjectNotFoundError, match="never created"):
        results[-1].get()
    del results
    gc.collect()
    assert (x * 2).sum().get().item() == 2 * 64 * 1024 // 4  # freed: the session computes again


def test_time_limit_applies_to_each_command_of_a_batch(spawn, connect):
    wp = spawn("alice", base_args(["--max-command-seconds", "1.5"]))
    alice = connect(wp)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 1))
    plan = training_plan(model, F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)]).send(alice)
    x, y = torch.randn(400, 13).send(alice), torch.randn(400, 1).send(alice)
    alice.flush()
    fit = remote_ops._args_to_wire((plan._handle, x, y, plan.state, 8, 10_000, True, False, [], None, None))
    batch = [["torch.add", [m.ObjectRef(x.id_at_location), 1.0], {}, [6_000_001], False],
             ["veil.plan.fit", fit, {}, None, True],
             ["torch.add", [m.ObjectRef(x.id_at_location), 2.0], {}, [6_000_002], False]]
    reply = _raw(alice, m.DeleteMessage([]), batch)
    assert type(reply) is m.ErrorReply and reply.error == "CommandTimeoutError"
    assert "veil.plan.fit" in reply.message and "#2 of 3" in reply.message
    got = _raw(alice, m.GetObjectsMessage([6_000_001, 6_000_002], False, None), [])
    assert type(got) is m.ErrorReply and "6000002" in got.message  # the command after the timeout never ran
    assert torch.equal(deserialize(alice._recv_msg(serialize(m.GetObjectsMessage([6_000_001], False, None))))[0]
                       .objects[0], x.get(delete=False) + 1)
    assert plan.fit(x, y, batch_size=8, epochs=1).get().shape == (50,)  # still serves, plan intact
    with pytest.raises(CommandTimeoutError):
        plan.fit(x, y, batch_size=8, epochs=10_000)  # the same limit as a command sent alone
