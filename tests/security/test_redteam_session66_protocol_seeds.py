"""Red team (session 66): protocol steps that read a share the requester may not reveal as their *seed*.

Target: the ``veil.mpc.*`` worker functions a serving model owner (or any scientist) may run by CommandMessage on a
party, with a stored object it may not reveal (a serving client's input share) in a parameter the reference monitor
took for a share (``oblivious._public_parameters``: by name and annotation) but the step read as a Python value:

* ``veil.mpc.prg_share(seed, shape)`` read ``bytes(seed.to(uint8).tolist())``: of a 0-dim tensor holding ``v``,
  ``v`` zero bytes, and the PRG accepts 32 only. So the step succeeded iff the hidden value was 32 (mod 256).
* ``veil.mpc.mac_gamma(seed, items)`` (the SPDZ2k MAC check's step, also run as a command) read its seed the same
  way, and the shapes and coefficients nested in ``items`` with ``int()``.

Hole found: the success or failure of the step (``OkReply`` against ``ProtectedDataError``) was a free bit of the
hidden value. A hostile serving owner claimed a client's batch on each party (its shares are revealable only to the
client), computed ``32 * bit_j(share)`` with plain torch ops (allowed on hidden shares: the value stays hidden) and
asked ``prg_share`` to seed from it: 64 requests per element and party read each party's share, so the client's
input, exactly. Fixed at two depths: the monitor treats a PRG ``seed`` as a public parameter of every protocol step,
and every parameter of a ``veil.mpc`` worker function that is no party step as public (a hidden object there is
refused before the step runs, whatever its value); and every step that reads a seed checks it by type, dtype and
shape alone (``veil.mpc.prg.seed_bytes``), ``mac_gamma`` its shapes and coefficients as Python integers.

Harness: two ``WebsocketServerWorker`` parties in process (requests through ``serve_bytes``, the path a network
connection's requests take), each with the model owner's scientist token and a serving client's token; the client
submits additive shares of its input to both; the owner claims the batch on both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.mpc.prg import SEED_BYTES, expand
from veil.serving.protocol import ServingMessage
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import uid  # noqa: E402
from server_sessions import open_session, request  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

OWNER = "rt66-model-owner-token-0123456789abcdef"
CLIENT = "rt66-serving-client-token-0123456789abcd"
SCI = "rt66-scientist-token-0123456789abcdef0123"
ROWS, COLS = 1, 4
SELECT, FLOOR_DIV, MUL, SUB, ADD, LT = (ALLOWLIST.by_func(f).name for f in (
    torch.Tensor.__getitem__, torch.floor_divide, torch.mul, torch.sub, torch.add, torch.lt))


class Parties:
    """Two serving parties; the client's input ``x`` is shared between them and claimed by the owner on both."""

    def __init__(self, hook) -> None:
        self.srvs, self.owner, self.client = [], [], []
        for name in ("alice", "bob"):
            tokens = sy.TokenTable()
            tokens.add(OWNER, "mo", "scientist")
            tokens.add(CLIENT, "cl", "client")
            srv = WebsocketServerWorker(hook, id=uid(f"rt66-{name}"), port=0, tokens=tokens)
            self.srvs.append(srv)
            self.owner.append(open_session(srv, OWNER))
            self.client.append(open_session(srv, CLIENT))
        gen = torch.Generator().manual_seed(66)
        self.x = torch.randint(-2**40, 2**40, (ROWS, COLS), dtype=torch.int64, generator=gen)
        first = torch.randint(-2**62, 2**62, (ROWS, COLS), dtype=torch.int64, generator=gen)
        self.shares = [first, self.x - first]  # (int64 wraps: Z/2^64)
        self.batch = []
        for k in range(2):
            assert self.ask(k, ServingMessage("open", "m", [["cl"], {"input_shape": [ROWS, COLS]}]),
                            self.owner).objects == ["mo"]
            assert type(self.ask(k, ServingMessage("submit", "@mo/m", [1, self.shares[k]]), self.client)) \
                is m.ObjectsReply
            oid = new_id()
            assert self.ask(k, ServingMessage("claim", "m", [[1], oid]), self.owner).objects == [1]
            self.batch.append(oid)

    def ask(self, k: int, msg, sessions=None):
        return request(self.srvs[k], (sessions or self.owner)[k], msg)

    def cmd(self, k: int, op: str, *args, n: int = 1, **kwargs):
        ids = [new_id() for _ in range(n)]
        return self.ask(k, m.CommandMessage(op, args, kwargs, ids, False)), ids

    def hidden(self, k: int, op: str, *args) -> int:
        """The id of ``op(*args)`` at party ``k``: a hidden share (it derives from the client's input)."""
        reply, (rid,) = self.cmd(k, op, *args)
        assert type(reply) is m.OkReply, (op, reply)
        return rid

    def element(self, k: int, col: int) -> int:
        """Party ``k``'s share of x[0, col], as a 0-dim stored tensor the owner may not reveal."""
        return self.hidden(k, SELECT, m.ObjectRef(self.batch[k]), (0, col))

    def constant(self, k: int, value: int) -> int:
        """A hidden 0-dim tensor holding ``value`` (``share * 0 + value``: computed from the client's share)."""
        zero = self.hidden(k, MUL, m.ObjectRef(self.element(k, 0)), 0)
        return self.hidden(k, ADD, m.ObjectRef(zero), value)

    def bit(self, k: int, share: int, j: int) -> int:
        """``32 * bit j`` of a hidden 0-dim share (two's complement), hidden as well."""
        if j == 63:
            b = self.hidden(k, LT, m.ObjectRef(share), 0)
        else:
            hi = self.hidden(k, FLOOR_DIV, m.ObjectRef(share), 2 ** j)
            hi2 = self.hidden(k, MUL, m.ObjectRef(self.hidden(k, FLOOR_DIV, m.ObjectRef(share), 2 ** (j + 1))), 2)
            b = self.hidden(k, SUB, m.ObjectRef(hi), m.ObjectRef(hi2))
        return self.hidden(k, MUL, m.ObjectRef(b), 32)

    def still_serves(self) -> None:
        """The owner answers the batch (3 x, computed on the shares) and the client fetches an output that sums to
        plain torch's ``3 * x``; the owner still cannot read the batch."""
        outs = []
        for k in range(2):
            y = self.hidden(k, MUL, m.ObjectRef(self.batch[k]), 3)
            assert self.ask(k, ServingMessage("respond", "m", [[1], [ROWS], m.ObjectRef(y)])).objects == []
            got = self.ask(k, ServingMessage("fetch", "@mo/m", [1]), self.client)
            assert type(got) is m.ObjectsReply and len(got.objects) == 1, got
            outs.append(got.objects[0])
        assert torch.equal(outs[0] + outs[1], self.x * 3)
        for k in range(2):
            refused = self.ask(k, m.GetObjectsMessage([self.batch[k]], False, None))
            assert type(refused) is m.ErrorReply, refused


