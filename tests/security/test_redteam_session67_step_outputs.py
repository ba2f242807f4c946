"""Red team (session 67): protocol steps that return a tensor per entry of a list argument.

Attack: the openings ``beaver_masks``, ``mac_beaver_masks``, ``fss_mask``, ``cmp_mask_values`` and
``cmp_quad_open_values`` (and the step ``cmp_select``) return one tensor per entry of lists the request writes.
A list naming one tiny tensor N times costs ~10 bytes per entry on the wire and makes N tensors of ~600 bytes of
host memory each (~60x the message: a 256 MiB request, ~15 GB), as an opening's reply or a command's results
(counted only once made: "returned N tensors"). The quota charged their bytes, never the tensors themselves, and
without a quota nothing bounded them but the message size (``output_bounds.check_pieces`` counted only torch's
split, chunk and unbind).

Must hold: counted from the lists' lengths before the step runs (``output_pieces.check_pieces``): an opening makes
at most 65536 (a peer opening too, its ids matched after the opening rules), a command at most its return ids; under a quota each is charged
what the store charges a tensor. One-line refusals naming no value; the worker serves on; honest openings open.
"""

from __future__ import annotations

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.party import OpenMessage
from veil.workers.quota import MIN_TENSOR_BYTES

from aten_watch import TensorsMade  # noqa: E402
from server_sessions import answers_next_command, open_session, quota_worker, request, send_tensor  # noqa: E402

TOKEN = "rt67-step-outputs-scientist-0123456789abcdef"
#: tensors an opening's attack asks for: more than any opening may make (65536); per step, the lists' length
ASKED = 72_000
PER_ENTRY = {"fss_mask": 1, "cmp_mask_values": 1, "beaver_masks": 2, "mac_beaver_masks": 6, "cmp_quad_open_values": 1}



def _args(step: str, ref, n: int) -> tuple:
    pair = [ref, ref]
    return {"fss_mask": ([ref] * n, [ref] * n),
            "cmp_mask_values": ([ref] * n, [ref] * n),
            "beaver_masks": ([ref] * n,) * 4,
            "mac_beaver_masks": ([pair] * n,) * 4,
            "cmp_quad_open_values": ([ref, ref], ref, [ref] * n, [ref] * n)}[step]


STEPS = ["fss_mask", "cmp_mask_values", "beaver_masks", "mac_beaver_masks", "cmp_quad_open_values"]


def _worker(hook, quota=None):
    srv = quota_worker(hook, f"rt67-steps-{new_id() % 10**9}", TOKEN, quota)
    s = open_session(srv, TOKEN)
    return srv, s, m.ObjectRef(send_tensor(srv, s, torch.ones(1, dtype=torch.int64)))


def _refused(reply, error="RemoteExecutionError") -> str:
    assert type(reply) is m.ErrorReply and reply.error == error, reply
    assert "\n" not in reply.message.strip(), reply.message
    return reply.message


@pytest.mark.parametrize("step", STEPS)
def test_an_opening_makes_no_tensor_per_entry_past_its_bound(hook, step):
    srv, s, ref = _worker(hook)
    made = TensorsMade()
    with made:
        reply = request(srv, s, OpenMessage(step, _args(step, ref, ASKED // PER_ENTRY[step]), {}))
    text = _refused(reply)
    assert "would return" in text and "refused before it runs" in text, text
    assert made.count < 100, f"the opening made {made.count} tensors before it was refused"
    answers_next_command(srv, open_session(srv, TOKEN))


@pytest.mark.parametrize("step", ["fss_mask", "beaver_masks"])
def test_a_command_makes_no_more_tensors_than_its_return_ids(hook, step):
    srv, s, ref = _worker(hook)
    made = TensorsMade()
    with made:
        reply = request(srv, s, m.CommandMessage("veil.mpc." + step, _args(step, ref, 1000), {}, [new_id()], False))
    text = _refused(reply)
    assert "would return" in text and "refused before it runs" in text, text
    assert made.count < 100, f"the command made {made.count} tensors before it was refused"
    answers_next_command(srv, s)


def test_under_a_quota_each_opened_tensor_is_charged(hook):
    """4096 entries (under the count bound) of one 8-byte tensor: 64 KiB of values, but 4096 tensors, each charged
    what the store charges a tensor: past a 512 KiB quota."""
    quota = 512 << 10
    srv, s, ref = _worker(hook, quota)
    entries = 4096
    assert entries * MIN_TENSOR_BYTES > quota
    reply = request(srv, s, OpenMessage("fss_mask", _args("fss_mask", ref, entries), {}))
    _refused(reply, "QuotaExceededError")
    answers_next_command(srv, s)


def test_an_honest_opening_still_opens(hook):
    """Guard: an opening of a few entries gives every output, value for value."""
    srv, s, _ = _worker(hook, 512 << 10)
    v = [m.ObjectRef(send_tensor(srv, s, torch.tensor([k, 2 * k], dtype=torch.int64))) for k in range(3)]
    r = [m.ObjectRef(send_tensor(srv, s, torch.tensor([10, 20], dtype=torch.int64))) for _ in range(3)]
    reply = request(srv, s, OpenMessage("fss_mask", (v, r), {}))
    assert type(reply) is m.ObjectsReply, reply
    assert [t.tolist() for t in reply.objects] == [[10 + k, 20 + 2 * k] for k in range(3)]
