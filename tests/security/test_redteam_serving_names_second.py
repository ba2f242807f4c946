"""Red team, second pass: serving names per user and bounded listing pages (85195cc).

The attackers: a scientist who squats a service name (pinned with ``@OWNER/NAME``, or plain); a session that
pages through its many objects (or names another session's object as its page cursor); a hostile worker
answering a client's listing with pages that never end or never shrink; an old client of the wire format.

Found here, and fixed (each test asserts the safe behaviour; each failed on the code before):
- a pinned name was split at its *first* ``/``, while principal names may hold ``/`` (``--user lab/alice=...``):
  user ``lab`` opening ``alice/model`` was what ``@lab/alice/model`` found, so the user before the slash
  got the queries a client pinned to ``lab/alice``. A pinned name now splits at its last ``/``: it names
  exactly one (owner, name), and only that owner can open it;
- ``open`` refused only a name starting with a plain ``@``: a scientist could open ``＠alice/model``
  (fullwidth) or `` @alice/model``, which a client reads as pinned to alice. A service name that reads as
  pinned once folded (NFKC, spaces and invisible characters dropped) is refused;
- a client that connected by a plain name (``ModelClient``'s default) resolved it again at every query: while
  its owner's service was closed (the owner's connection dropped, before it opened again) its next query's
  input shares went to whichever other user had opened that name to it too. A worker's ``info`` now names the
  service's owner and the client pins ``@OWNER/NAME`` once connected (``names.pinned``): the query fails;
- every listing page walked all the sender's objects through the Python ownership filter to find its
  ``after=`` cursor: a page cost the whole store, so listing N objects cost N^2/1024 filter steps inside the
  worker's turn (200 000 tiny tensors: 2 s a page, 206 s in all). A page now finds its cursor in the store's
  snapshot at C speed and filters only what it walks (``listing.visible_after``);
- the client followed a worker's pages without checking them: a hostile worker answering ``next_after`` with
  the same cursor kept it asking MAX_PAGES (4096) times, pages of any size were gathered, and a page that was
  none (an unhashable id, another reply) failed as a bare TypeError/AttributeError. A page longer than
  MAX_LISTED or malformed, or a cursor that comes back, now ends the listing in one line; so do endless
  restarts (past MAX_RESTARTS).

Held (tested, so a regression fails): a page cursor naming another session's object reads exactly as a deleted
one; a client of the wire format before pages (no ``after``) gets one clear line, and the worker serves on.
"""

from __future__ import annotations

import msgpack
import pytest
import torch

import veil as sy
from veil.exceptions import ObjectNotFoundError, VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging import serde
from veil.serving import protocol
from veil.workers import listing
from veil.workers.principals import Principal

from test_redteam_serving_names import INFO, _error, _workers  # noqa: E402  (one harness for both passes)


# ------------------------------------------------------------------ pinned names


def test_a_pinned_owner_with_a_slash_in_its_name_is_not_served_by_the_user_before_the_slash(hook):
    party, client = _workers(hook, "party", "client")
    tag = new_id() % 10**9
    lab, lab_alice = (sy.VirtualWorker(hook, id=f"lab{tag}"), sy.VirtualWorker(hook, id=f"lab{tag}/alice"))
    protocol.call(lab, party, "open", "alice/model", [client.id], {**INFO, "max_rows": 2})  # squats first
    protocol.call(lab_alice, party, "open", "model", [client.id], INFO)
    pinned = f"@{lab_alice.id}/model"  # (in-process, a worker's user is its id)
    assert protocol.call(client, party, "info", pinned)[0]["max_rows"] == 4  # lab/alice's model
    rid, x = new_id(), torch.tensor([[4, -1, 9]], dtype=torch.int64)
    protocol.call(client, party, "submit", pinned, rid, x)
    assert protocol.call(lab, party, "pending", "alice/model") == []  # the squatter got nothing
    assert [r[0] for r in protocol.call(lab_alice, party, "pending", "model")] == [rid]


@pytest.mark.parametrize("lookalike", ["\uff20{owner}/model", " @{owner}/model", "\u200b@{owner}/model",
                                       "\ufe6b{owner}/model"])
