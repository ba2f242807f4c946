"""Red team (session 66): a value hidden from the requester as a protocol step's *public* parameter, past the
command door: in an opening, and in the semantically public parameters of the MAC and split-product steps.

Target: the reference monitor's rule that a share the requester may not reveal (a serving client's input, dealt
material) never enters a protocol step as a public parameter (a shift, a level, a flag, a seed, a count: a Python
value the step branches on; ``oblivious.protocol_refusal``). Commands had it; the earlier pass today made every PRG
seed public (test_redteam_session66_protocol_seeds.py). Two doors it did not cover:

* openings (``OpenMessage``, the star; ``PeerOpenMessage``, the parties among themselves): ``resolve_opening``
  resolved a hidden value at ``trunc_mask``'s ``shift`` or ``cmp_and_open``'s ``level`` and ran the step. Each
  openable step checks its public parameters' types, so the step failed alike for every value (no oracle found:
  32 values per parameter, both doors), but only once the opening was audited as allowed and its dealt masks
  consumed: the requester burnt the client's masks, and a new openable step with a looser check would read the
  hidden value. Now the monitor refuses it first, with the command's rule and text, and nothing is consumed.
* ``public`` of ``mac_public`` / ``mac_scale`` / ``mac_add_public`` (annotated ``torch.Tensor``), ``block_sizes``
  of ``product_join`` / ``mac_product_join``, the slices of ``product_pieces`` and the factors of ``sgd_flatten``
  (annotated ``list``) were taken for shares. Honest code sends them inline; a hidden value there computed (the MAC
  steps: ``lift`` is value-oblivious, the result stays the client's) or failed alike (``sum(block_sizes)`` before
  its type check: ``bool(t != n)`` on a hidden ``t``, both branches the same error). No oracle found; now public by
  name (``oblivious.PUBLIC_NAMES``), refused before the step runs.

Harness: one ``WebsocketServerWorker`` party in process (requests through ``serve_bytes``), with a serving model
owner (scientist token), its client and a crypto provider (peer token) that deals truncation pairs by seed, so the
test knows each mask and checks an opened value against plain torch.
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
from veil.mpc.party import OPENABLE, PARTY_FUNCTIONS, OpenMessage
from veil.mpc.prg import SEED_BYTES, expand
from veil.serving.protocol import ServingMessage
from veil.workers.oblivious import _public_parameters
from veil.workers.peer_openings import PeerOpenMessage, rounds_of
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import uid  # noqa: E402
from server_sessions import open_session, request  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

OWNER = "rt66o-model-owner-token-0123456789abcdef"
CLIENT = "rt66o-serving-client-token-0123456789abc"
PROVIDER = "rt66o-crypto-provider-token-0123456789ab"
SCI = "rt66o-another-scientist-token-0123456789a"
SHAPE = (1, 4)
SHARE = torch.tensor([[5, -7, 11, 2**40]])  # the client's share at this party
SELECT, MUL, ADD = (ALLOWLIST.by_func(f).name for f in (torch.Tensor.__getitem__, torch.mul, torch.add))
VALUES = (0, 1, 3, 16, 32, 2**62, -1)


class Party:
    """One serving party: the owner claimed the client's share (``batch``); the provider deals masks."""

    def __init__(self, hook) -> None:
        tokens = sy.TokenTable()
        tokens.add(OWNER, "mo", "scientist")
        tokens.add(CLIENT, "cl", "client")
        tokens.add(PROVIDER, "cp", "peer")
        tokens.add(SCI, "sci", "scientist")
        self.srv = WebsocketServerWorker(hook, id=uid("rt66o"), port=0, tokens=tokens)
        self.owner, self.client, self.provider = (open_session(self.srv, t) for t in (OWNER, CLIENT, PROVIDER))
        assert self.ask(ServingMessage("open", "m", [["cl"], {"input_shape": list(SHAPE)}])).objects == ["mo"]
        assert type(self.ask(ServingMessage("submit", "@mo/m", [1, SHARE]), self.client)) is m.ObjectsReply
        self.batch = new_id()
        assert self.ask(ServingMessage("claim", "m", [[1], self.batch])).objects == [1]

    def ask(self, msg, session=None):
        return request(self.srv, session or self.owner, msg)

    def cmd(self, op: str, *args, n: int = 1, session=None):
        ids = [new_id() for _ in range(n)]
        return self.ask(m.CommandMessage(op, args, {}, ids, False), session), ids

    def hidden(self, value: int) -> int:
        """A hidden 0-dim tensor holding ``value``: ``x[0, 0] * 0 + value``, computed from the client's share."""
        ref = m.ObjectRef(self.batch)
        for op, args in ((SELECT, (ref, (0, 0))), (MUL, (None, 0)), (ADD, (None, value))):
            reply, (rid,) = self.cmd(op, *((ref,) + args[1:] if args[0] is None else args))
            assert type(reply) is m.OkReply, (op, reply)
            ref = m.ObjectRef(rid)
        return ref.id

    def mask(self) -> tuple[int, torch.Tensor]:
        """A truncation pair dealt by seed: the id of its uniform ``r`` (the owner claims it by naming it) and
        ``r`` itself (the test knows the seed)."""
        seed = bytes(new_id() % 256 for _ in range(SEED_BYTES))
        ids = [new_id() for _ in range(3)]
        msg = m.CommandMessage("veil.mpc.expand_material", (torch.frombuffer(bytearray(seed), dtype=torch.uint8),
                                                            "truncation", [list(SHAPE), 2**16], 1, []), {}, ids,
                               False)
        assert type(request(self.srv, self.provider, msg)) is m.OkReply
        return ids[0], expand(seed, "0/0", SHAPE)

    def open(self, door: str, name: str, args: tuple):
        if door == "star":
            return self.ask(OpenMessage(name, args, {}))
        self.opened_ids = [new_id()]  # (where a peer opening would store the opened value)
        return self.ask(PeerOpenMessage(name, args, {}, f"r{new_id()}".ljust(24, "0"), [self.srv.id, "rt66o-peer"],
                                        self.opened_ids))

    def open_rows(self, outcome: str) -> int:
        """How many opening rows of ``outcome`` the audit table holds (once the writer caught up)."""
        assert self.srv.audit_rows.wait(10)
        with self.srv.db._lock:
            return len(self.srv.db._db.execute("SELECT seq FROM audit WHERE action = 'open' AND outcome = ?",
                                               (outcome,)).fetchall())

    def still_serves(self) -> None:
        """The owner answers the request (3 x on the share) and the client fetches what plain torch computes;
        the owner still cannot read the batch."""
        reply, (y,) = self.cmd(MUL, m.ObjectRef(self.batch), 3)
        assert type(reply) is m.OkReply, reply
        assert self.ask(ServingMessage("respond", "m", [[1], [SHAPE[0]], m.ObjectRef(y)])).objects == []
        got = self.ask(ServingMessage("fetch", "@mo/m", [1]), self.client)
        assert type(got) is m.ObjectsReply and torch.equal(got.objects[0], SHARE * 3), got
        assert type(self.ask(m.GetObjectsMessage([self.batch], False, None))) is m.ErrorReply


