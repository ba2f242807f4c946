"""Red team (session 67): SPDZ2k steps that loop over lists the request writes, whatever the stored shares hold.

Attack: a stored empty share costs the session's quota nothing past its storage, so a list naming it N times costs
~10 bytes an entry on the wire and nothing in the quota (``output_bounds.check_view_room`` charges bytes).

* ``mac_combine(columns, terms, hi_extra)`` added one term per entry: 72,000 terms, 72,000 ATen ops under a 1 MiB
  quota (a 256 MB message: tens of millions). An honest combine (``mac_dispatch._public_bilinear``) has at most 16
  terms (4 digits of a public operand times 4 of a share) and 2 high parts.
* the MAC check's opening ``mac_gamma(seed, items)`` costs ~0.7 ms per item (a coefficient draw and 128-bit
  products): 20,000 items of empty terms took 14 s of one core, and nothing between items looked at the command's
  cancellation (a session gone or past its deadline checked on).

Must hold: ``mac_combine`` takes at most ``mac.MAX_COMBINE_TERMS`` terms and ``MAX_COMBINE_HI`` high parts, refused
before any op in one line quoting no value; ``mac_gamma`` stops at the next item once its command is cancelled (a
one-line CommandCancelledError); the worker serves on; honest steps run as before.
"""

from __future__ import annotations

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.mpc import mac, prg
from veil.mpc.party import OpenMessage
from veil.workers import cancellation

from aten_watch import AtenOps  # noqa: E402
from server_sessions import answers_next_command, open_session, quota_worker, run_command, send_tensor  # noqa: E402

TOKEN = "rt67-mac-lists-scientist-0123456789abcdef"
ASKED = 72_000
ITEMS = 64



def _worker(hook, quota=1 << 20):
    srv = quota_worker(hook, f"rt67-maclists-{new_id() % 10**9}", TOKEN, quota)
    s = open_session(srv, TOKEN)
    return srv, s, m.ObjectRef(send_tensor(srv, s, torch.zeros(0, dtype=torch.int64)))


@pytest.mark.parametrize("listed", ["terms", "hi_extra"])
def test_a_combine_of_more_terms_than_any_honest_one_is_refused_before_it_runs(hook, listed):
    srv, s, empty = _worker(hook)
    columns, terms, hi = ([0] * ASKED, [empty] * ASKED, [empty]) if listed == "terms" else ([0], [empty], [empty] * ASKED)
    with AtenOps() as ops:
        reply, _ = run_command(srv, s, "veil.mpc.mac_combine", columns, terms, hi, n=2)
    assert type(reply) is m.ErrorReply, reply
    assert "\n" not in reply.message.strip() and "mac_combine" in reply.message, reply.message
    assert ops.count < 100, f"mac_combine ran {ops.count} ops before it was refused"
    answers_next_command(srv, s)


def test_an_honest_combine_combines():
    digits = [torch.tensor([3, 5], dtype=torch.int64)] * mac.MAX_COMBINE_TERMS
    columns = [c % 8 for c in range(mac.MAX_COMBINE_TERMS)]
    hi = [torch.tensor([1, 2], dtype=torch.int64)] * mac.MAX_COMBINE_HI
    lo, up = mac._mac_combine(columns, digits, hi)
    want_lo, want_hi = mac.r128.combine(list(zip(columns, digits)), hi)
    assert torch.equal(lo, want_lo) and torch.equal(up, want_hi)


def test_a_mac_check_of_a_cancelled_command_stops_at_the_next_item(hook, monkeypatch):
    srv, s, empty = _worker(hook, None)
    token = cancellation.CancelToken(seconds=None)
    drawn: list = []
    real = prg.expand

    def draw(*args, **kwargs):
        drawn.append(1)
        token.cancel("session mallory disconnected")
        return real(*args, **kwargs)

    monkeypatch.setattr(mac, "expand", draw)
    seed = torch.frombuffer(bytearray(prg.new_seed()), dtype=torch.uint8)
    msg = OpenMessage("mac_gamma", (seed, [[[0], [[1, empty, empty]]]] * ITEMS), {})
    reply = deserialize(srv.serve_bytes(serialize(msg, sender="client"), s, token))[0]
    assert type(reply) is m.ErrorReply and reply.error == "CommandCancelledError", reply
    assert "\n" not in reply.message.strip(), reply.message
    assert len(drawn) <= 1, f"the cancelled check drew {len(drawn)} of {ITEMS} items' coefficients"
    monkeypatch.undo()
    answers_next_command(srv, s)
