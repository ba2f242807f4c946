"""Red team, second pass over today's compat-surface fixes (search paging with a matching budget per page,
client-side listing bounds, ``MultiPointer.get(sum_results=True)``, ``register_attachment``): attacks on the new
code, as a hostile scientist paging a network worker's search or listing, and as a hostile worker answering an
honest scientist's ``sy.search`` / ``list_objects`` / ``PrivateGridNetwork.search``.

Already covered (not repeated): test_redteam_fresh_compat.py (one request's matching work, metadata and
descriptor counts a client keeps, non-string metadata, term counts, multi-pointer shapes, attachments) and
test_redteam_compat_surface.py (term bounds, other sessions' objects).

Holes found (strict xfails first, then fixed):
- a page's cursor (``next_after``, the last entry looked at) named whatever the page walked last, matched or
  not: an owner's object search and listing never describe (a non-tensor, a nested tensor) was handed to the
  scientist by id when a page ended on it (the matching budget lets the scientist's terms choose where a search
  page ends), and the budget charged such objects their description length times the terms: the page count
  told the length of a description the scientist may not see. Fixed: entries a listing never describes are
  skipped with the ownership filter (veil/workers/monitor.py ``owned_entries(listed=)``, handlers.py): never
  looked at, never a cursor, never charged.
- the matching budget charged an entry its tags and description scans only: 64 terms found among 64 tags of
  objects with no description were 64 Python steps each, charged 65 characters: a page ran to MAX_SCANNED
  (16384 objects, 0.34 s a request) on 1/16 of the budget. Fixed in veil/compat/search_terms.py: each term
  checked costs TERM_STEP_CHARS (256: such a page now takes 14 ms).
- a page described up to 1024 objects whatever their descriptions: a session's 256 objects with 1 MiB
  descriptions made every 50-byte search or listing request encode a 256 MiB reply (2.5 s, the whole reply in
  memory). Fixed in veil/workers/listing.py: a page ends once it described MAX_PAGE_META_CHARS characters of
  tags and descriptions (the client follows the pages; results unchanged).
- one object a session sent could carry any description or tag count (256 MiB in one request): a page
  describes at least one object whole, so each search request encoded all of it again. Fixed: a scientist's
  sent object holds at most MAX_OBJECT_META_CHARS (1 Mi) characters of tags and description (listing.py
  ``check_sent_meta``, called from monitor.store_objects; a peer's carry the owner's as they were).
- the client counted a tag as its characters only: a hostile worker's descriptors with thousands of empty tags
  each were kept, 8 bytes apiece, with nothing counted. Fixed: a tag counts at least TAG_CHARS characters.
- the client followed up to 4096 pages whatever they took: a hostile worker answering each page just inside
  the reply timeout (120 s) held ``sy.search`` / ``grid.search`` for 136 hours. Fixed: a listing ends in one
  line past MAX_LISTING_SECONDS.
- a pointer's printout showed the tags and description a worker chose as they were: newlines and ANSI escapes
  in them printed a fake ``[PointerTensor ...]`` line (or moved the cursor) in the scientist's console. Fixed in
  veil/tensors/pointer.py and handle.py: unprintable characters are escaped (``veil.exceptions.escaped``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import serialize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_listings import follow_pages, paging_worker  # noqa: E402
from server_sessions import open_session, quota_worker, request, send_tensor  # noqa: E402

TOKEN = "rt-compat-second-token"
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_size_cache")]


def _worker(hook, wid):
    srv = quota_worker(hook, wid, TOKEN, None)
    return srv, open_session(srv, TOKEN)


def _nested():
    return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])


# ------------------------------------------------------------------------------------------ holes


@pytest.mark.parametrize("kind", ["search", "list"])
def test_a_page_cursor_never_names_an_object_the_listing_does_not_describe(hook, monkeypatch, kind):
    """Attack: the owner holds an object search and listing never describe (a nested tensor: no shape, no
    pointer), first in store order. The scientist pages a search whose terms make a page end right after it
    when its description is long (the matching budget, here lowered to 50), or a listing whose pages end at
    MAX_SCANNED (lowered to 1): page 1's ``next_after`` was that object's id. Must hold: no page's descriptors
    or cursor name it, every pointable object is still found once, and the page count does not depend on the
    hidden description's length."""
    from veil.compat import search_terms
    from veil.workers import listing

    if kind == "search":
        monkeypatch.setattr(search_terms, "PAGE_MATCH_BUDGET", 50)
    else:
        monkeypatch.setattr(listing, "MAX_SCANNED", 1)
    counts = []
    for length in (10, 100_000):
        srv, s = _worker(hook, f"rt-cs2-cursor-{kind}-{length}")
        hidden = srv.load(_nested(), tags=("#h",), description="h" * length, private=True)
        shown = srv.load(torch.ones(2), tags=("#v",), description="visible", private=True)
        mine = [send_tensor(srv, s, torch.ones(1), ("#v",), "mine") for _ in range(3)]
        ask = (lambda after: m.SearchMessage(["#v", "i"], after)) if kind == "search" else m.ListObjectsMessage
        pages = follow_pages(srv, s, ask)
        named = [oid for ids, cursor in pages for oid in ids + [cursor]]
        assert hidden not in named, "a page cursor handed out the id of an object the listing never describes"
        found = [oid for ids, _ in pages for oid in ids]
        assert found == ([shown] + mine if kind == "search" else mine), found
        counts.append(len(pages))
    assert counts[0] == counts[1], f"the page count follows a hidden description's length: {counts}"