@pytest.fixture
def party(hook):
    return Party(hook)


def _one_line_no_values(reply) -> None:
    text = str(getattr(reply, "message", ""))
    assert "\n" not in text, text
    for v in SHARE.flatten().tolist():
        assert str(v) not in text, (v, text)


def _refused(reply, parameter: str) -> None:
    assert type(reply) is m.ErrorReply and reply.error == "PermissionDeniedError", reply
    assert f"cannot be its public parameter {parameter!r}" in reply.message, reply.message
    _one_line_no_values(reply)


# ------------------------------------------------------------------ openings

@pytest.mark.parametrize("door", ["star", "peer"])
def test_a_hidden_shift_is_refused_before_the_opening_uses_its_mask(party, door):
    """Attack: the owner opens ``trunc_mask(batch, r, shift=h)`` with ``h`` a hidden 0-dim value it computed from the
    client's share (``x * 0 + v``), over the star and over a peer opening, for several ``v``. Before: the monitor
    let it run; the step failed alike ("needs an integer shift") but only after the dealt mask ``r`` was consumed
    and the opening audited as allowed. Must hold: one and the same one-line refusal for every ``v``, naming the
    parameter; no peer round left open, nothing stored; ``r`` unused: the honest opening with it still gives
    ``share + r + 3`` exactly (plain torch); the service still answers the client."""
    rid, r = party.mask()
    outcomes = set()
    for v in VALUES:
        h = m.ObjectRef(party.hidden(v))
        reply = party.open(door, "trunc_mask", (m.ObjectRef(party.batch), m.ObjectRef(rid), h))
        _refused(reply, "shift")
        outcomes.add((reply.error, reply.message))
        if door == "peer":  # nothing stored where the opened value would have been
            got = party.ask(m.GetObjectsMessage(party.opened_ids, False, None))
            assert type(got) is m.ErrorReply and got.error == "ObjectNotFoundError", got
    assert len(outcomes) == 1, outcomes
    assert not rounds_of(party.srv)._open
    assert party.open_rows("allowed") == 0 and party.open_rows("refused") == len(VALUES)
    honest = party.ask(OpenMessage("trunc_mask", (m.ObjectRef(party.batch), m.ObjectRef(rid), 3), {}))
    assert type(honest) is m.ObjectsReply, honest
    assert torch.equal(honest.objects[0], SHARE + r + 3)
    party.still_serves()