def test_a_name_that_reads_as_pinned_cannot_be_opened(hook, lookalike):
    party, alice, squatter, client = _workers(hook, "party", "alice", "squatter", "client")
    name = lookalike.format(owner=alice.id)
    error = _error(lambda: protocol.call(squatter, party, "open", name, [client.id], INFO))
    assert "may not start with" in error
    nobody = _error(lambda: protocol.call(client, party, "info", name))
    assert "may not query" in nobody


def test_pinned_name_variants_never_reach_another_users_service(hook):
    party, alice, client = _workers(hook, "party", "alice", "client")
    protocol.call(alice, party, "open", "model", [client.id], INFO)
    assert protocol.call(client, party, "info", f"@{alice.id}/model")[0]["max_rows"] == 4
    for variant in (f"@{alice.id.upper()}/model", f"@{alice.id} /model", f"@{alice.id}/model ",
                    f"@{alice.id}//model", f"@/{alice.id}/model", f"@{alice.id}/MODEL", "@/model", "@model"):
        assert "may not query" in _error(lambda: protocol.call(client, party, "info", variant)), variant


def test_a_connected_client_is_not_handed_to_a_squatter_while_its_owners_service_is_closed(hook, monkeypatch):
    from veil.serving.client import ModelClient
    from veil.serving.cluster import Cluster, NetworkWorker
    from veil.serving.errors import ServiceClosedError

    p1, p2, cp, alice, squatter = _workers(hook, "p1", "p2", "cp", "alice", "squatter")
    me = hook.local_worker.id  # (the client's user in-process: its local worker's id)
    info = {**INFO, "output_shape": [1, 3], "base": 2, "precision_fractional": 8, "parties": [p1.id, p2.id]}
    for party in (p1, p2):
        protocol.call(alice, party, "open", "model", [me], info)
    cluster = Cluster(*(NetworkWorker(f"127.0.0.1:{9 + i}", id=w.id) for i, w in enumerate((p1, p2))),
                      crypto_provider=NetworkWorker("127.0.0.1:11", id=cp.id), client_token="client-token",
                      owner_user=alice.id)
    monkeypatch.setattr(Cluster, "connect", lambda self, hook_, token, workers=None, timeout=0: [p1, p2])
    client = ModelClient(hook=hook).connect_to_model((1, 3), (1, 3), cluster)  # (the plain name: alice's)
    assert client.info["owner"] == alice.id and client.service == f"@{alice.id}/model"
    for party in (p1, p2):  # a scientist opens the name too (second), and alice's connection drops
        protocol.call(squatter, party, "open", "model", [me], info)
        protocol.drop_session(party, alice.id)
    with pytest.raises(ServiceClosedError):
        client.submit(torch.ones(1, 3))
    for party in (p1, p2):  # the client's input shares went to nobody else
        assert protocol.call(squatter, party, "pending", "model") == []
    client.parties = []  # (in-process parties: nothing to close)


# ------------------------------------------------------------------ listing pages on the worker


def _store_tiny(sender, worker, count: int) -> list[int]:
    ids = [new_id() for _ in range(count)]
    sender.send_msg(m.ObjectMessage([m.StoredObject(oid, torch.zeros(1)) for oid in ids]), worker)
    return ids


def test_a_page_after_a_cursor_walks_only_its_own_page_of_the_store(hook, monkeypatch):
    monkeypatch.setattr(listing, "MAX_LISTED", 10)
    (worker,), scientist = _workers(hook, "walk_host"), hook.local_worker
    ids = _store_tiny(scientist, worker, 400)
    walked = []
    owned_entries = worker.monitor.owned_entries

    def counting(*args, **kwargs):
        for item in owned_entries(*args, **kwargs):
            walked.append(item[0])
            yield item

    monkeypatch.setattr(worker.monitor, "owned_entries", counting)
    page = scientist.send_msg(m.ListObjectsMessage(ids[300]), worker)
    assert [d.id for d in page.descriptors] == ids[301:311] and page.next_after == ids[310]
    assert len(walked) <= 11, len(walked)  # (the page and one look past it), not the 400 objects


