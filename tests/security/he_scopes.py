"""What the CKKS context-scope red teams share (test_redteam_he_context_scope.py and its second pass): a network
worker in process with two scientist sessions, the owner's admin session and a peer's; a fresh key pair; a
ciphertext that names its context without carrying it; and a store's answer in one line."""

from __future__ import annotations

import torch

import veil as sy
from veil.he import ckks
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.websocket_server import WebsocketServerWorker

from server_sessions import open_session

SCI_A, SCI_B, ADM, PEER = "ctx-scope-sci-a-token", "ctx-scope-sci-b-token", "ctx-scope-adm-token", "ctx-scope-peer-tk"
X = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
#: what a tensor naming a context its session does not hold is refused with
REFUSED = "refers to a context"


class ScopedWorker:
    """A network worker with two scientist sessions (A, B), the owner's admin session and a peer's."""

    def __init__(self, hook, name="ctx-scope"):
        tokens = sy.TokenTable()
        for tok, user, role in [(SCI_A, "alice", "scientist"), (SCI_B, "bob", "scientist"), (ADM, "owner", "admin"),
                                (PEER, "peer-w", "peer")]:
            tokens.add(tok, user, role)
        self.srv = WebsocketServerWorker(hook, id=f"{name}-{new_id() % 10**6}", port=0, tokens=tokens)
        self.a, self.b, self.adm, self.peer = (open_session(self.srv, t) for t in (SCI_A, SCI_B, ADM, PEER))

    def store(self, session, *objs, sender="client"):
        """The reply to storing ``objs`` for ``session`` (``sender``: the frame's; a peer names an account)."""
        msg = m.ObjectMessage([m.StoredObject(new_id(), o) for o in objs])
        return deserialize(self.srv.serve_bytes(serialize(msg, sender=sender), session))[0]


def key_pair(**kw):
    """A fresh CKKS context holding its secret key."""
    return ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False, **kw)


def naming(ctx):
    """A ciphertext under ``ctx``'s public keys, sent without its context (it names them by digest)."""
    return ckks.encrypt(X, ctx.public())


def store_answer(reply) -> str:
    """``"loaded"``, or the one-line refusal's message."""
    if type(reply) is m.OkReply:
        return "loaded"
    assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply
    return reply.message
