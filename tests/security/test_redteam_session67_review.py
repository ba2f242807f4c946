"""Red team (session 67): values the requester may not read, inside code that reads them in Python.

Two guards follow such values through ATen ops: ``veil/workers/oblivious.py`` (a secret: a serving client's share, a
value computed from it) and ``veil/workers/value_shapes.py`` (a value under the owner's review). Python-level reads
(``tolist``, ``numpy``, a list turned into a tensor) go through no ATen op.

Holes found (each test below failed on the code before its fix, checked by running this file in a git worktree of
the commit before it):

* The secret guard saw no Python read: ``torch.tensordot(a, b, dims=d)`` reads ``d.tolist()`` in Python, so with
  ``d`` computed from a client's share (``[[bit_j], [0]]``, plain torch ops on the hidden share) the command failed
  iff the bit was 1 (the contracted dims did not match), in a command and in a plan: 64 requests per element and
  party gave a hostile serving owner the client's input. value_shapes refused that read for reviewed values only;
  now the secret guard refuses it too (one TorchFunctionMode, ``oblivious.ReadsInPython``, shared by both guards).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from veil.exceptions import PermissionDeniedError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.workers import oblivious

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_redteam_session66_protocol_seeds import Parties, _no_values, _outcome  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

N = {f: ALLOWLIST.by_func(f).name for f in (torch.floor_divide, torch.sub, torch.Tensor.reshape, torch.mul,
                                             torch.stack, torch.tensordot, torch.Tensor.__getitem__)}


# ------------------------------------------------------------------ lead 2: Python reads of a secret

@pytest.fixture
def parties(hook):
    return Parties(hook)


def _bits(parties: Parties, k: int, count: int) -> list:
    """Bits 0..count-1 of party ``k``'s share of x[0, 0] (two's complement), as the test knows them."""
    return [(int(parties.shares[k][0, 0]) >> j) & 1 for j in range(count)]


def _dims_of_bit(parties: Parties, k: int, share: int, j: int) -> int:
    """A hidden (2, 1) int64 tensor ``[[bit_j], [0]]`` of a hidden 0-dim share, made with plain torch ops."""
    b = parties.hidden(k, N[torch.floor_divide], m.ObjectRef(parties.bit(k, share, j)), 32)
    b1 = parties.hidden(k, N[torch.Tensor.reshape], m.ObjectRef(b), [1])
    zero = parties.hidden(k, N[torch.mul], m.ObjectRef(b1), 0)
    return parties.hidden(k, N[torch.stack], [m.ObjectRef(b1), m.ObjectRef(zero)])


def test_a_serving_owner_cannot_read_a_share_through_tensordots_dims(parties):
    """Attack: ``torch.tensordot(a (2, 3), b (2, 5), dims=[[bit_j], [0]])`` with the bit taken from the client's share
    at party 0: contracting a's dim 0 with b's dim 0 works (bit 0), its dim 1 (3) with b's dim 0 (2) fails (bit 1).
    tensordot reads ``dims.tolist()`` in Python, where the guard's dispatch mode sees no ATen op. Must hold: every
    probe gets the same one-line refusal, whatever the bit, naming no value; the service still serves."""
    bits = _bits(parties, 0, 6)
    assert len(set(bits)) == 2  # (both outcomes would show, were they told)
    share = parties.element(0, 0)
    outcomes = []
    for j in range(len(bits)):
        dims = _dims_of_bit(parties, 0, share, j)
        reply = parties.ask(0, m.CommandMessage(N[torch.tensordot], (torch.randn(2, 3), torch.randn(2, 5)),
                                                {"dims": m.ObjectRef(dims)}, None, False))
        _no_values(reply, parties)
        outcomes.append(_outcome(reply))
    assert len(set(outcomes)) == 1, list(zip(bits, outcomes))
    kind, error, text = outcomes[0]
    assert kind == "ErrorReply" and error == "PermissionDeniedError", outcomes[0]
    assert "tensordot reads 'dims'" in text, text
    parties.still_serves()


def _tensordot_plan(j: int) -> PlanSpec:
    """A requester's plan on a (1, 4) batch: ``[[bit_j of x[0, 0]], [0]]`` (slot 8) as tensordot's dims."""
    ops = [PlanOp(N[torch.Tensor.__getitem__], (SlotRef(0), (0, 0)), {}, [1], False),
           PlanOp(N[torch.floor_divide], (SlotRef(1), 2 ** j), {}, [2], False),
           PlanOp(N[torch.floor_divide], (SlotRef(1), 2 ** (j + 1)), {}, [3], False),
           PlanOp(N[torch.mul], (SlotRef(3), 2), {}, [4], False),
           PlanOp(N[torch.sub], (SlotRef(2), SlotRef(4)), {}, [5], False),  # bit j: 0 or 1
           PlanOp(N[torch.Tensor.reshape], (SlotRef(5), [1]), {}, [6], False),
           PlanOp(N[torch.mul], (SlotRef(6), 0), {}, [7], False),
           PlanOp(N[torch.stack], ([SlotRef(6), SlotRef(7)],), {}, [8], False),
           PlanOp(N[torch.tensordot], (torch.ones(2, 3), torch.ones(2, 5)), {"dims": SlotRef(8)}, [9], False),
           PlanOp(N[torch.mul], (SlotRef(9), 1), {}, [10], False)]  # (a plan returns no view of its constants)
    return PlanSpec(f"dims-{j}", 1, 0, 11, ops, SlotRef(10))


def test_a_plan_cannot_read_a_share_through_tensordots_dims(parties):
    """Attack: the same probe as a plan the owner runs on the client's batch (``veil.plan.run``, whose inputs may be
    secrets: its ops run under the guard). Must hold: one refusal for every bit, naming no value (a plan's refused
    op reaches the owner as the plan's failure on protected data, value-free)."""
    bits = _bits(parties, 0, 6)
    outcomes = []
    for j in range(len(bits)):
        plan = new_id()
        assert type(parties.ask(0, m.ObjectMessage([m.StoredObject(plan, _tensordot_plan(j))]))) is m.OkReply
        reply, _ = parties.cmd(0, "veil.plan.run", m.ObjectRef(plan), [m.ObjectRef(parties.batch[0])], [])
        _no_values(reply, parties)
        outcomes.append(_outcome(reply))
    assert len(set(outcomes)) == 1, list(zip(bits, outcomes))
    kind, error, text = outcomes[0]
    assert kind == "ErrorReply" and error in ("PermissionDeniedError", "ProtectedDataError"), outcomes[0]
    parties.still_serves()


@pytest.mark.parametrize("read", ["tolist", "numpy", "__array__", "tensordot"])
def test_the_secret_guard_refuses_python_reads_of_a_secret(read):
    """Veil's own code that runs under the guard (a plan's interpreter, compat encode/decode) and any allowlisted
    torch function must not turn a secret into Python values unseen: ``tolist``, ``numpy``, ``__array__`` and
    tensordot's ``dims`` are refused (one line, no value), and the guard leaves no mode on."""
    secret = torch.tensor([[1], [0]])
    calls = {"tolist": lambda s: s.tolist(), "numpy": lambda s: s.numpy(), "__array__": lambda s: s.__array__(),
             "tensordot": lambda s: torch.tensordot(torch.ones(2, 3), torch.ones(2, 5), dims=s)}
    with pytest.raises(PermissionDeniedError) as info:
        with oblivious.guard("probe", [secret]):
            calls[read](secret)
    text = str(info.value)
    assert "\n" not in text and "a Python value" in text and "whatever the values" in text, text
    assert torch._C._len_torch_function_stack() == 0  # (no mode left on after the refusal)
    assert secret.tolist() == [[1], [0]]


def test_secret_operands_with_public_dims_still_compute_tensordot():
    """Legit: a secret operand contracted with public dims (a list, or a tensor that is not secret) is served and
    equals plain torch's."""
    torch.manual_seed(67)
    a, b = torch.randn(2, 3, 4), torch.randn(3, 4, 5)
    secret = a.clone()
    with oblivious.guard("probe", [secret]):
        by_list = torch.tensordot(secret, b, dims=([1, 2], [0, 1]))
        by_tensor = torch.tensordot(secret, b, dims=torch.tensor([[1, 2], [0, 1]]))
    assert torch.allclose(by_list, torch.tensordot(a, b, dims=2)) and torch.allclose(by_tensor, by_list)
