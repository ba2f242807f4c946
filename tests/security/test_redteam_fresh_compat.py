"""Red team (fresh eyes) of the PySyft 0.2 compatibility surface: grid search as a hostile scientist drives it
against a network worker (``worker.search``, ``sy.PrivateGridNetwork(...).search``, ``request_search``), as a
hostile worker answers it to a scientist, and the owner-side and client-side names that must keep the owner's
rules (``sy.search`` by the owner in process, search results' pointers, ``ptr.move``).

Already covered elsewhere (not repeated): the compat worker functions' oracles, quotas and roles, search term
bounds and other sessions' objects (test_redteam_compat_surface.py), plans (test_redteam_compat_plans.py), Ray
and the grid federation (test_redteam_ray_grid_compat.py).

Holes found (strict xfails first, then fixed):
- a search page's matching work had no bound but the term count: a session's own objects with 2 MB
  descriptions ending in 63 of the query's terms made each 16 KB search request hold the worker (on its event
  loop first: the inline lane) for 64 times their size in substring scans, 1.7 s per request for 64 MB of
  descriptions (no session quota by default). Fixed in veil/compat/search_terms.py: a term is looked for in a
  description's first 64 Ki characters, and a page ends at a budget of compared characters (the client
  follows the pages, so results are unchanged).
- a hostile worker answering a search (or a listing) could keep the client gathering pages of fresh
  descriptors with large descriptions up to MAX_PAGES x MAX_LISTED of them (4096 pages of any frame size:
  the scientist's process runs out of memory in ``grid.search``), and hand over descriptions and tags that are
  not strings. Fixed in veil/workers/listing.py: a listing keeps at most MAX_LISTING_META_CHARS characters of
  tags and descriptions and at most MAX_LISTING_ENTRIES (2^18) descriptors (4096 x 1024 pointers were 3 GB),
  and a page whose tags or description are not strings is malformed (one line).
- the term check deduplicated the whole query before counting it: 5M distinct short terms (a 39 MB frame) held
  the worker's turn 1.5 s (10 s on a busy box) before the refusal. Fixed in veil/compat/search_terms.py: at
  most 2^17 items, refused at the first term past the bounds.
- ``veil.hook.register_attachment`` listed a verb before checking it: one refused for a name torch defines
  stayed in ``ATTACHMENTS`` and every later ``sy.TorchHook(torch)`` in the process raised; a second function
  for a veil verb was listed and silently never attached. Fixed in veil/hook.py: checked before listing.
- ``x.send(bob, alice).get(sum_results=True)`` (PySyft's MultiPointerTensor) summed whatever the workers
  answered: a column of n from one and a row of n from the other broadcast to n x n in the scientist's
  process. Fixed in veil/compat/multi_pointer.py: the answers sum only when they have one shape.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_listings import follow_pages, paging_worker  # noqa: E402
from server_sessions import answers_next_command, open_session, quota_worker, request, send_tensor  # noqa: E402

TOKEN = "rt-fresh-compat-token"
OTHER = "rt-fresh-compat-other"
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("fresh_size_cache")]


def _worker(hook, wid, quota=None):
    srv = quota_worker(hook, wid, TOKEN, quota)
    srv.tokens.add(OTHER, "other", "scientist")
    return srv, open_session(srv, TOKEN)


def _all_pages(srv, s, query):
    """Every descriptor of a search, following its pages as ``veil.search`` does; (ids, pages)."""
    pages = follow_pages(srv, s, lambda after: m.SearchMessage(query, after))
    return [oid for ids, _ in pages for oid in ids], len(pages)


# ------------------------------------------------------------------------------------------ holes


@pytest.mark.parametrize("shape", ["long", "many"])
def test_one_search_request_holds_the_worker_a_bounded_time(hook, shape):
    """Attack: objects of the session whose descriptions end in 63 random 256-character terms (32 of 1 MB, or
    512 of 60 KB); then searches with those 63 terms and one that matches nothing. Every term but the last
    scans a whole description, for every object: each 16 KB request held the worker ~1.7 s (every other session
    waiting; on the event loop, every connection). Must hold: one request (one page) is a bounded amount of
    matching, however long or many the descriptions."""
    import secrets

    srv, s = _worker(hook, f"rt-fc-search-cpu-{shape}")
    terms = [secrets.token_hex(128) for _ in range(63)]
    # (1 MB: about what one sent object's tags and description may hold, listing.MAX_OBJECT_META_CHARS)
    filler, count = ("ab" * 500_000, 32) if shape == "long" else ("ab" * 22_000, 512)
    description = filler + "".join(terms)
    for _ in range(count):
        send_tensor(srv, s, torch.ones(1), (), description)
    worst = 0.0
    for _ in range(2):
        started = time.perf_counter()
        reply = request(srv, s, m.SearchMessage(terms + ["no-such-term"]))
        worst = max(worst, time.perf_counter() - started)
        assert type(reply) is m.DescriptorsReply and reply.descriptors == [], reply
    assert worst < 0.5, f"one search request held the worker {worst:.2f} s"
    answers_next_command(srv, s)


def test_a_hostile_worker_cannot_make_a_search_gather_unbounded_metadata(hook):
    """Attack (a worker answering the scientist's ``grid.search``): page after page of fresh descriptors, each
    with a 16 KiB description, never ending. The client kept asking up to 4096 pages of any frame size (its
    process runs out of memory). Must hold: the client stops in one line once the listing's tags and
    descriptions pass a bound, asking far fewer pages than the worker would serve."""
    served = []
    text = "d" * (16 << 10)
    evil = paging_worker(hook, "rt-fc-flooding", lambda: m.DescriptorsReply(
        [m.Descriptor(new_id(), (1,), "float32", False, ("#boston",), text) for _ in range(1024)], new_id()), served)
    with pytest.raises(sy.exceptions.ObjectNotFoundError) as refused:
        sy.PrivateGridNetwork(evil).search("#boston")
    assert len(served) <= 8, f"the client asked {len(served)} pages"
    assert "\n" not in str(refused.value) and "characters" in str(refused.value), refused.value


def test_a_hostile_worker_cannot_make_a_search_gather_millions_of_pointers(hook, monkeypatch):
    """Attack (a worker answering ``grid.search``): pages of 1024 fresh descriptors with no description, never
    ending: the client gathered up to 4096 x 1024 of them and made a pointer of each (~800 bytes and 20 us
    each: 3 GB and 80 s in the scientist's process from 120 MB of small frames). Must hold: a listing stops in
    one line past MAX_LISTING_ENTRIES descriptors (here lowered to 4096, so that the test is quick)."""
    from veil.workers import listing

    assert getattr(listing, "MAX_LISTING_ENTRIES", 1 << 30) <= 1 << 18
    monkeypatch.setattr(listing, "MAX_LISTING_ENTRIES", 4096, raising=False)
    served = []
    endless = paging_worker(hook, "rt-fc-endless", lambda: m.DescriptorsReply(
        [m.Descriptor(new_id(), (1,), "float32", False, (), "") for _ in range(1024)], new_id()), served)
    with pytest.raises(sy.exceptions.ObjectNotFoundError) as refused:
        sy.search(endless, "#boston")
    assert len(served) <= 5 and "\n" not in str(refused.value), (len(served), refused.value)


@pytest.mark.parametrize("field", ["description", "tags"])
def test_a_hostile_workers_search_reply_gives_no_non_string_metadata(hook, field):
    """A worker's search reply whose description (or a tag) is not a string (a tensor, a nested list): it rode
    into the scientist's pointers (``ptr.description``, sent on with the pointer). Must hold: refused in one
    line, as a malformed page."""
    from veil.workers.virtual import VirtualWorker

    class Odd(VirtualWorker):
        def _handle(self, msg, sender):
            if type(msg) is not m.SearchMessage:
                return super()._handle(msg, sender)
            odd = [[1, 2], [3]]
            d = m.Descriptor(new_id(), (1,), "float32", False, ("#x", odd) if field == "tags" else ("#x",),
                             odd if field == "description" else "")
            return m.DescriptorsReply([d], None)

    with pytest.raises(sy.exceptions.ObjectNotFoundError, match="malformed"):
        sy.search(Odd(hook, id=f"rt-fc-odd-{field}"), "#x")


def test_a_query_of_millions_of_distinct_terms_is_refused_before_it_is_deduplicated(hook):
    """Attack: ``grid.search(*terms)`` with millions of distinct short terms (5M in a 39 MB frame): the term check
    built a dict of all of them in the worker's turn before counting (1.5 s unloaded, 10 s on a busy box), then
    refused. Must hold: refused after reading a bounded number of terms (here: hashing at most MAX_TERMS + 1 of
    them), in one line, and the worker keeps serving."""
    from veil.compat import search_terms
    from veil.exceptions import SerializationError

    hashed = []

    class Counted(str):
        def __hash__(self):
            hashed.append(1)
            return str.__hash__(self)

    for query in ([Counted(i) for i in range(200_000)], [Counted(i % 100) for i in range(300_000)]):
        hashed.clear()
        with pytest.raises(SerializationError, match=str(search_terms.MAX_TERMS)):
            search_terms.checked_terms(query)
        assert len(hashed) <= search_terms.MAX_TERMS + 1, len(hashed)
    srv, s = _worker(hook, "rt-fc-many-terms")
    reply = request(srv, s, m.SearchMessage([str(i) for i in range(200_000)]))
    assert type(reply) is m.ErrorReply and reply.error == "SerializationError" and "\n" not in reply.message, reply
    answers_next_command(srv, s)


def test_two_hostile_workers_cannot_make_a_multi_pointer_sum_square_their_answers(hook):
    """Attack (workers answering ``x.send(bob, alice).get(sum_results=True)``, PySyft's MultiPointerTensor):
    one answers a column of n values, the other a row of n: the sum broadcast them to n x n (n = 10^5: 40 GB
    in the scientist's process from two 400 KB answers). Must hold: copies of one tensor sum only when every
    answer has one shape; else one line naming the workers, and nothing n x n is made."""
    from veil.workers.virtual import VirtualWorker

    class Shaped(VirtualWorker):
        def __init__(self, *args, shape, **kwargs):
            super().__init__(*args, **kwargs)
            self.answer_shape = shape

        def _handle(self, msg, sender):
            if type(msg) is m.GetObjectsMessage:
                return m.ObjectsReply([torch.ones(self.answer_shape)])
            return super()._handle(msg, sender)

    n = 3000
    column, row = Shaped(hook, id="rt-fc-column", shape=(n, 1)), Shaped(hook, id="rt-fc-row", shape=(1, n))
    with pytest.raises(ValueError) as refused:
        torch.ones(3).send(column, row).get(sum_results=True)
    assert "rt-fc-column" in str(refused.value) and "\n" not in str(refused.value), refused.value
    honest = torch.tensor([1.0, 2.0, 3.0]).send(sy.VirtualWorker(hook, id="rt-fc-a"), sy.VirtualWorker(hook, id="rt-fc-b"))
    assert torch.equal(honest.get(sum_results=True), torch.tensor([2.0, 4.0, 6.0]))


def test_a_refused_attachment_leaves_the_hook_state_as_it_was(hook, monkeypatch):
    """Global hook state: an extension's ``register_attachment`` of a name torch defines (``Tensor.add``) was
    refused, but stayed in ``ATTACHMENTS``: every later ``sy.TorchHook(torch)`` in the process (another
    notebook session, a worker's next hook) raised. A second function for a verb veil attached was kept in
    the list and silently never attached. Must hold: both refused in one line, the list unchanged, later hooks
    made as before, torch's own ``add`` untouched."""
    import veil.hook as veil_hook

    monkeypatch.setattr(veil_hook, "ATTACHMENTS", list(veil_hook.ATTACHMENTS))
    before = list(veil_hook.ATTACHMENTS)
    native_add = torch.Tensor.add
    for name in ("add", "share"):
        with pytest.raises(RuntimeError) as refused:
            veil_hook.register_attachment(torch.Tensor, name, lambda *a, **k: None)
        assert "\n" not in str(refused.value) and name in str(refused.value)
    assert veil_hook.ATTACHMENTS == before
    sy.TorchHook(torch)
    assert torch.Tensor.add is native_add and torch.Tensor.share is dict(
        ((c, n), f) for c, n, f in before)[(torch.Tensor, "share")]


# ------------------------------------------------------------------------- attacks that hold


def test_paged_search_finds_exactly_what_one_pass_would(hook, monkeypatch):
    """The budget only splits a search into pages: followed page by page, a search over many described objects
    finds exactly the objects a plain Python pass finds (tags, ids, description substrings), none twice."""
    from veil.compat import search_terms

    monkeypatch.setattr(search_terms, "PAGE_MATCH_BUDGET", 4096, raising=False)
    srv, s = _worker(hook, "rt-fc-search-pages")
    stored = {}
    for i in range(60):
        tags = ("#data",) + (("#even",) if i % 2 == 0 else ())
        description = f"row block {i} " + ("visits " * 40 if i % 3 == 0 else "")
        stored[send_tensor(srv, s, torch.ones(1), tags, description)] = (tags, description)
    for query in (["#data"], ["#even", "visits"], ["block 1"], ["#even", "block 4"]):
        expected = sorted(oid for oid, (tags, text) in stored.items()
                          if all(q in tags or q in text for q in query))
        ids, pages = _all_pages(srv, s, query)
        assert sorted(ids) == expected and len(ids) == len(set(ids)), query
    assert _all_pages(srv, s, ["#data"])[1] > 1, "the budget did not split the search into pages"
    answers_next_command(srv, s)


def test_owner_search_in_process_never_returns_a_scientists_look_alike(hook):
    """Attack (injection another user trusts): the scientist stores a tensor with the owner's tag and
    description; the owner's own ``sy.search`` / ``PrivateGridNetwork`` on its worker (in process, as
    veil/demo.py does) must return the owner's data only, and the other scientist's search must not see it."""
    srv, s = _worker(hook, "rt-fc-lookalike")
    owner = srv.load(torch.zeros(3), tags=("#boston", "#data"), description="Boston features", private=True)
    fake = send_tensor(srv, s, torch.full((3,), 666.0), ("#boston", "#data"), "Boston features")
    assert [p.id_at_location for p in sy.search(srv, ["#boston", "#data"])] == [owner]
    grid = sy.PrivateGridNetwork(srv).search("#boston", "Boston features")
    assert [p.id_at_location for p in grid[srv.id]] == [owner]
    other = open_session(srv, OTHER)
    found = request(srv, other, m.SearchMessage(["#boston"])).descriptors
    assert [d.id for d in found] == [owner], found
    mine = request(srv, s, m.SearchMessage(["#boston"])).descriptors
    assert [d.id for d in mine] == [owner, fake], mine  # the owner's data first, then the session's own
    assert torch.equal(srv.monitor.owner_objects()[owner], torch.zeros(3))


def test_search_results_are_pointers_that_never_free_or_leave_the_answering_worker(hook):
    """Pointers from ``request_search`` / grid search point at the worker that answered, never free what
    they point to, and ``.get()`` of the owner's private data through them is refused."""
    owner_w = sy.VirtualWorker(hook, id="rt-fc-owner")
    oid = owner_w.load(torch.arange(4.0), tags=("#p",), description="private rows", private=True)
    me = hook.local_worker
    for ptr in me.request_search(["#p"], location=owner_w) + sy.PrivateGridNetwork(owner_w).search("#p")[owner_w.id]:
        assert ptr.location is owner_w and ptr.id_at_location == oid and ptr.garbage_collect_data is False
        with pytest.raises(sy.exceptions.PermissionDeniedError):
            ptr.get()
        del ptr
    assert torch.equal(owner_w.monitor.owner_objects()[oid], torch.arange(4.0))
