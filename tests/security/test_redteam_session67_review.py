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
* Worker functions value_shapes does not follow (``veil.he.op``, ``veil.compat.*``, ``veil.fl.*``,
  ``veil.plan.load_state``, ``veil.dp.*``) took a value under review anywhere, each kept safe by its own value-free
  branch. ``veil.he.op`` took its plaintext value-free only when it was the tensor itself: ``[y]`` (the reviewed
  ``y`` in a list) was encoded as any list is, so ``y = where(x > c, nan, 0)`` failed the Paillier encoding iff
  ``x > c``: a free bit per request, no approval, no failure counted. ``veil.dp.sanitized_gradient`` dry-ran its
  plan on reviewed ``params`` before any charge and answered with the plan's error, which quoted a reviewed index
  (``index 1500 is out of bounds``): the value in one request. Now (``veil/workers/reviewed_parameters.py``, checked
  by value_shapes.guard) such a function takes a reviewed value only in the parameters it declares, in the form it
  declares (the argument itself, or the items of a list); anywhere else it is refused before the function runs, by
  position and name alone.

Held (guards of what the declared parameters do with reviewed values): compat encode/decode, encrypt_state,
load_state, he.op, check_commitments and DP queries answer alike for ordinary, NaN, infinite and extreme values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import torch.nn as nn

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.he import paillier
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.plans.plan import Plan
from veil.workers import oblivious, value_shapes
from veil.workers.reviewed_parameters import ITEMS, ONE, TAKES_REVIEWED
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import SECRET, shows_number, uid  # noqa: E402
from server_sessions import answers_next_command, open_session, request, run_command, send_tensor  # noqa: E402
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


# ------------------------------------------------------------------ lead 1: reviewed values in unfollowed functions

SCI = "rt67-review-scientist-token-0123456789abcdef"


class Reviewed:
    """A network worker (requests through ``serve_bytes``) holding SECRET under review (tag ``#d``) and a scientist
    session; ``dp``: also a DP dataset ``#c`` (private) the scientist may train on with a budget."""

    def __init__(self, hook, dp: bool = False) -> None:
        tokens = sy.TokenTable()
        tokens.add(SCI, "sci", "scientist")
        self.srv = WebsocketServerWorker(hook, id=uid("rt67-review"), port=0, tokens=tokens)
        if dp:
            g = torch.Generator().manual_seed(67)
            self.srv.load(torch.rand(40, 3, generator=g), tags=("#c", "#data"), private=True)
            self.srv.load(torch.rand(40, 1, generator=g), tags=("#c", "#target"), private=True)
            self.dp = self.srv.enable_dp("c", max_grad_norm=1.0, noise_multiplier=1.0, budgets={"sci": (10.0, 1e-3)})
        self.d = m.ObjectRef(self.srv.load(SECRET.clone(), tags=("#d",), policy="review"))
        self.s = open_session(self.srv, SCI)

    def cmd(self, op: str, *args, n: int = 1, **kwargs) -> tuple:
        return run_command(self.srv, self.s, op, *args, n=n, **kwargs)

    def derived(self, fn, *args) -> m.ObjectRef:
        """``fn(*args)`` computed on the worker (it derives from the reviewed data: it is under review too)."""
        reply, (rid,) = self.cmd(ALLOWLIST.by_func(fn).name, *args)
        assert type(reply) is m.OkReply, (fn, reply)
        return m.ObjectRef(rid)

    def filled(self, value, dtype=torch.float32) -> m.ObjectRef:
        """A reviewed (2, 3) tensor of ``dtype`` holding ``value`` everywhere: ``SECRET * 0`` plus it."""
        zero = self.derived(torch.mul, self.d, 0)
        if dtype != torch.float32:
            zero = self.derived(torch.Tensor.to, zero, dtype)
        return self.derived(torch.add, zero, value)

    def send(self, obj) -> m.ObjectRef:
        return m.ObjectRef(send_tensor(self.srv, self.s, obj))

    def outcome(self, reply) -> tuple:
        text = getattr(reply, "message", "").replace(self.srv.id, "<worker>")
        assert "\n" not in text, text
        return type(reply).__name__, getattr(reply, "error", None), text

    def still_serves(self) -> None:
        assert torch.equal(self.srv.monitor.owner_objects()[self.d.id], SECRET)
        answers_next_command(self.srv, self.s)


@pytest.fixture(scope="module")
def keys():
    return paillier.keygen(512)


