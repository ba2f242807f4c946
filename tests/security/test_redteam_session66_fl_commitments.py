"""Red team (session 66): ``veil.fl.check_commitments`` (``veil/federated/he_commitments.py``), the worker function an
aggregating client of an encrypted FedAvg round runs on what it was handed: one flag per client, 1 when the
ciphertext is not one, is not of the round's form or does not match its commitment.

Any scientist at a worker may run it with arguments of its choice: up to ``MAX_CLIENTS`` (10^5) entries, each naming a
stored object, and a form. Hole found (resources): the per-entry work was the *object's*, not the entry's. The form
check (``form_of``) reads every segment's ciphertexts of a CKKS tensor (TenSEAL hands each back as a copy) and ran for
every entry, so one 32-segment ciphertext the scientist stored, named 10^5 times with a form, held the worker's turn
(every other session's commands) for ~50 s in one request, past ``--max-command-seconds`` (the loop had no
checkpoint). Fixed in the function: what an object costs to look at (its form, its encoding's digest) is paid once per
distinct object, the rest per entry is one short hash, and the loop checkpoints (the command's deadline, other
sessions' turn) every few thousand entries.

Harness: a ``WebsocketServerWorker`` in process (requests through ``serve_bytes``, a network connection's path) with a
scientist token. Work is counted by calls (no wall-clock thresholds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.federated import he_commitments as hc
from veil.he import ckks
from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers import cancellation
from veil.workers.websocket_server import WebsocketServerWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import uid  # noqa: E402
from server_sessions import answers_next_command, open_session, request  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

SCI = "rt66c-scientist-token-0123456789abcdef01"
CHECK = "veil.fl.check_commitments"
ENTRIES = 20_000  # (the attack used 10^5; the per-entry work is what is counted)


@pytest.fixture(scope="module")
def key():
    return ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)


@pytest.fixture
def worker(hook, key):
    tokens = sy.TokenTable()
    tokens.add(SCI, "sci", "scientist")
    srv = WebsocketServerWorker(hook, id=uid("rt66c"), port=0, tokens=tokens)
    s = open_session(srv, SCI)
    ct = ckks.encrypt(torch.arange(4 * 4096, dtype=torch.float64).reshape(4, 4096) / 7, key.public())
    assert len(ct.segments) == 4
    oid = new_id()
    reply = request(srv, s, m.ObjectMessage([m.StoredObject(new_id(), key.public()), m.StoredObject(oid, ct)]))
    assert type(reply) is m.OkReply, reply
    return srv, s, ct, oid


def _flags(srv, s, *args) -> torch.Tensor:
    rid = new_id()
    reply = request(srv, s, m.CommandMessage(CHECK, args, {}, [rid], False))
    assert type(reply) is m.OkReply, reply
    got = request(srv, s, m.GetObjectsMessage([rid], False, None))
    assert type(got) is m.ObjectsReply, got
    return got.objects[0]


@pytest.fixture
def counted(monkeypatch):
    """Counts the per-object work of a check: forms read, encodings hashed, checkpoints passed."""
    calls = {"form": 0, "inner": 0, "checkpoint": 0}
    form_of, inner, checkpoint = hc.form_of, hc._inner, cancellation.checkpoint

    def counting(name, fn):
        def run(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return run

    monkeypatch.setattr(hc, "form_of", counting("form", form_of))
    monkeypatch.setattr(hc, "_inner", counting("inner", inner))
    monkeypatch.setattr(cancellation, "checkpoint", counting("checkpoint", checkpoint))
    return calls


@pytest.mark.parametrize("form_matches", [True, False])
def test_one_ciphertext_named_by_every_entry_is_looked_at_once(worker, counted, form_matches):
    """Attack: the scientist names its one 4-segment ciphertext in all 20 000 entries, with the round's form (each
    entry then hashed against its commitment) or with another scale (each entry refused by its form). Before the fix
    the form was read, every segment copied, per entry (20 000 times; 10^5 entries of a 32-segment ciphertext held the
    worker's turn ~50 s). Must hold: the form is read and the encoding hashed at most once for the request, the loop
    checkpoints between slices, and the flags are the honest ones (entry 0's commitment is the true one: flag 0; every
    other entry's is zeros: flag 1; a wrong form: all 1); the worker then serves the next command."""
    srv, s, ct, oid = worker
    form = hc.form_of(ct)
    if not form_matches:
        form = [*form[:3], hc.ckks_scale_name(2.0)]
    digests = torch.zeros(ENTRIES, hc.DIGEST_BYTES, dtype=torch.uint8)
    digests[0] = hc.as_tensor(hc.commitment("round-1", "c0", ct))
    clients = ["c0"] + [f"c{k}" for k in range(1, ENTRIES)]
    counted.update(form=0, inner=0, checkpoint=0)
    flags = _flags(srv, s, "round-1", clients, [m.ObjectRef(oid)] * ENTRIES, digests, form)
    want = torch.ones(ENTRIES, dtype=torch.uint8)
    if form_matches:
        want[0] = 0
    assert torch.equal(flags, want)
    assert counted["form"] <= 1 and counted["inner"] <= 1, (
        f"one ciphertext named {ENTRIES} times: its form read {counted['form']} times, its encoding hashed "
        f"{counted['inner']} times (each read copies every segment's ciphertexts)")
    assert counted["checkpoint"] >= ENTRIES // 4096, "the check never hands the turn over nor checks its deadline"
    answers_next_command(srv, s)


def test_distinct_objects_are_each_checked_as_before(worker, key, counted):
    """Control: entries naming distinct objects (a ciphertext, a plain tensor, a second ciphertext under the same
    key) get the flags the commitments say, each object looked at once; without a form too."""
    srv, s, ct, oid = worker
    other = ckks.encrypt(torch.ones(8, dtype=torch.float64), key.public())
    plain, second = new_id(), new_id()
    reply = request(srv, s, m.ObjectMessage([m.StoredObject(plain, torch.ones(3)), m.StoredObject(second, other)]))
    assert type(reply) is m.OkReply, reply
    digests = torch.stack([hc.as_tensor(hc.commitment("r", "a", ct)), hc.as_tensor(hc.commitment("r", "b", ct)),
                           hc.as_tensor(hc.commitment("r", "c", other)), hc.as_tensor(hc.commitment("r", "d", other))])
    refs = [m.ObjectRef(oid), m.ObjectRef(oid), m.ObjectRef(plain), m.ObjectRef(second)]
    counted.update(form=0, inner=0, checkpoint=0)
    # b's entry names a's ciphertext under b's id: its commitment was made for b, so it matches; c's names a tensor
    assert torch.equal(_flags(srv, s, "r", ["a", "b", "c", "d"], refs, digests), torch.tensor([0, 0, 1, 0],
                                                                                             dtype=torch.uint8))
    assert counted["inner"] == 2  # (the two ciphertexts; the tensor is no ciphertext: never hashed)
    assert torch.equal(_flags(srv, s, "r", ["a", "b", "c", "d"], refs, torch.zeros(4, 32, dtype=torch.uint8)),
                       torch.ones(4, dtype=torch.uint8))
    answers_next_command(srv, s)