def _openable_public_parameters() -> list:
    out = []
    for name in sorted(OPENABLE):
        for pos, pname in _public_parameters("veil.mpc." + name, PARTY_FUNCTIONS[name]):
            out.append((name, pos, pname))
    return out


def test_the_openable_steps_have_public_parameters_to_guard():
    """The class, as it stands: trunc_mask and mac_trunc_mask's shift, cmp_and_open's level and first, mac_gamma's
    seed (a new openable step's public parameters join the next test by themselves)."""
    found = {(name, pname) for name, _, pname in _openable_public_parameters()}
    assert {("trunc_mask", "shift"), ("mac_trunc_mask", "shift"), ("cmp_and_open", "level"),
            ("cmp_and_open", "first"), ("mac_gamma", "seed")} <= found, found


@pytest.mark.parametrize("door", ["star", "peer"])
@pytest.mark.parametrize("name,pos,pname", _openable_public_parameters())
def test_no_openable_step_reads_a_hidden_value_as_a_public_parameter(party, door, name, pos, pname):
    """Attack: a hidden value at each public parameter of each openable step, positionally and as a keyword, the
    other arguments the client's share and inline zeros. Must hold: the monitor refuses it before the step runs,
    naming the parameter, the same answer for every value; the service still serves."""
    n = len(list(__import__("inspect").signature(PARTY_FUNCTIONS[name]).parameters))
    outcomes = set()
    for v in (0, 1, 32):
        h = m.ObjectRef(party.hidden(v))
        args = [m.ObjectRef(party.batch)] + [torch.zeros(SHAPE, dtype=torch.int64)] * (n - 1)
        args[pos] = h
        reply = party.open(door, name, tuple(args))
        _refused(reply, pname)
        outcomes.add(reply.message)
        kw = party.ask(OpenMessage(name, tuple(args[:pos]), {pname: h})) if door == "star" else reply
        _refused(kw, pname)
    assert len(outcomes) == 1, outcomes
    assert not rounds_of(party.srv)._open
    party.still_serves()


# ------------------------------------------------------------------ semantically public parameters of party steps

