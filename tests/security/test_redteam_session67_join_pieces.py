"""Red team (session 67): a split product's joins looped over as many pieces as the request listed.

Attack: ``product_join(zs, block_sizes)`` and ``mac_product_join`` (a split product's last step at each party) take
both lists from the request. A list naming one stored empty share N times costs the session's quota nothing (an empty
tensor has no bytes past its storage: ``output_bounds.check_view_room`` charges none), ~10 bytes per entry on the
wire, and made the party clone and add per entry; ``mac_product_join`` also summed ``block_sizes[:b]`` for every
block (quadratic: 20,000 pieces ~1 s, a million ~40 min of one core), with no cancellation point.

Must hold: a join takes at most ``product_split.MAX_PIECES`` pieces (what any split makes: ``plan_split`` refuses
more), refused before any op runs in one line quoting no value; the worker serves on; an honest join joins.
"""

from __future__ import annotations

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc import mac_product_split, product_split
from veil.mpc.product_split import MAX_PIECES

from aten_watch import AtenOps  # noqa: E402
from server_sessions import answers_next_command, open_session, quota_worker, run_command, send_tensor  # noqa: E402

TOKEN = "rt67-join-pieces-scientist-0123456789abcdef"
ASKED = 3 * MAX_PIECES



@pytest.mark.parametrize("step", ["product_join", "mac_product_join"])
def test_a_join_of_more_pieces_than_any_split_is_refused_before_it_runs(hook, step):
    srv = quota_worker(hook, f"rt67-join-{new_id() % 10**9}", TOKEN, 1 << 20)
    s = open_session(srv, TOKEN)
    empty = m.ObjectRef(send_tensor(srv, s, torch.zeros(0, dtype=torch.int64)))
    piece = empty if step == "product_join" else [empty] * 4
    with AtenOps() as ops:
        reply, _ = run_command(srv, s, f"veil.mpc.{step}", [piece] * ASKED, [1] * ASKED,
                               n=1 if step == "product_join" else 4)
    assert type(reply) is m.ErrorReply, reply
    assert "\n" not in reply.message.strip() and step in reply.message, reply.message
    assert ops.count < 100, f"{step} ran {ops.count} ops before it was refused"
    answers_next_command(srv, s)


def test_honest_joins_within_the_bound():
    t = torch.arange(6, dtype=torch.int64).view(2, 3)
    assert torch.equal(product_split._join([t, t, t], [2, 1]), torch.cat([2 * t, t]))
    limbs = [t, t, t, t]
    got = mac_product_split._join([limbs] * MAX_PIECES, [MAX_PIECES // 2, MAX_PIECES // 2])
    assert tuple(got[0].shape) == (4, 3)
    with pytest.raises(ValueError, match="at most"):
        product_split._join([t] * (MAX_PIECES + 1), [MAX_PIECES + 1])