@pytest.mark.parametrize("wrap", [list, tuple])
def test_he_op_takes_no_reviewed_plaintext_nested_in_a_list(hook, keys, wrap):
    """Attack: ``y = where(x[0, 0] > c, nan, 0)`` from the reviewed x (x[0, 0] = 1.5), then ``veil.he.op("mul", a,
    [y])`` on a ciphertext of the scientist's key: the list was no tensor, so the plaintext skipped the value-free
    encoding and NaN failed it: ErrorReply for c = 0, OkReply for c = 10. Must hold: the same one-line refusal for
    both, naming the parameter and no value, before the function runs; the worker still serves."""
    pub, _ = keys
    w = Reviewed(hook)
    a = w.send(paillier.encrypt(torch.ones(1), pub))
    x00 = w.derived(torch.Tensor.__getitem__, w.d, (0, 0))
    outcomes = []
    for threshold in (0.0, 10.0):
        y = w.derived(torch.where, w.derived(torch.gt, x00, threshold), float("nan"), 0.0)
        reply, _ = w.cmd("veil.he.op", "mul", a, wrap([y]), new_id(), n=0)
        outcomes.append(w.outcome(reply))
    assert outcomes[0] == outcomes[1], f"the reply tells the reviewed values apart: {outcomes}"
    kind, error, text = outcomes[0]
    assert kind == "ErrorReply" and error == "ShapeRefused", outcomes[0]
    assert "nested in its parameter 'b'" in text and "review" in text, text
    w.still_serves()


