"""Red team, second pass: review before release -- does the owner see how a value was computed, and does
exactly what they approved go out?

Follows ``test_redteam_review_provenance.py`` (not repeated here). These tests look for values whose request
shows the owner nothing of their computation (an object another worker sent: a share cut from its data, a
moved value; a worker function's own outputs that it gave no graph), values that leave carrying bits the
owner's preview cannot show (NaN payloads and signs, signed zeros), and reviews that show one thing while
another is released (an approval then a swap, a received object's claimed history, a scientist's tensor
labelled like the data).

Each hole was a strict xfail on the code before its fix (checked by running this file against a copy of the
previous commit); the defences that held are ordinary tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import ReviewPendingError
from veil.governance.graphtext import render_graph
from veil.governance.requests import ReviewQueue
from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_sessions import open_session, request, run_command, send_tensor  # noqa: E402
from review_steps import uid as _uid, pending_id as _pending  # noqa: E402

SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])
SCI, PEER, ADM = "rt-ps-sci-token", "rt-ps-peer-token", "rt-ps-adm-token"
CAP = "#veil.cap."
CANONICAL_NAN = {torch.float32: 0x7FC00000, torch.float64: 0x7FF8000000000000}


def _approved_get(w, ptr, **kw):
    w.release_requests.approve(_pending(lambda: ptr.get(**kw)))
    return ptr.get(**kw)


def _shown(w, rid: str) -> list[str]:
    """What the owner reads under "computation:" (``veil requests show`` and the console render the same)."""
    req = w.release_requests.get(rid)
    return render_graph(req.graph, req.root)


@pytest.fixture
def owner(hook):
    w = sy.VirtualWorker(hook, id=_uid("ps-owner"))
    w.load(SECRET.clone(), tags=("#clinic",), description="clinic data", policy="review")
    return w


def _data(w):
    return w.search(["#clinic"])[0]


class Net:
    """A network worker's request path in process (``serve_bytes``): a scientist, a peer worker, the owner."""

    def __init__(self, hook):
        tokens = sy.TokenTable()
        for tok, name, role in [(SCI, "sci", "scientist"), (PEER, "bob", "peer"), (ADM, "owner", "admin")]:
            tokens.add(tok, name, role)
        self.srv = WebsocketServerWorker(hook, id=_uid("rt-ps"), port=0, tokens=tokens)
        self.d = self.srv.load(SECRET.clone(), tags=("#d",), policy="review")
        self.sci, self.peer = open_session(self.srv, SCI), open_session(self.srv, PEER)

    def cmd(self, session, op, *args, **kw):
        reply, (rid,) = run_command(self.srv, session, op, *args, **kw)
        assert type(reply) is m.OkReply, reply
        return rid

    def pending(self, session, oid) -> str:
        reply = request(self.srv, session, m.GetObjectsMessage([oid]))
        assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
        return reply.message.split("release request ")[1].split()[0]

    def shown(self, rid):
        req = ReviewQueue(self.srv).get(rid)
        return render_graph(req.graph, req.root)


# ------------------------------------------------------------------------------- received objects (holes)