@pytest.fixture
def parties(hook):
    return Parties(hook)


def _outcome(reply) -> tuple:
    return (type(reply).__name__, getattr(reply, "error", None), getattr(reply, "message", None))


def _no_values(reply, parties: Parties) -> None:
    text = str(getattr(reply, "message", ""))
    assert "\n" not in text, text
    for v in [*parties.shares[0].flatten().tolist(), *parties.shares[1].flatten().tolist(), *parties.x.flatten().tolist()]:
        assert str(v) not in text, (v, text)


# ------------------------------------------------------------------ the attack as the hostile owner ran it

def test_a_serving_owner_cannot_read_a_clients_input_bit_by_bit_through_prg_share(parties):
    """Attack: per party, ``32 * bit_j`` of the client's share x[0, 0] (torch ops on the hidden share), then
    ``veil.mpc.prg_share(seed=that, shape=[1])``: it succeeded iff the bit was 1 (a 0-dim seed of 32 is 32 zero
    bytes, a valid seed); both parties' shares give x. Must hold: every probe gets the same one-line refusal,
    naming no value; nothing of x is recovered; the service still answers the client with torch's value."""
    recovered, outcomes = [], set()
    for k in range(2):
        share = parties.element(k, 0)
        value = 0
        for j in range(64):
            reply, _ = parties.cmd(k, "veil.mpc.prg_share", m.ObjectRef(parties.bit(k, share, j)), [1])
            outcomes.add(_outcome(reply))
            _no_values(reply, parties)
            value |= (type(reply) is m.OkReply) << j
        recovered.append(value - (1 << 64) if value >= 1 << 63 else value)
    assert len(outcomes) == 1, f"prg_share's reply followed the hidden bits: {outcomes}"
    (kind, error, text), = outcomes
    assert kind == "ErrorReply" and error == "PermissionDeniedError" and "seed" in text, text
    x = int(parties.x[0, 0])
    assert (recovered[0] + recovered[1] + 2**63) % 2**64 - 2**63 != x
    assert recovered != [int(parties.shares[0][0, 0]), int(parties.shares[1][0, 0])]
    parties.still_serves()


