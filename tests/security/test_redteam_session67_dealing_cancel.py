"""Red team (session 67): a crypto provider's dealing for a session that disconnected.

Attack: a session asks the provider for a big dealing (many items, or big ones) and disconnects at once. The
connection cancels its command's token, but the recipe dealing (``worker_dealer._deal_scoped``: the seeded
``dealing_recipe._corrections`` and the unseeded loop) never looked at it: the material of every item was made for
nobody, holding the provider's one dealing slot all along, and every other session's dealing waited behind it
(a comparison dealing and a party's expansion already checked between items).

Must hold: the dealing stops at the next item once its session is gone (a one-line CommandCancelledError, nothing
of the dealing quoted), gives the dealing slot and its parties' slots up, and the provider goes on dealing for the
other sessions.
"""

from __future__ import annotations

import pytest

from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.mpc.providers import dealing_recipe, worker_dealer
from veil.workers import cancellation

from server_sessions import open_session, quota_worker, request  # noqa: E402

TOKEN = "rt67-dealing-cancel-mallory-0123456789abcdef"
BOB = "rt67-dealing-cancel-bob-0123456789abcdef"
ITEMS = 64
SPEC = ("mul", (4,), (4,), {})  # a Beaver item: a, b uniform, c = a * b derived


def _worker(hook):
    srv = quota_worker(hook, f"rt67-cancel-{new_id() % 10**9}", TOKEN, None)
    srv.tokens.add(BOB, "bob", "scientist")
    return srv


class _Parties:
    """The provider's peers, in process: every message is answered at once, and counted."""

    def __init__(self) -> None:
        self.messages = 0

    def resolve(self, pid):
        return pid

    def send(self, msg, party):
        self.messages += 1
        return m.OkReply()


def _deal(count: int, seeded: bool) -> m.CommandMessage:
    ids = [[new_id() for _ in range(3 * count)] for _ in range(2)]
    return m.CommandMessage(worker_dealer.DEAL, ("beaver", SPEC, ["p0", "p1"], ids, count, seeded), {}, [], False)


def _cancelled_at_first_field(monkeypatch, seeded: bool, token: cancellation.CancelToken) -> list:
    """Counts the uniform fields the dealing makes; the session disconnects as the first one is made."""
    made: list = []
    module, name = (dealing_recipe, "expand_sum") if seeded else (worker_dealer, "random_ring")
    real = getattr(module, name)

    def field(*args, **kwargs):
        made.append(1)
        token.cancel("session mallory disconnected")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, field)
    return made


@pytest.mark.parametrize("seeded", [True, False])
def test_a_dealing_whose_session_disconnected_stops_and_frees_the_slot(hook, monkeypatch, seeded):
    srv = _worker(hook)
    parties = _Parties()
    monkeypatch.setattr(srv, "resolve_worker", parties.resolve)
    monkeypatch.setattr(srv, "send_msg", parties.send)
    mallory = open_session(srv, TOKEN)
    token = cancellation.CancelToken(seconds=None)
    made = _cancelled_at_first_field(monkeypatch, seeded, token)

    reply = deserialize(srv.serve_bytes(serialize(_deal(ITEMS, seeded), sender="client"), mallory, token))[0]

    assert type(reply) is m.ErrorReply and reply.error == "CommandCancelledError", reply
    assert "\n" not in reply.message and "disconnected" in reply.message, reply.message
    # at most the item it was making when it noticed (two uniform fields), not ITEMS items for nobody
    assert len(made) <= 2, f"the cancelled dealing made {len(made)} fields of {2 * ITEMS}"
    slot = srv.__dict__.get("_veil_dealing_slot")
    assert slot is None or slot.try_take(), "the cancelled dealing still holds the provider's dealing slot"
    if slot is not None:
        slot.release()

    monkeypatch.undo()  # the provider deals on for another session, to the same parties
    monkeypatch.setattr(srv, "resolve_worker", parties.resolve)
    monkeypatch.setattr(srv, "send_msg", parties.send)
    before = parties.messages
    bob = open_session(srv, BOB)
    assert type(request(srv, bob, _deal(4, seeded))) is m.OkReply
    assert parties.messages - before == 2  # each party its part


def test_a_dealing_of_a_live_session_is_unaffected(hook, monkeypatch):
    """Guard: the checks between items cost an honest dealing nothing: every item is made and sent."""
    srv = _worker(hook)
    parties = _Parties()
    monkeypatch.setattr(srv, "resolve_worker", parties.resolve)
    monkeypatch.setattr(srv, "send_msg", parties.send)
    made: list = []
    real = dealing_recipe.expand_sum
    monkeypatch.setattr(dealing_recipe, "expand_sum", lambda *a, **k: made.append(1) or real(*a, **k))
    assert type(request(srv, open_session(srv, TOKEN), _deal(ITEMS, True))) is m.OkReply
    assert len(made) == 2 * ITEMS and parties.messages == 2