@pytest.mark.parametrize("kind", ["search", "list"])
def test_one_page_reply_is_bounded_however_long_the_descriptions(hook, kind):
    """Attack: the session stores 24 objects with 1 MiB descriptions once, then asks search (or list_objects)
    pages: each 50-byte request made the worker describe all of them in one reply (24 MiB here; 256 objects:
    256 MiB and 2.5 s per request, every time). Must hold: one page's reply stays within a bound of a few MiB,
    and following the pages still finds every object once."""
    srv, s = _worker(hook, f"rt-cs2-reply-{kind}")
    text = "d" * ((1 << 20) - 64)  # (just within what one sent object may hold)
    mine = [send_tensor(srv, s, torch.ones(1), ("#big",), text) for _ in range(24)]
    ask = (lambda after: m.SearchMessage(["#big"], after)) if kind == "search" else m.ListObjectsMessage
    raw = srv.serve_bytes(serialize(ask(None), sender="client"), s)
    assert len(raw) <= 8 << 20, f"one page's reply was {len(raw) >> 20} MiB"
    found = [oid for ids, _ in follow_pages(srv, s, ask) for oid in ids]
    assert found == mine


@pytest.mark.parametrize("metadata", ["description", "tags"])
def test_one_sent_objects_metadata_is_bounded(hook, metadata):
    """Attack: one object the session sends with a 2 MiB description (or 300 000 one-character tags; a 256 MiB
    request could hold 256 MiB of them): every page describes at least one object whole, so each 50-byte search
    made the worker encode all of it again. Must hold: refused in one line when sent (nothing stored), an
    ordinary description of 64 Ki characters accepted, and the owner's own long description still described."""
    srv, s = _worker(hook, f"rt-cs2-sent-meta-{metadata}")
    owner = srv.load(torch.ones(2), tags=("#m",), description="o" * (2 << 20), private=True)
    tags, text = (("#m",) + ("t",) * 300_000, "") if metadata == "tags" else (("#m",), "d" * (2 << 20))
    reply = request(srv, s, m.ObjectMessage([m.StoredObject(new_id(), torch.ones(1), tags, text)]))
    assert type(reply) is m.ErrorReply and reply.error == "SerializationError" and "\n" not in reply.message, reply
    ordinary = send_tensor(srv, s, torch.ones(1), ("#m",), "d" * (64 << 10))
    found = [oid for ids, _ in follow_pages(srv, s, lambda after: m.SearchMessage(["#m"], after)) for oid in ids]
    assert found == [owner, ordinary], found


