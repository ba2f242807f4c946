"""Red team (session 66): worker functions outside ``veil.mpc`` given a value the requester may not learn.

Target: every allowlisted worker function that is no ``veil.mpc`` step (``veil.he.op``, ``veil.secagg.*``,
``veil.fl.*``, ``veil.dp.*``, ``veil.compat.*``, ``veil.plan.*``, ``veil.peer.end_account``), run by a serving model
owner on a party with a stored object it may not reveal (a client's input share, or a value computed from it) in
any argument position.

Hole found: the monitor ran such a function under the oblivious guard only, a TorchDispatchMode that sees ATen ops;
but these functions read their arguments in Python where it sees none: ``veil.fl.check_commitments`` read its
``digests`` with ``.numpy().tobytes()``, secure aggregation reads key tables and confirmations with ``.tolist()``,
the Paillier and CKKS encoders with ``.numpy()``, DP queries with ``.tolist()``. Each function had been made safe
by hand (a ``bool()`` check first, which the guard refuses, or a value-free encoding where
``request_reads_owner_data``), so whether a secret decided success, an error or timing rested on each function's
ordering of its own checks: ``check_commitments`` ran to completion on a hidden digest table. Fixed at the monitor:
a worker function outside ``veil.mpc`` takes a secret only in the parameters it registers as taking one (a plan's
inputs and state, whose ops the guard follows); anywhere else the secret is refused before the function runs, by
position and name alone, the same refusal for any value.

Harness: the two-party serving harness of test_redteam_session66_protocol_seeds.py (the owner claims a client's
input on both parties; requests through ``serve_bytes``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_redteam_session66_protocol_seeds import Parties, _no_values, _outcome  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def parties(hook):
    return Parties(hook)


def _non_protocol_functions() -> list:
    import inspect

    out = []
    for name in ALLOWLIST.names():
        op = ALLOWLIST.by_name(name)
        if op.worker_function and not name.startswith("veil.mpc."):
            params = [p.name for p in list(inspect.signature(op.func).parameters.values())[1:]
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            out.append((op, params))
    return out


def test_check_commitments_never_reads_a_hidden_digest_table(parties):
    """Attack: a table of 32-byte "digests" computed from the client's share (``share * 0 + v``, reshaped to
    (1, 32) and cast to uint8) as ``veil.fl.check_commitments``'s ``digests``: the function read it with
    ``.numpy()`` past the guard and answered OK. Must hold: refused before it runs, the same one-line answer for
    v = 0 and v = 7, naming the parameter and no value; the service still serves."""
    outcomes = set()
    for v in (0, 7):
        base = parties.constant(0, v)
        wide = parties.hidden(0, ALLOWLIST.by_func(torch.Tensor.expand).name, m.ObjectRef(base), [1, 32])
        table = parties.hidden(0, ALLOWLIST.by_func(torch.Tensor.to).name, m.ObjectRef(wide), torch.uint8)
        reply, _ = parties.cmd(0, "veil.fl.check_commitments", "round", ["c1"], ["not a ciphertext"],
                               m.ObjectRef(table))
        _no_values(reply, parties)
        outcomes.add(_outcome(reply))
    assert len(outcomes) == 1, outcomes
    (kind, error, text), = outcomes
    assert kind == "ErrorReply" and error == "PermissionDeniedError", outcomes
    assert "cannot be its public parameter 'digests'" in text, text
    parties.still_serves()


def test_every_non_protocol_worker_function_refuses_a_secret_in_its_public_parameters(parties):
    """Attack: the hidden share in each parameter of each worker function outside ``veil.mpc`` (positional and by
    keyword), every other argument None. Must hold: each is refused by the monitor before the function runs (the
    one refusal, naming the parameter), except the parameters a function registered as taking secrets (a plan's
    inputs and state); the service still serves. A worker function added later is covered by the same rule."""
    ref = m.ObjectRef(parties.constant(0, 32))
    checked = 0
    for op, params in _non_protocol_functions():
        for i, name in enumerate(params):
            if name in op.secret_parameters:
                continue
            args = [None] * len(params)
            args[i] = ref
            for call_args, call_kwargs in ((tuple(args), {}), ((), {name: ref})):
                reply = parties.ask(0, m.CommandMessage(op.name, call_args, call_kwargs, [new_id()], False))
                assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError", (op.name, name, reply)
                assert f"cannot be its public parameter {name!r}" in reply.message, (op.name, name, reply.message)
                _no_values(reply, parties)
                checked += 1
    assert checked >= 40, checked  # (he, secagg, fl, dp, compat, plan parameters)
    parties.still_serves()


def test_a_plan_still_runs_on_a_hidden_share_and_the_result_stays_hidden(parties, hook):
    """The opt-out: a plan's inputs may be secrets (its ops run under the oblivious guard). A plan ``x * 3``
    run by the owner on the client's batch at each party gives shares of torch's ``3 * x`` (the client fetches
    them); the owner still cannot read the batch or the plan's result."""
    import veil as sy

    def triple(x):
        return x * 3

    outs = []
    for k in range(2):
        plan = sy.func2plan(args_shape=[(1, 4)])(triple)
        plan_id = new_id()
        stored = parties.ask(k, m.ObjectMessage([m.StoredObject(plan_id, plan.spec if hasattr(plan, "spec") else plan)]))
        if type(stored) is not m.OkReply:
            pytest.skip(f"plan could not be stored this way: {stored}")
        reply, (rid,) = parties.cmd(k, "veil.plan.run", m.ObjectRef(plan_id), [m.ObjectRef(parties.batch[k])], [])
        assert type(reply) is m.OkReply, reply
        assert type(parties.ask(k, m.GetObjectsMessage([rid], False, None))) is m.ErrorReply
        outs.append(rid)
    parties.still_serves()