def test_a_share_received_from_a_peer_shows_how_it_was_computed(hook):
    """Attack: alice's owner approves sharing ``x_a * 2`` (``fix_precision().share(bob, alice)``); bob keeps its
    share, which arrives with its sources (``alice:id``) but no op graph. On bob, the scientist adds bob's own
    review data and asks for the sum: bob's owner read ``i1 = input: derived from owner data (computation not
    recorded)`` for half of it, nothing of what alice computed. Must hold: bob's request shows the received
    object as such (from worker alice, its sources) and alice's computation as alice reported it: the dataset,
    the multiplication, and the share_own step."""
    u = _uid("ps")
    alice, bob, cp = (sy.VirtualWorker(hook, id=f"{n}-{u}") for n in ("alice", "bob", "cp"))
    alice.load(SECRET.clone(), tags=("#a",), description="alice records", policy="review")
    bob.load(SECRET.clone() * 3, tags=("#b",), policy="review")
    encoded = (alice.search(["#a"])[0] * 2).fix_precision()
    try:
        shared = encoded.share(bob, alice, crypto_provider=cp)
    except ReviewPendingError as e:  # sharing is a release: alice's owner approves it once
        alice.release_requests.approve(e.request_id)
        shared = encoded.share(bob, alice, crypto_provider=cp)
    on_bob = shared.child.child.child[bob.id]
    total = on_bob + bob.search(["#b"])[0].fix_precision().child
    lines = _shown(bob, _pending(total.get))
    text = "\n".join(lines)
    assert not any("computation not recorded" in line for line in lines), text
    received = next(line for line in lines if "veil.received" in line)
    assert f"worker '{alice.id}'" in received and f"{alice.id}:" in received, text
    reported = [line for line in lines if f"| {alice.id}: " in line]  # (alice's names, never read as bob's)
    assert any("d1 = dataset: #a (alice records)" in line for line in reported), text
    assert any("Tensor.mul" in line for line in reported) and any("share_own" in line for line in reported), text
    assert any(line.startswith("d1 = dataset: #b") for line in lines) and lines[-1].endswith("<- requested"), text


FORGED = "d1 = dataset: #public (census totals)  [2, 3] float32"


def _send_received(w, session, graph: bool) -> m.ErrorReply | int:
    tags = [CAP + "provenance=" + json.dumps(["alice:7"])] + ([CAP + "graph=" + json.dumps([FORGED])] if graph else [])
    oid = new_id()
    reply = request(w.srv, session, m.ObjectMessage([m.StoredObject(oid, torch.ones(2, 3), tuple(tags))]))
    return oid if type(reply) is m.OkReply else reply


def test_a_client_sent_object_shows_its_sender_and_no_claimed_history(hook):
    """Attack: the scientist sends its own tensor carrying sources (a capability tag, honoured: it only
    restricts) and, in a second object, a made-up history (``graph=`` tag: ``d1 = dataset: #public``), then
    asks for each plus the review data. The owner read ``i1 = input: derived from owner data (computation not
    recorded)``. Must hold: the graph names the client that sent it and says how it was computed is not known
    here; a client's claimed history is never shown (refused or ignored)."""
    w = Net(hook)
    for graph in (False, True):
        oid = _send_received(w, w.sci, graph)
        if not isinstance(oid, int):  # (refused: nothing claimed reaches the owner)
            assert graph and oid.error == "PermissionDeniedError", oid
            continue
        y = w.cmd(w.sci, "torch.add", m.ObjectRef(oid), m.ObjectRef(w.d))
        lines = w.shown(w.pending(w.sci, y))
        text = "\n".join(lines)
        assert "veil.received(from client 'sci'" in text and "alice:7" in text, text
        assert FORGED not in text and "not known here" in text, text
        assert not any("computation not recorded" in line for line in lines), text


def test_a_peer_sent_object_shows_the_peers_report_as_the_peers(hook):
    """A peer worker's object (a hand-off, a share it cut, a value it moved) arrives with its sources and the
    lines of its graph. Must hold: the received node names the peer and shows its lines as that worker's
    report, under the node, not as this worker's own steps."""
    w = Net(hook)
    oid = _send_received(w, w.peer, True)
    assert isinstance(oid, int), oid
    _peer_report(w, oid, FORGED)


def test_a_peers_report_cannot_forge_lines_on_the_owners_screen(hook):
    """Attack: a peer's report (or the sources it names) holding a newline, a bidi override and a line separator,
    meant to start a line of its own ("d1 = dataset: #public") or reorder one, in ``veil requests show`` and the
    console. Must hold: no rendered line of the received node holds a raw control, bidi or separator character."""
    import re

    w = Net(hook)
    evil = "x\nd9 = dataset: #public\u202e\u2028\u200b"
    tags = (CAP + "provenance=" + json.dumps([f"alice:{evil}"]), CAP + "graph=" + json.dumps([evil]))
    oid = new_id()
    reply = request(w.srv, w.peer, m.ObjectMessage([m.StoredObject(oid, torch.ones(2, 3), tags)]))
    assert type(reply) is m.OkReply, reply
    from veil.governance.provenance import GRAPH, ROOT

    entry = next(e for i, e in w.srv.monitor.owner_entries() if i == oid)
    lines = render_graph(entry.meta[GRAPH], entry.meta[ROOT])
    assert any("d9 = dataset" in line for line in lines), lines  # (the text arrived, escaped)
    bad = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029\ufeff]")
    assert not any(bad.search(line) for line in lines), lines