def test_a_hostile_workers_empty_tags_count_toward_the_listing_bound(hook, monkeypatch):
    """Attack (a worker answering ``sy.search``): pages of fresh descriptors, each with 1024 empty tags, never
    ending. The client counted tag characters only: 0 here, so it kept 2^18 descriptors of 1024 tags each
    (8 bytes apiece: 2 GiB) before its descriptor bound. Must hold: a tag counts toward the listing's metadata
    bound whatever its length (here lowered to 4 Mi, pages of 256 descriptors: 2 Mi each); the client stops in
    one line within a few pages."""
    from veil.workers import listing

    monkeypatch.setattr(listing, "MAX_LISTING_META_CHARS", 4 << 20)
    served = []
    tags = ("",) * 1024
    empty_tags = paging_worker(hook, "rt-cs2-empty-tags", lambda: m.DescriptorsReply(
        [m.Descriptor(new_id(), (1,), "float32", False, tags, "") for _ in range(256)], new_id()), served)
    with pytest.raises(sy.exceptions.ObjectNotFoundError) as refused:
        sy.search(empty_tags, "#x")
    assert len(served) <= 4 and "\n" not in str(refused.value), (len(served), refused.value)


def test_a_hostile_worker_cannot_hold_a_listing_for_hours(hook, monkeypatch):
    """Attack (a worker answering ``grid.search``): every page is one fresh descriptor and a fresh cursor,
    answered just inside the client's reply timeout (120 s): the client followed MAX_PAGES = 4096 of them,
    136 hours. Must hold: a listing ends in one line once it has run MAX_LISTING_SECONDS (here lowered to
    0.3 s, pages taking 0.05 s): a few pages, not thousands."""
    from veil.workers import listing

    bound = getattr(listing, "MAX_LISTING_SECONDS", None)  # (checked last: the attack is seen first)
    monkeypatch.setattr(listing, "MAX_LISTING_SECONDS", 0.3, raising=False)
    served = []
    slow = paging_worker(hook, "rt-cs2-slow", lambda: m.DescriptorsReply(
        [m.Descriptor(new_id(), (1,), "float32", False, (), "")], new_id()), served, most=40, pause=0.05)
    with pytest.raises(sy.exceptions.ObjectNotFoundError) as refused:
        sy.PrivateGridNetwork(slow).search("#x")
    assert len(served) <= 12 and "\n" not in str(refused.value) and "within" in str(refused.value), (
        len(served), refused.value)
    assert bound is not None and bound <= 1800, bound  # (minutes, whatever the worker does)


@pytest.mark.parametrize("field", ["description", "tags"])
def test_a_workers_metadata_cannot_fake_lines_in_a_pointers_printout(hook, field):
    """Attack (a worker answering ``sy.search``): a description (or a tag) holding a newline, an ANSI escape
    and a bidi override, printed as they were by ``print(ptr)``: a fake ``[PointerTensor ...]`` line, a cleared
    screen. Must hold: the printout is the head line plus one line per field, with no control character."""
    from veil.workers.virtual import VirtualWorker

    fake = "ok\n[PointerTensor | me:1 -> bob:2]\x1b[2J\u202etxt"

    class Decorated(VirtualWorker):
        def _handle(self, msg, sender):
            if type(msg) is not m.SearchMessage:
                return super()._handle(msg, sender)
            d = m.Descriptor(new_id(), (2,), "float32", False, ("#x", fake) if field == "tags" else ("#x",),
                             fake if field == "description" else "plain")
            return m.DescriptorsReply([d], None)

    (ptr,) = sy.search(Decorated(hook, id=f"rt-cs2-ansi-{field}"), "#x")
    for shown in (repr(ptr), str(ptr), f"{ptr}"):
        lines = shown.split("\n")
        assert len(lines) == 4 and lines[0].startswith("[PointerTensor") and "[PointerTensor" not in "".join(
            lines[1:]).replace("\\n[PointerTensor", ""), shown
        assert not any(c in shown for c in "\x1b\u202e\r"), shown
        assert "\\n" in shown and "\\x1b" in shown, shown
    assert getattr(ptr, field) == (fake if field == "description" else ("#x", fake))  # the value itself kept


