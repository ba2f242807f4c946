"""Red team (session 67): protocol steps that return a tensor per list entry, missed by the step-outputs count.

Attack: ``output_pieces.STEP_PIECES`` counts, before a step runs, the tensors it returns one per entry of a list the
request writes (7861f50). Three steps were not in it:

* the opening ``fixed_mask(x_i, a_i)`` over two lists (a split fixed product's pieces) replies a tensor per entry:
  lists naming one stored empty share 72,000 times (~10 bytes an entry on the wire, nothing to the quota) replied
  72,000 tensors (~600 bytes of host memory each), past the 65,536 any opening may make;
* ``sgd_apply(params, update)`` returns a new share per listed parameter, and ``fss_select(opened, material,
  n_values, ...)`` one per value (``n_values`` a request-written int matched by the lists' lengths): under a 1 MiB
  quota they made their 72,000 results (~150,000 and ~500,000 ATen ops) before the store refused them.

Must hold: each is counted before it runs (an opening at most 65,536, a command at most its return ids, under a quota
each charged what the store charges a tensor); ``fss_select`` takes at most ``fss_dealing.MAX_VALUES`` values (what
any dealt material holds). One-line refusals naming no value; the worker serves on.
"""

from __future__ import annotations

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc import comparison
from veil.mpc.party import OpenMessage

from aten_watch import AtenOps  # noqa: E402
from server_sessions import (answers_next_command, open_session, quota_worker, request, run_command,  # noqa: E402
                             send_tensor)

TOKEN = "rt67-list-results-scientist-0123456789abcdef"
ASKED = 72_000



def _worker(hook, quota):
    srv = quota_worker(hook, f"rt67-lists-{new_id() % 10**9}", TOKEN, quota)
    s = open_session(srv, TOKEN)
    return srv, s, m.ObjectRef(send_tensor(srv, s, torch.zeros(0, dtype=torch.int64)))


def _refused(reply) -> str:
    assert type(reply) is m.ErrorReply, reply
    assert "\n" not in reply.message.strip(), reply.message
    return reply.message


@pytest.mark.parametrize("quota", [None, 1 << 20])
def test_a_fixed_mask_opening_replies_no_tensor_per_entry_past_the_bound(hook, quota):
    srv, s, empty = _worker(hook, quota)
    with AtenOps() as ops:
        reply = request(srv, s, OpenMessage("fixed_mask", ([empty] * ASKED, [empty] * ASKED), {}))
    assert "would return" in _refused(reply) and "refused before it runs" in reply.message, reply.message
    assert ops.count < 100, f"the opening ran {ops.count} ops before it was refused"
    answers_next_command(srv, s)


@pytest.mark.parametrize("step", ["sgd_apply", "fss_select"])
def test_a_step_of_a_result_per_entry_is_charged_before_it_runs(hook, step):
    srv, s, empty = _worker(hook, 1 << 20)
    args = {"sgd_apply": ([empty] * ASKED, empty),
            "fss_select": ([empty] * ASKED, [empty] * (2 * ASKED + 1), ASKED, -1, True)}[step]
    n = {"sgd_apply": ASKED, "fss_select": ASKED + 1}[step]
    with AtenOps() as ops:
        reply, _ = run_command(srv, s, f"veil.mpc.{step}", *args, n=n)
    text = _refused(reply)
    assert step in text, text
    assert ops.count < 100, f"{step} ran {ops.count} ops before it was refused"
    answers_next_command(srv, s)


def test_fss_select_takes_no_more_values_than_any_dealt_material():
    many = comparison.fss_dealing.MAX_VALUES + 1
    t = torch.zeros(0, dtype=torch.int64)
    with pytest.raises(ValueError, match="n_values in"):
        comparison._fss_select([t] * many, [t] * (2 * many + 1), many, -1, True)