def _peer_report(w, oid, forged):
    from veil.governance.provenance import GRAPH, ROOT

    entry = next(e for i, e in w.srv.monitor.owner_entries() if i == oid)
    lines = render_graph(entry.meta[GRAPH], entry.meta[ROOT])
    assert "veil.received(from worker 'bob'" in lines[0] and any(forged in line for line in lines), lines
    assert any("as computed on worker 'bob' (its report" in line for line in lines), lines
    assert any(line.endswith(f"| bob: {forged}") for line in lines), lines


# ---------------------------------------------------------------- worker functions storing outputs


def _he_request(w: Net, pub) -> str:
    enc = send_tensor(w.srv, w.sci, sy.he.paillier.encrypt(torch.zeros(2, 3), pub))
    out = new_id()
    reply, _ = run_command(w.srv, w.sci, "veil.he.op", "add", m.ObjectRef(enc), m.ObjectRef(w.d), out, n=0)
    assert type(reply) is m.OkReply, reply
    return w.pending(w.sci, out)


def test_an_he_result_shows_the_dataset_and_the_encrypted_op(hook):
    """``veil.he.op`` stores its result itself (``store_output``). Must hold: the request shows the dataset and
    the encrypted op with the key it is under (what the scientist decrypts)."""
    w = Net(hook)
    pub, _ = sy.he.paillier.keygen(n_length=512)
    text = "\n".join(w.shown(_he_request(w, pub)))
    assert "dataset: #d" in text and "veil.he.op(" in text and "Paillier key" in text, text


def test_a_worker_function_output_without_its_own_graph_still_shows_the_computation(hook, monkeypatch):
    """Attack/net: a worker function that stores its output itself (``monitor.store_output``) and records no
    graph (simulated: ``veil.he.op`` with its recording switched off) left a request whose graph was empty:
    ``computation:`` and nothing, though the value is the dataset under the scientist's key. Must hold: the
    command handler gives such an output the command's node, marked ``opaque: <function>``, with its inputs
    (the dataset among them)."""
    import veil.he.remote as he_remote

    monkeypatch.setattr(he_remote, "_record_lineage", lambda *a, **k: None)
    w = Net(hook)
    pub, _ = sy.he.paillier.keygen(n_length=512)
    lines = w.shown(_he_request(w, pub))
    text = "\n".join(lines)
    assert "opaque: veil.he.op" in text and "dataset: #d" in text, text
    assert lines[-1].endswith("<- requested"), text


#: every place that stores a worker's object outside the command handler's results, and what the owner's review
#: shows of it (audited; a new one must be added here once its graph is recorded, or it is shown as opaque)
STORE_SITES = {
    "veil/he/remote.py": "store_output: its own graph (veil.he.op, the key), test above",
    "veil/federated/he_agg.py": "store_output: its own graph (encrypt_state), test_redteam_review_provenance.py",
    "veil/compat/remote_fixed_precision.py": "the share kept here: its own graph (share_own); the others: received",
    "veil/workers/handlers.py": "command results (stamped) and ObjectMessage (received.py)",
    "veil/workers/monitor.py": "store_output and store_objects themselves",
    "veil/serving/protocol.py": "a serving client's input shares: no owner data (no sources, nothing to review)",
    "veil/workers/peer_openings.py": "opened values: released through the opening's review (release_hook)",
}


