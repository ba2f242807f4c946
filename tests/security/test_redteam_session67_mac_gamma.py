"""Red team (session 67): the SPDZ2k MAC check's opening ``mac_gamma`` sized by the request's shapes.

Attack: ``mac_gamma(seed, items)`` draws each item's check coefficients over the item's ``shape``, a list of
integers the request writes (``prg.expand``), before it looks at the item's MAC terms. One stored 1-entry share
and ``shape=[2**22]`` made a party draw 32 MiB of coefficients and several times that in 128-bit temporaries
(``[2**31]``: 16 GiB), whatever the session's quota: the quota charges stored tensors, and a shape list is none.
The same with an item of no terms (an error, raised only after the draw).

Must hold: an item's shape is the broadcast of its MAC terms' shapes (what ``veil.mpc.mac.check`` sends: the
opened value's MAC shares have its shape), checked before anything is drawn; a larger one is refused in one
line that quotes no value, and the worker serves on. An honest check still opens the right gammas.
"""

from __future__ import annotations

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc import mac, prg
from veil.mpc.party import OpenMessage
from veil.mpc.ring import DTYPE

from server_sessions import answers_next_command, open_session, quota_worker, request, send_tensor  # noqa: E402

TOKEN = "rt67-mac-gamma-scientist-0123456789abcdef"


def _worker(hook):
    srv = quota_worker(hook, f"rt67-gamma-{new_id() % 10**9}", TOKEN, 1 << 20)
    return srv, open_session(srv, TOKEN)


def _seed() -> torch.Tensor:
    return torch.frombuffer(bytearray(prg.new_seed()), dtype=torch.uint8)


@pytest.mark.parametrize("terms", ["one share", "no terms"])
def test_a_shape_larger_than_the_terms_is_refused_before_anything_is_drawn(hook, monkeypatch, terms):
    srv, s = _worker(hook)
    ref = m.ObjectRef(send_tensor(srv, s, torch.ones(1, dtype=DTYPE)))
    drawn = []
    real = prg.expand
    monkeypatch.setattr(mac, "expand", lambda seed, label, shape, *a, **k: drawn.append(shape) or real(
        seed, label, shape, *a, **k))
    items = [[[1 << 22], [[1, 0, ref]] if terms == "one share" else []]]
    reply = request(srv, s, OpenMessage("mac_gamma", (_seed(), items), {}))
    assert type(reply) is m.ErrorReply, reply
    assert "\n" not in reply.message.strip() and "mac_gamma" in reply.message, reply.message
    assert drawn == [], f"coefficients drawn over {drawn} before the refusal"
    answers_next_command(srv, s)


def test_an_honest_check_opens_each_gamma(hook):
    """Two parties' gammas from their MAC shares sum to sum_e r_e mac_e: the check verifies as before."""
    torch.manual_seed(0)
    shape = (3, 4)
    seed = _seed()
    lo = torch.randint(-2**62, 2**62, shape, dtype=DTYPE)
    hi = torch.randint(-2**62, 2**62, shape, dtype=DTYPE)
    got = mac._mac_gamma(seed, [[list(shape), [[1, lo, hi]]], [[4], [[3, 0, hi[0]]]]])
    assert tuple(got[0].shape) == (2,)
    coeffs = mac.r128.lift_unsigned(prg.expand(bytes(seed.numpy()), "mac/0", shape))
    want = mac.r128.sum_all(mac.r128.mul(coeffs, (lo, hi)))
    assert torch.equal(mac._unpieces(*got)[0][0], want[0]) and torch.equal(mac._unpieces(*got)[1][0], want[1])