class IndexesByState(nn.Module):
    """Indexes the (dummy) record by a value of its buffer ``sec``: the IndexError quoted the index."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("sec", torch.zeros(3))

    def forward(self, inp):
        return self.w * inp[0][(self.sec[0] * 1000).long()]


def test_a_dp_dry_run_never_runs_on_reviewed_params(hook):
    """Attack: ``veil.dp.sanitized_gradient`` with the reviewed ``x[0]`` as the plan's buffer (``params``): its dry
    run on a dummy record, before any charge, indexed by ``x[0, 0] * 1000`` and answered "index 1500 is out of
    bounds" (a DP error passes as value-free); with ``x[0] * 0`` it ran and was charged. Must hold: one refusal for
    both, quoting no value, nothing charged; the worker still serves."""
    w = Reviewed(hook, dp=True)
    spec = Plan(IndexesByState()).build(torch.zeros(2, 3)).spec
    plan = w.send(spec)
    row = w.derived(torch.Tensor.__getitem__, w.d, 0)
    outcomes = []
    for sec in (row, w.derived(torch.mul, row, 0)):
        reply, _ = w.cmd("veil.dp.sanitized_gradient", plan, "c", [torch.zeros(1), sec], [True, False], "mse", 0.5,
                         None, f"rt67-dry-{new_id()}")
        outcomes.append(w.outcome(reply))
        assert not shows_number(outcomes[-1][2], "1500"), outcomes[-1]
    assert outcomes[0] == outcomes[1], f"the reply tells the reviewed values apart: {outcomes}"
    assert outcomes[0][1] == "ShapeRefused" and "its parameter 'params'" in outcomes[0][2], outcomes[0]
    assert w.dp.ledger.spent("sci") == (0.0, 0.0)
    w.still_serves()


def _unfollowed_functions() -> list:
    """``(op, parameter names)`` of every worker function value_shapes does not follow op by op: not a plan run, a
    protocol step, secure aggregation's (followed as protocol steps) or a peer's, nor a step the owner's approval
    releases (``REVIEWED_INPUTS``)."""
    from veil.workers.owner_guard import REVIEWED_INPUTS
    from veil.workers.websocket_auth import PEER_COMMANDS

    out = []
    for name in ALLOWLIST.names():
        op = ALLOWLIST.by_name(name)
        if op.worker_function and not (name in value_shapes.PLAN_RUNS or name.startswith(("veil.mpc.", "veil.secagg."))
                                       or name in PEER_COMMANDS or name in REVIEWED_INPUTS):
            out.append((op, oblivious._worker_parameters(op)))
    return out


def test_every_unfollowed_worker_function_takes_reviewed_values_only_where_it_declares(hook):
    """Attack: a reviewed value in each parameter of each worker function value_shapes does not follow (positional
    and by keyword), every other argument None; and nested one level deeper than a declared parameter takes it.
    Must hold: each is refused before the function runs with the one refusal naming the parameter (and no value),
    except the declared forms; a worker function added later is refused by default. The worker still serves."""
    w = Reviewed(hook)
    ref = w.filled(7.0)
    names = {op.name for op, _ in _unfollowed_functions()}
    assert {"veil.he.op", "veil.compat.encode", "veil.fl.encrypt_state", "veil.plan.load_state",
            "veil.dp.sanitized_gradient", "veil.dp.query"} <= names, names
    assert set(TAKES_REVIEWED) <= names, set(TAKES_REVIEWED) - names  # (the table names real, checked functions)
    checked = 0
    for op, params in _unfollowed_functions():
        takes = TAKES_REVIEWED.get(op.name, {})
        assert set(takes) <= set(params), (op.name, takes, params)
        for i, name in enumerate(params):
            form = takes.get(name)
            value, expect = {None: (ref, f"cannot be its parameter {name!r}"),
                             ONE: ([ref], f"cannot be nested in its parameter {name!r}"),
                             ITEMS: ([[ref]], f"cannot be nested in its parameter {name!r}")}[form]
            args = [None] * len(params)
            args[i] = value
            for call_args, call_kwargs in ((tuple(args), {}), ((), {name: value})):
                reply = request(w.srv, w.s, m.CommandMessage(op.name, call_args, call_kwargs, [new_id()], False))
                kind, error, text = w.outcome(reply)
                assert (kind, error) == ("ErrorReply", "ShapeRefused") and expect in text, (op.name, name, reply)
                assert not shows_number(text, "7"), text
                checked += 1
    assert checked >= 40, checked
    w.still_serves()


VALUES = (1.0, float("nan"), float("inf"), float("-inf"), 3e38, -0.0)


def _encode(w, y, keys):
    return w.cmd("veil.compat.encode", y, 2, 16)[0]


def _decode(w, y, keys):
    ring = w.derived(torch.Tensor.to, y, torch.int64)  # (NaN and inf as torch casts them: any int64)
    return w.cmd("veil.compat.decode", ring, 2, 16, "float32")[0]


def _encrypt_state(w, y, keys):
    return w.cmd("veil.fl.encrypt_state", [y], 1.0, keys[0], new_id(), n=0)[0]


def _load_state(w, y, keys):
    return w.cmd("veil.plan.load_state", [w.send(torch.zeros(2, 3, dtype=torch.int64))], [y], n=0)[0]


def _he_op(w, y, keys):
    return w.cmd("veil.he.op", "add", w.send(paillier.encrypt(torch.ones(2, 3), keys[0])), y, new_id(), n=0)[0]


def _check_commitments(w, y, keys):
    out = new_id()
    reply = w.cmd("veil.he.op", "mul", w.send(paillier.encrypt(torch.ones(2, 3), keys[0])), y, out, n=0)[0]
    assert type(reply) is m.OkReply, reply
    return w.cmd("veil.fl.check_commitments", "round", ["c1"], [m.ObjectRef(out)],
                 torch.zeros(1, 32, dtype=torch.uint8))[0]


def _dp_query(w, y, keys):
    return w.cmd("veil.dp.query", y, "sum", 0.01, 0.0, "laplace", 0.0, 1.0, None, None, n=2)[0]


@pytest.mark.parametrize("call", [_encode, _decode, _encrypt_state, _load_state, _he_op, _check_commitments,
                                  _dp_query], ids=lambda f: f.__name__[1:])
def test_declared_parameters_answer_alike_for_any_reviewed_value(hook, keys, call):
    """Held (the declared parameters' value-free branches): each function given a reviewed tensor holding an
    ordinary, NaN, infinite, extreme or negative-zero value answers alike, with success (honest uses stay served);
    what it computed stays under review."""
    w = Reviewed(hook, dp=call is _dp_query)
    outcomes = {w.outcome(call(w, w.filled(v), keys)) for v in VALUES}
    assert outcomes == {("OkReply", None, "")}, outcomes
    w.still_serves()


def test_a_reviewed_encoding_stays_under_review(hook):
    """Legit: ``fix_precision()`` of reviewed values is served (the declared ``tensor``), and its result is still
    the owner's to release: a get of it waits for review."""
    w = Reviewed(hook)
    reply, (rid,) = w.cmd("veil.compat.encode", w.d, 2, 16)
    assert type(reply) is m.OkReply, reply
    got = request(w.srv, w.s, m.GetObjectsMessage([rid], False, None))
    assert type(got) is m.ErrorReply and got.error == "ReviewPendingError", got
    w.still_serves()