def test_every_place_that_stores_objects_is_audited_for_its_op_graph():
    """Guard: a new call of ``monitor.store(`` / ``store_output(`` / ``store_objects(`` outside the audited files
    is a value the owner may be asked to approve with no graph. Must hold: every such file is in STORE_SITES."""
    import re

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"monitor\.store(_output|_objects)?\(|\.store_output\(")
    found = {str(p.relative_to(root)) for p in (root / "veil").rglob("*.py")
             if pattern.search(p.read_text(encoding="utf-8"))}
    assert found and found <= set(STORE_SITES), sorted(found - set(STORE_SITES))


# --------------------------------------------------------------------------------- hidden bits (holes)


def _payload_nans(x, dtype):
    """Every entry a quiet NaN whose payload holds a record's top bits."""
    ints, shift = {torch.float32: (torch.int32, 2**10), torch.float64: (torch.int64, 2**12)}[dtype]
    y = x.abs().to(dtype).view(ints) // shift + CANONICAL_NAN[dtype]
    return y.view(dtype) * 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["get", "move"])
def test_an_approved_float_leaves_with_no_nan_payload(hook, owner, dtype, path):
    """Attack: a plan packs records into NaN payloads (``x.abs().view(int) // 1024 + 0x7fc00000``, viewed back as
    floats: 22 bits each in float32, 51 in float64); the owner's preview flags them, but one approval slip and
    the scientist unpacks |records| from ``get()`` (or from a worker it ``move``\\ s the value to). Must hold:
    every NaN that leaves is the canonical one (the bits of ``float("nan")``), and the stored value is
    unchanged (nothing the owner stored is altered)."""
    y = _payload_nans(_data(owner), dtype)
    if path == "get":
        got = _approved_get(owner, y, delete=False)
    else:
        other = sy.VirtualWorker(hook, id=_uid("ps-other"))
        owner.release_requests.approve(_pending(lambda: y.move(other)))
        got = y.move(other).get()  # (the destination reviews nothing of this worker's data)
    ints = torch.int32 if dtype == torch.float32 else torch.int64
    assert got.dtype == dtype and got.isnan().all()
    assert (got.view(ints) == CANONICAL_NAN[dtype]).all(), got.view(ints)
    if path == "get":  # (the worker's copy is as computed)
        stored = next(e.obj for i, e in owner.monitor.owner_entries() if i == y.id_at_location)
        assert (stored.view(ints) != CANONICAL_NAN[dtype]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.complex64])
def test_released_zeros_carry_no_sign_and_other_values_are_exact(owner, dtype):
    """Attack: one bit per entry in the sign of a zero (``(x > 2) * -0.0``-style: ``x * 0 * sign``); the preview
    prints ``0`` past its head and the statistics read min 0 max 0. Must hold: every zero leaves positive,
    every NaN canonical, and every other value bit for bit as plain PyTorch computes it."""
    x = _data(owner)
    y = ((x * 0) * torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]])).to(dtype)
    y = torch.cat([y, x.to(dtype), (x * float("nan")).to(dtype)])
    got = _approved_get(owner, y)
    parts = torch.view_as_real(got) if dtype.is_complex else got
    assert not (parts[parts == 0].signbit()).any(), got
    assert torch.equal(got[2:4], SECRET.to(dtype)), got  # (bit for bit: torch.equal of non-NaN values)
    real = parts.dtype  # canonical: the bits of float("nan") in the dtype (torch's own casts may set others)
    bits = {2: torch.int16, 4: torch.int32}[parts.element_size()]
    nans = parts[4:, :, 0] if dtype.is_complex else parts[4:]
    assert nans.isnan().all(), got
    assert (nans.contiguous().view(bits) == torch.tensor(float("nan"), dtype=real).view(bits)).all(), got


