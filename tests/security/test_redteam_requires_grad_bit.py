"""Red team: ``ptr.requires_grad = <tensor>`` stored one bit of protected data in a flag every later
descriptor shows (the setter ran ``bool()`` on a tensor computed from review data). Only a Python bool
is taken now, as torch's own ``requires_grad_`` does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import run_command  # noqa: E402
from test_redteam_governance_he import W  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def test_requires_grad_set_from_review_data_tells_nothing(hook):
    w = W(hook)
    outcomes = []
    for threshold in (30.0, 40.0):  # some of the owner's [37, 5, 2] is above 30, none above 40
        bit = w.cmd(w.sci, "torch.any", m.ObjectRef(w.cmd(w.sci, "torch.gt", m.ObjectRef(w.d1), threshold)))
        mine = w.cmd(w.sci, "torch.zeros", 3)
        reply, _ = run_command(w.srv, w.sci, "Tensor.requires_grad.__set__", m.ObjectRef(mine), m.ObjectRef(bit), n=0)
        listed = w.req(w.sci, m.ListObjectsMessage())  # what the scientist sees of its own tensor
        (flag,) = [d.requires_grad for d in listed.descriptors if d.id == mine]
        text = getattr(reply, "message", "").replace(str(mine), "<id>").replace(str(bit), "<id>")
        outcomes.append((type(reply).__name__, text.replace(w.srv.id, "<worker>"), flag))
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0][0] == "ErrorReply" and "\n" not in outcomes[0][1] and outcomes[0][2] is False
    w.healthy()


def test_requires_grad_still_takes_a_python_bool(hook):
    w = W(hook)
    mine = w.cmd(w.sci, "torch.zeros", 3)
    reply, _ = run_command(w.srv, w.sci, "Tensor.requires_grad.__set__", m.ObjectRef(mine), True, n=0)
    assert type(reply) is m.OkReply, reply
    w.healthy()