@pytest.mark.parametrize("step", ["prg_share", "mac_gamma seed", "mac_gamma shape", "mac_gamma coefficient"])
def test_a_hidden_value_in_a_protocol_steps_public_place_is_refused_whatever_it_holds(parties, step):
    """Attack: a hidden 0-dim value computed from the client's share (``share * 0 + v``) as ``prg_share``'s or
    ``mac_gamma``'s seed, or as a shape or a coefficient in ``mac_gamma``'s items: 32 passed as a seed and 5 failed;
    a huge or negative shape failed where a small one passed. Must hold: v = 32, 5, 2^40 and -1 get one and the same
    one-line answer (a refusal), naming no value; the service still serves."""
    hi = torch.zeros(1, dtype=torch.int64)
    seed = torch.zeros(SEED_BYTES, dtype=torch.uint8)
    outcomes = {}
    for v in (32, 5, 2**40, -1):
        ref = m.ObjectRef(parties.constant(0, v))
        if step == "prg_share":
            reply, _ = parties.cmd(0, "veil.mpc.prg_share", ref, [1])
        elif step == "mac_gamma seed":
            reply, _ = parties.cmd(0, "veil.mpc.mac_gamma", ref, [[[1], [[1, 0, hi]]]], n=3)
        elif step == "mac_gamma shape":
            reply, _ = parties.cmd(0, "veil.mpc.mac_gamma", seed, [[[ref], [[1, 0, hi]]]], n=3)
        else:
            reply, _ = parties.cmd(0, "veil.mpc.mac_gamma", seed, [[[1], [[ref, 0, hi]]]], n=3)
        _no_values(reply, parties)
        outcomes[v] = _outcome(reply)
    assert len(set(outcomes.values())) == 1, f"the reply tells the hidden values apart: {outcomes}"
    assert outcomes[32][0] == "ErrorReply", outcomes
    parties.still_serves()


def test_no_non_party_protocol_function_takes_a_hidden_share(parties):
    """Attack: a hidden share as any argument of the ``veil.mpc`` worker functions that are no party step (a seeded
    share, received dealt material, a MAC key): they compute on values the requester or dealer sends. Must hold:
    each is refused by the monitor, before it runs, naming the parameter; the service still serves."""
    ref = m.ObjectRef(parties.constant(0, 32))
    seed = torch.zeros(SEED_BYTES, dtype=torch.uint8)
    for op, args, n in (("veil.mpc.prg_share", (ref, [1]), 1),
                        ("veil.mpc.register_mac_key", ("k66", ref), 0),
                        ("veil.mpc.expand_material", (ref, "beaver", ("mul", (1,), (1,), {}), 1, []), 3),
                        ("veil.mpc.expand_material", (seed, "beaver", ("mul", (1,), (1,), {}), 1, [ref]), 3)):
        reply, _ = parties.cmd(0, op, *args, n=n)
        assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError", (op, reply)
        assert "cannot be its public parameter" in reply.message, (op, reply.message)
        _no_values(reply, parties)
    parties.still_serves()


# ------------------------------------------------------------------ the honest steps, unchanged

def test_an_honest_seeded_share_and_mac_check_step_compute_what_they_did(parties, hook):
    """The honest uses: a seed sent as 32 uint8 values gives ``expand(seed)`` (compared with the PRG computed here);
    ``mac_gamma`` with integer shapes and coefficients answers; a malformed seed (0-dim, float, 31 bytes) is one
    clear line. The worker keeps serving."""
    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    srv = WebsocketServerWorker(hook, id=uid("rt66-honest"), port=0, tokens=tokens)
    s = open_session(srv, SCI)
    raw = bytes(range(SEED_BYTES))
    rid = new_id()
    seed = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    reply = request(srv, s, m.CommandMessage("veil.mpc.prg_share", (seed, [2, 3]), {}, [rid], False))
    assert type(reply) is m.OkReply, reply
    got = request(srv, s, m.GetObjectsMessage([rid], False, None)).objects[0]
    assert torch.equal(got, expand(raw, "share", [2, 3]))
    for bad in (torch.tensor(32), torch.zeros(SEED_BYTES, dtype=torch.float32), torch.zeros(31, dtype=torch.uint8)):
        reply = request(srv, s, m.CommandMessage("veil.mpc.prg_share", (bad, [1]), {}, [new_id()], False))
        assert type(reply) is m.ErrorReply and "uint8 tensor of 32 bytes" in reply.message, reply
        assert "\n" not in reply.message
    hi = torch.arange(3, dtype=torch.int64)
    reply = request(srv, s, m.CommandMessage("veil.mpc.mac_gamma", (seed, [[[3], [[1, 0, hi], [-1, hi, hi]]]]), {},
                                             [new_id() for _ in range(3)], False))
    assert type(reply) is m.OkReply, reply
    parties.still_serves()