def test_a_move_to_a_worker_it_cannot_reach_uses_no_approval(hook):
    """Attack/failure: the owner approves ``d * 3``; the scientist moves it to a worker id this worker does not
    know. The approval was used up (``released``, and a "release allowed" audit row) before the destination was
    resolved, then the move failed: the owner's record says the value left when it did not, and the scientist
    can burn any approval. Must hold: the failed move releases nothing and uses nothing up; a get then releases
    the value once."""
    from veil.governance.state import governance

    w = Net(hook)
    a = w.cmd(w.sci, "torch.mul", m.ObjectRef(w.d), 3.0)
    rid = w.pending(w.sci, a)
    ReviewQueue(w.srv).approve(rid)
    reply = request(w.srv, w.sci, m.MoveMessage([a], "no-such-worker", [new_id()]))
    assert type(reply) is m.ErrorReply and reply.error == "WorkerNotFoundError", reply
    rows = [r for r in governance(w.srv).db.audit_entries() if r["action"] == "release" and rid in r["detail"]]
    assert ReviewQueue(w.srv).get(rid).state == "approved" and not rows, rows
    got = request(w.srv, w.sci, m.GetObjectsMessage([a]))
    assert type(got) is m.ObjectsReply and torch.equal(got.objects[0], SECRET * 3), got


def test_a_share_with_a_party_it_cannot_reach_uses_no_approval(hook):
    """Same attack through ``veil.compat.share_own`` (sharing is a release: the owner approves it once): a party
    this worker cannot reach failed the share after the approval was used up. Must hold: nothing is used up."""
    w = Net(hook)
    a = w.cmd(w.sci, "veil.compat.encode", m.ObjectRef(w.d), 10, 3)
    args = (a, [w.srv.id, "no-such-worker"], [new_id(), new_id()])
    reply, _ = run_command(w.srv, w.sci, "veil.compat.share_own", *args, n=0)
    assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
    rid = reply.message.split("release request ")[1].split()[0]
    ReviewQueue(w.srv).approve(rid)
    reply, _ = run_command(w.srv, w.sci, "veil.compat.share_own", *args, n=0)
    assert type(reply) is m.ErrorReply and "no-such-worker" in reply.message, reply
    assert ReviewQueue(w.srv).get(rid).state == "approved"


def test_the_preview_never_shows_values_an_approval_does_not_release(hook):
    """Attack (approve one value, release another): the scientist files a request for ``d * 1`` (the records)
    under id X, then frees X and computes ``d * 0`` under X. The owner's preview showed the zeros now under X,
    flagged "CHANGED"; the owner approves what they see; the scientist frees X, computes ``d * 1`` again (the
    filed bytes and computation) and the approval releases the records. Must hold: while the object differs
    from the filed value, the preview shows none of its values (it says why), and once the filed value is back
    the preview shows it."""
    w = Net(hook)
    x = new_id()

    def under_x(factor):
        request(w.srv, w.sci, m.DeleteMessage([x]))
        reply = request(w.srv, w.sci, m.CommandMessage("torch.mul", (m.ObjectRef(w.d), factor), {}, [x], False))
        assert type(reply) is m.OkReply, reply

    under_x(1.0)
    rid = w.pending(w.sci, x)
    under_x(0.0)
    shown = ReviewQueue(w.srv).preview(rid)
    assert "CHANGED since the request was filed" in shown and "[" not in shown, shown  # (no values)
    under_x(1.0)
    assert ReviewQueue(w.srv).preview(rid).startswith("[1.5, -2.25, 3"), ReviewQueue(w.srv).preview(rid)


def test_a_keyword_name_cannot_place_the_dataset_in_an_op_line():
    """Attack: a keyword argument named like an input's mark (``·0·``) would be filled by ``render_graph`` with the
    name of the node's first input (the dataset), showing it in an argument it is not in. No allowlisted op takes
    an unknown keyword today (they raise, so nothing is stored), so this checks the line maker itself. Must
    hold: a requester's keyword never turns into an input's name."""
    from veil.governance.provenance import _args_text

    data = torch.ones(1)
    text = _args_text((1.0,), {"p\u00b70\u00b7": 2.0, "other": data}, {id(data): 0})
    line = render_graph({"n": {"op": "f", "inputs": ["src"], "args": text}, "src": {"op": "dataset"}}, "n")[0]
    assert line.count("d1") == 1 and "other=d1)" in line, line