def test_a_cursor_naming_another_sessions_object_reads_as_a_deleted_one(hook):
    (worker,) = _workers(hook, "iso_host")
    tag = new_id() % 10**9
    eve, victim = sy.VirtualWorker(hook, id=f"eve{tag}"), sy.VirtualWorker(hook, id=f"victim{tag}")
    for w in (eve, victim):  # (as on a network worker: each session sees its own namespace only)
        worker._principals[w.id] = Principal(w.id, w.id, namespace=w.id, isolated=True)
    theirs = _store_tiny(victim, worker, 3)
    shared = _store_tiny(hook.local_worker, worker, 2)  # (a non-isolated principal's: in the shared namespace)
    _store_tiny(eve, worker, 2)
    for message in (m.ListObjectsMessage, lambda after: m.SearchMessage([], after)):
        for other in (theirs[0], shared[0]):
            nobody = new_id()
            held = _error(lambda: eve.send_msg(message(other), worker))
            free = _error(lambda: eve.send_msg(message(nobody), worker))
            assert held.replace(str(other), "N") == free.replace(str(nobody), "N"), (held, free)
    assert sorted(d.id for d in victim.send_msg(m.ListObjectsMessage(), worker).descriptors) == sorted(theirs)


def test_a_client_of_the_wire_format_before_pages_gets_one_line_and_the_worker_serves_on(hook):
    old = msgpack.packb([serde.WIRE_VERSION, m.ListObjectsMessage.TYPE, "old-client", []], use_bin_type=True)
    with pytest.raises(VeilError, match="takes 1 fields, got 0") as caught:
        serde.deserialize(old)
    assert "\n" not in str(caught.value)
    (worker,), scientist = _workers(hook, "old_host"), hook.local_worker
    ids = _store_tiny(scientist, worker, 2)
    assert sorted(d.id for d in worker.list_objects()) == sorted(ids)


# ------------------------------------------------------------------ a hostile worker's pages, on the client


class _Asked:
    """A worker that answers every page with ``answer(after)``; counts the pages asked."""

    def __init__(self, answer):
        self.answer, self.count = answer, 0

    def __call__(self, after):
        self.count += 1
        return self.answer(after)


def _descriptor(oid: int) -> m.Descriptor:
    return m.Descriptor(oid, (1,), "float32")


def test_a_worker_whose_cursor_comes_back_ends_the_listing_at_once():
    asked = _Asked(lambda after: m.DescriptorsReply([_descriptor(1)], 7))
    with pytest.raises(ObjectNotFoundError, match="does not advance") as caught:
        listing.every_page(asked)
    assert "\n" not in str(caught.value) and asked.count <= 2


@pytest.mark.parametrize("reply", [
    m.DescriptorsReply([_descriptor(i) for i in range(listing.MAX_LISTED + 1)]),  # longer than a page
    m.DescriptorsReply([_descriptor([1, 2])]),  # an id that is no id (it failed as a bare TypeError)
    m.ObjectsReply([1]),  # no page at all (a bare AttributeError)
])
def test_a_worker_that_answers_a_malformed_page_is_refused_in_one_line(reply):
    with pytest.raises(ObjectNotFoundError, match="malformed listing page") as caught:
        listing.every_page(_Asked(lambda after: reply))
    assert "\n" not in str(caught.value)


def test_a_worker_that_keeps_losing_the_cursor_ends_the_listing_soon():
    def gone(after):
        if after is None:
            return m.DescriptorsReply([_descriptor(new_id())], new_id())
        raise listing.ListingCursorGoneError("gone")

    asked = _Asked(gone)
    with pytest.raises(ObjectNotFoundError, match="did not settle"):
        listing.every_page(asked)
    assert asked.count <= 200, asked.count  # (a few dozen restarts, not MAX_PAGES = 4096 round trips)


def test_honest_pages_are_all_followed():
    ids = [new_id() for _ in range(25)]
    pages = {None: (ids[:10], ids[9]), ids[9]: (ids[10:20], ids[19]), ids[19]: (ids[20:], None)}
    asked = _Asked(lambda after: m.DescriptorsReply([_descriptor(i) for i in pages[after][0]], pages[after][1]))
    assert [d.id for d in listing.every_page(asked)] == ids and asked.count == 3