def test_each_term_checked_counts_toward_a_pages_budget(hook, monkeypatch):
    """Attack: objects of the session with 64 tags and no description, searched with those 64 tags and one
    that matches none: each object cost 64 Python steps of term checks but was charged 65 characters (its tags),
    so a page ran to MAX_SCANNED (16384 objects: 0.34 s a request) on 1/16 of the budget. Must hold: a term
    check counts at least TERM_STEP_CHARS, so a page walks at most budget / (64 x that) objects (here with the
    budget lowered to 2^16: a few, not all 512)."""
    from veil.compat import search_terms

    monkeypatch.setattr(search_terms, "PAGE_MATCH_BUDGET", 1 << 16)
    srv, s = _worker(hook, "rt-cs2-term-steps")
    tags = tuple(f"t{i:03d}" for i in range(64))
    batch = [m.StoredObject(new_id(), torch.ones(1), tags, "") for _ in range(512)]
    assert type(request(srv, s, m.ObjectMessage(batch))) is m.OkReply
    reply = request(srv, s, m.SearchMessage(list(tags[:63]) + ["none"]))
    assert reply.descriptors == [] and reply.next_after is not None, reply
    walked = [so.id for so in batch].index(reply.next_after) + 1
    assert walked <= 20, f"one page checked 64 terms against {walked} objects"
    found = [oid for ids, _ in follow_pages(srv, s, lambda after: m.SearchMessage(list(tags), after)) for oid in ids]
    assert found == [so.id for so in batch]


# ------------------------------------------------------------------------- attacks that hold


def test_a_cursor_the_session_may_not_list_reads_as_a_deleted_one(hook):
    """An ``after=`` naming the owner's object search never describes, another session's object, or no object:
    the same one-line refusal (ListingCursorGoneError) for each, and the worker keeps serving."""
    srv, s = _worker(hook, "rt-cs2-cursor-gone")
    hidden = srv.load(_nested(), tags=("#h",), description="hidden", private=True)
    other = open_session(srv, TOKEN)
    theirs = send_tensor(srv, other, torch.ones(1), ("#t",), "theirs")
    messages = set()
    for after in (hidden, theirs, new_id()):
        for msg in (m.SearchMessage([], after), m.ListObjectsMessage(after)):
            reply = request(srv, s, msg)
            assert type(reply) is m.ErrorReply and reply.error == "ListingCursorGoneError", reply
            messages.add(reply.message.replace(str(after), "ID"))
    assert len(messages) == 1, messages
    assert [d.id for d in request(srv, other, m.SearchMessage(["#t"])).descriptors] == [theirs]


def test_pages_neither_skip_nor_repeat_objects_removed_and_added_between_them(hook, monkeypatch):
    """The session's objects deleted (the next cursor's own among them) and stored between pages of a search
    the client follows (``every_page``, a restart when the cursor left): every object present from start to end
    is listed exactly once, one deleted before its page never, and the listing ends."""
    from veil.compat import search_terms
    from veil.exceptions import error_from_reply
    from veil.workers import listing

    monkeypatch.setattr(search_terms, "PAGE_MATCH_BUDGET", 2)
    srv, s = _worker(hook, "rt-cs2-churn")
    gone = [send_tensor(srv, s, torch.ones(1), ("#c",), "gone") for _ in range(4)]  # (store order: gone first)
    kept = [send_tensor(srv, s, torch.ones(1), ("#c",), "kept") for _ in range(6)]
    asked = []

    def ask(after):
        asked.append(after)
        if len(asked) == 3:  # between pages: the cursor's object and others leave, one arrives
            assert after in gone, (after, gone)
            assert type(request(srv, s, m.DeleteMessage(gone))) is m.OkReply
            kept.append(send_tensor(srv, s, torch.ones(1), ("#c",), "new"))
        reply = request(srv, s, m.SearchMessage(["#c"], after))
        if type(reply) is m.ErrorReply:
            raise error_from_reply(reply.error, reply.message)
        return reply

    found = [d.id for d in listing.every_page(ask)]  # (a page is one entry: the 3rd asks after gone[1])
    listed_before = gone[:2]  # (listed before they left: kept, as any listing of a changing store would)
    assert sorted(found) == sorted(kept + listed_before) and len(found) == len(set(found)), (found, kept)
    assert asked.count(None) == 2, asked  # the cursor left: one restart