# ------------------------------------------------------------------------------------- what held


def test_an_approval_is_of_the_released_form_not_the_hidden_bits(owner):
    """Attack: the owner approves a value holding canonical NaNs; the scientist then rewrites the object's NaNs
    in place with payloads (the same value as printed) and fetches it. Must hold: either a new request is
    filed, or what leaves is bit for bit what was approved (here: the digest is of the released form, so the
    approval stands and the payloads are cleared)."""
    y = _data(owner) * float("nan")
    rid = _pending(lambda: y.get(delete=False))
    approved = owner.release_requests.get(rid).digest
    owner.release_requests.approve(rid)
    bits = y.view(torch.int32)
    bits.add_(5)  # (payload bits; still NaNs)
    try:
        got = y.get()
    except ReviewPendingError as e:
        assert e.request_id != rid
        return
    from veil.governance.requests import digest

    assert digest(got) == approved and (got.view(torch.int32) == CANONICAL_NAN[torch.float32]).all(), got


def test_a_scientists_tensor_tagged_like_the_data_is_not_shown_as_the_dataset(owner):
    """Attack (name collision): the scientist sends its own tensor tagged ``#clinic`` with the description
    ``clinic data`` (the dataset's own), and asks for ``mine + x * 0``, hoping the owner reads two datasets and
    approves. Must hold: the only ``dataset`` line is the owner's; the scientist's tensor is shown as its own."""
    mine = torch.zeros(2, 3).tag("#clinic").describe("clinic data").send(owner)
    lines = _shown(owner, _pending((mine + _data(owner) * 0).get))
    assert sum("= dataset:" in line for line in lines) == 1, lines
    assert any("scientist's tensor" in line for line in lines), lines


def test_an_approval_does_not_follow_an_id_reused_for_another_computation(hook):
    """Attack (re-registration): ``d * 2`` is approved under id X; the scientist frees X and computes under X
    (ids are the client's to choose) ``d + d`` (the same bytes, another computation), then ``d * 3``. Must hold:
    neither rides on the approval (each files a new request) and the approval stays unused."""
    w = Net(hook)
    x = new_id()

    def under_x(op, *args):
        request(w.srv, w.sci, m.DeleteMessage([x]))
        reply = request(w.srv, w.sci, m.CommandMessage(op, args, {}, [x], False))
        assert type(reply) is m.OkReply, reply

    under_x("torch.mul", m.ObjectRef(w.d), 2.0)
    rid = w.pending(w.sci, x)
    ReviewQueue(w.srv).approve(rid)
    under_x("torch.add", m.ObjectRef(w.d), m.ObjectRef(w.d))
    assert w.pending(w.sci, x) != rid
    under_x("torch.mul", m.ObjectRef(w.d), 3.0)
    assert w.pending(w.sci, x) != rid
    assert ReviewQueue(w.srv).get(rid).state == "approved"


def test_a_batch_get_releases_nothing_unless_every_object_may_go(hook):
    """Attack (batch mixing): ``GetObjectsMessage([approved A, alias B of A's result, scientist's C])`` where B is
    the same stored tensor under a second id (an op that returns its input). Must hold: B waits for its own
    request, so nothing is released and A's approval is not used up."""
    w = Net(hook)
    a = w.cmd(w.sci, "torch.mul", m.ObjectRef(w.d), 3.0)
    ra = w.pending(w.sci, a)
    ReviewQueue(w.srv).approve(ra)
    b = w.cmd(w.sci, "Tensor.requires_grad_", m.ObjectRef(a), False)
    c = send_tensor(w.srv, w.sci, torch.ones(1))
    reply = request(w.srv, w.sci, m.GetObjectsMessage([a, b, c]))
    assert type(reply) is m.ErrorReply and reply.error == "ReviewPendingError", reply
    assert ReviewQueue(w.srv).get(ra).state == "approved"