def _public_cases(h: m.ObjectRef) -> list:
    z = torch.zeros(SHAPE, dtype=torch.int64)
    return [("veil.mpc.mac_public", (z, z, h, True), 4, "public"),
            ("veil.mpc.mac_scale", (z, z, z, z, h), 4, "public"),
            ("veil.mpc.mac_add_public", (z, z, z, z, z, z, h, True, False), 4, "public"),
            ("veil.mpc.product_join", ([z, z], [h]), 1, "block_sizes"),
            ("veil.mpc.mac_product_join", ([[z] * 4, [z] * 4], [h]), 4, "block_sizes"),
            ("veil.mpc.product_pieces", (z, None, [[[1, 0, h, 1]]], []), 1, "x_slices"),
            ("veil.mpc.product_pieces", (z, z, [], [[[1, 0, h, 1]]]), 1, "y_slices"),
            ("veil.mpc.sgd_flatten", ([z], [h]), 1, "factors")]


@pytest.mark.parametrize("case", range(8))
def test_a_hidden_value_is_no_public_constant_block_size_slice_or_factor(party, case):
    """Attack: a hidden 0-dim value as the public constant of a MAC step (``mac_public``'s value: party 0's share
    *is* it), as a split product's block size or slice bound, or as an SGD factor. Before: taken for a share (the MAC
    steps computed on it; the others failed alike). Must hold: refused by the monitor before the step runs, naming
    the parameter, whatever the value; nothing stored; the service still serves."""
    outcomes = set()
    for v in (1, 2, 2**40):
        op, args, n, pname = _public_cases(m.ObjectRef(party.hidden(v)))[case]
        reply, ids = party.cmd(op, *args, n=n)
        _refused(reply, pname)
        outcomes.add(reply.message)
        for oid in ids:
            assert type(party.ask(m.GetObjectsMessage([oid], False, None))) is m.ErrorReply
    assert len(outcomes) == 1, outcomes
    party.still_serves()


def test_the_honest_mac_and_split_steps_compute_what_torch_does(party):
    """The honest uses, inline public values (a scientist's own session: the owner's holds the client's input, so
    every share it makes is the client's): ``mac_scale`` of (lo, hi) = (v, sign) by 3 gives 3 v (plain torch) and a
    MAC share scaled alike; ``mac_public`` gives party 0 the constant; ``product_join`` sums a block's pieces;
    ``sgd_flatten`` scales and flattens. On the client's hidden share the owner's steps still run."""
    sci = open_session(party.srv, SCI)

    def get(ids):
        got = party.ask(m.GetObjectsMessage(ids, False, None), sci)
        assert type(got) is m.ObjectsReply, got
        return got.objects

    v = torch.tensor([[1, -2, 3, 2**40]])
    sign = -(v < 0).long()  # the high limb of a signed 64-bit v
    zero = torch.zeros(SHAPE, dtype=torch.int64)
    reply, ids = party.cmd("veil.mpc.mac_scale", v, sign, v * 5, sign, torch.tensor(3), n=4, session=sci)
    assert type(reply) is m.OkReply, reply
    lo, hi, mlo, mhi = get(ids)
    assert torch.equal(lo, v * 3) and torch.equal(hi, sign) and torch.equal(mlo, v * 15) and torch.equal(mhi, sign)
    reply, ids = party.cmd("veil.mpc.mac_public", zero, zero, v, True, n=4, session=sci)
    assert type(reply) is m.OkReply and torch.equal(get(ids[:1])[0], v), reply
    reply, (rid,) = party.cmd("veil.mpc.product_join", [v, v * 2], [2], session=sci)
    assert type(reply) is m.OkReply and torch.equal(get([rid])[0], v * 3), reply
    reply, (rid,) = party.cmd("veil.mpc.sgd_flatten", [v, v], [1, 4], session=sci)
    assert type(reply) is m.OkReply and torch.equal(get([rid])[0], torch.cat([v, v * 4]).flatten()), reply
    reply, _ = party.cmd("veil.mpc.mac_scale", m.ObjectRef(party.batch), zero, m.ObjectRef(party.batch), zero,
                         torch.tensor(3), n=4)
    assert type(reply) is m.OkReply, reply
    party.still_serves()
