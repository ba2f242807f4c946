"""Red team: serving's service names, and what a search or an object listing costs the worker.

The attackers: a scientist (another user with a scientist token on a cluster's party) probing or taking
the names other users serve under; a model owner sending a respond that names no request; a session that
stores many tiny tensors and then lists or searches them, inside the worker's one turn.

Found here, and fixed (each test asserts the safe behaviour; each failed on the code before):
- ``open`` of a name another user served open answered "belongs to another user", and ``pending``/``close``
  on it "only the owner of service ... may do this": a scientist told which names other users serve. Each
  user's names are now its own (veil/serving/names.py): ``open`` of another user's name opens the sender's
  own service, exactly as a name nobody holds, and its owner actions read as a name nobody holds;
- ``open`` of a *closed* service's name of another user replaced that service: its clients' computed,
  unfetched results were gone. Another user's open now never touches it; its results stay the clients'
  to fetch (a name is its owner's until the owner's room for new services reclaims it, nothing left there);
- a search or listing over a session's many tiny tensors described every one in one pass inside the
  worker's turn, in one unbounded reply: a page now matches/describes at most ``listing.MAX_SCANNED``
  objects and answers at most ``listing.MAX_LISTED`` (``next_after`` for the next page, ``after=``);
  ``worker.search(tags)`` / ``worker.list_objects()`` follow the pages, so their results are unchanged;
- a ``respond`` naming no request was audited as a release (of the owner's batch share, "to 0
  recipients"): it is now refused in one line before anything is released, and a respond whose clients
  all left meanwhile discards the share without a release row.

Defined with the per-user names (tested): a second owner of a name does not take the first owner's clients
(first come: a client's name finds the first opened that still serves), and no user's requests are listed to
another user's service of the same name; a page whose ``after=`` object was deleted meanwhile is refused in
one line, and the PySyft calls start the listing again.
"""

from __future__ import annotations

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.serving import protocol

INFO = {"input_shape": [1, 3], "max_rows": 4}


def _workers(hook, *names):
    tag = new_id() % 10**9
    return [sy.VirtualWorker(hook, id=f"sn_{name}_{tag}") for name in names]


def _error(call) -> str:
    with pytest.raises(VeilError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return f"{type(caught.value).__name__}: {caught.value}"


def _answer(owner, party, name: str, rid: int, oid: int, times: int) -> None:
    """The owner claims request ``rid`` as object ``oid``, multiplies it by ``times`` and responds."""
    protocol.call(owner, party, "claim", name, [rid], oid)
    owner.send_msg(m.CommandMessage("Tensor.mul", (m.ObjectRef(oid), times), {}, [oid + 1]), party)
    protocol.call(owner, party, "respond", name, [rid], [1], m.ObjectRef(oid + 1))


def _rows(party, start: int) -> list:
    return [(r["action"], r["outcome"]) for r in list(party.monitor.audit_log)[start:]]


# ------------------------------------------------------------------ whether another user's name exists


def test_another_users_service_name_reads_exactly_as_a_name_nobody_holds(hook):
    party, alice, bob, client = _workers(hook, "party", "alice", "bob", "client")
    protocol.call(alice, party, "open", "model", [client.id], INFO)
    before = len(party.monitor.audit_log)
    assert protocol.call(bob, party, "open", "model", [bob.id], INFO) == [bob.id]  # as a free name: opened
    taken_rows = _rows(party, before)
    before = len(party.monitor.audit_log)
    assert protocol.call(bob, party, "open", "free-name", [bob.id], INFO) == [bob.id]
    assert _rows(party, before) == taken_rows
    protocol.call(bob, party, "close", "model", "done")  # (bob's own, now: names below are alice's or nobody's)
    protocol.call(alice, party, "open", "alices-only", [client.id], INFO)
    for action, args in (("pending", ()), ("unfetched", ()), ("close", ("x",)), ("fail", ([1], "x")),
                         ("requeue", ([1],)), ("claim", ([1], new_id()))):
        held = _error(lambda: protocol.call(bob, party, action, "alices-only", *args))
        nobody = _error(lambda: protocol.call(bob, party, action, "nobodys-name", *args))
        assert held.replace("alices-only", "X") == nobody.replace("nobodys-name", "X"), (held, nobody)
    # alice's service is untouched by bob's actions: her client is still served by her
    rid = new_id()
    protocol.call(client, party, "submit", "alices-only", rid, torch.ones(1, 3, dtype=torch.int64))
    assert [r[0] for r in protocol.call(alice, party, "pending", "alices-only")] == [rid]


def test_a_closed_services_name_opened_by_another_user_keeps_its_clients_results(hook):
    party, alice, bob, client = _workers(hook, "party", "alice", "bob", "client")
    protocol.call(alice, party, "open", "model", [client.id], INFO)
    rid, x = new_id(), torch.tensor([[2, -5, 7]], dtype=torch.int64)
    protocol.call(client, party, "submit", "model", rid, x)
    _answer(alice, party, "model", rid, new_id(), 3)
    protocol.call(alice, party, "close", "model", "done for today")
    protocol.call(bob, party, "open", "model", [client.id], INFO)  # a scientist takes the name over
    (result,) = protocol.call(client, party, "fetch", "model", rid)
    assert torch.equal(result, x * 3)  # plain torch: alice's answer, still the client's
    assert protocol.call(alice, party, "unfetched", "model") == [0]  # and alice's service is still hers
    # the name now serves bob's model to the client (alice's is closed): a new request reaches bob only
    later = new_id()
    protocol.call(client, party, "submit", "model", later, x)
    assert [r[0] for r in protocol.call(bob, party, "pending", "model")] == [later]
    _answer(bob, party, "model", later, new_id(), 5)
    assert torch.equal(protocol.call(client, party, "fetch", "model", later)[0], x * 5)


def test_a_second_owner_of_a_name_does_not_take_the_first_owners_clients(hook):
    party, alice, bob, client = _workers(hook, "party", "alice", "bob", "client")
    protocol.call(alice, party, "open", "model", [client.id], INFO)
    protocol.call(bob, party, "open", "model", [client.id], {**INFO, "max_rows": 2})
    assert protocol.call(client, party, "info", "model")[0]["max_rows"] == 4  # alice's, opened first
    rid = new_id()
    protocol.call(client, party, "submit", "model", rid, torch.ones(1, 3, dtype=torch.int64))
    assert protocol.call(bob, party, "pending", "model") == []
    assert [r[0] for r in protocol.call(alice, party, "pending", "model")] == [rid]


def test_a_client_naming_the_owner_is_not_served_by_a_scientist_who_squats_the_name(hook):
    party, alice, squatter, client = _workers(hook, "party", "alice", "squatter", "client")
    protocol.call(squatter, party, "open", "model", [client.id], {**INFO, "max_rows": 2})  # first, to catch queries
    protocol.call(alice, party, "open", "model", [client.id], INFO)
    qualified = f"@{alice.id}/model"  # (in-process, a worker's user is its id)
    assert protocol.call(client, party, "info", qualified)[0]["max_rows"] == 4
    rid, x = new_id(), torch.tensor([[1, 2, 3]], dtype=torch.int64)
    protocol.call(client, party, "submit", qualified, rid, x)
    assert protocol.call(squatter, party, "pending", "model") == []
    _answer(alice, party, "model", rid, new_id(), 2)
    assert torch.equal(protocol.call(client, party, "fetch", qualified, rid)[0], x * 2)
    # a qualified name cannot be squatted: no service's own name starts with "@" (refused whoever holds what)
    error = _error(lambda: protocol.call(squatter, party, "open", qualified, [client.id], INFO))
    assert "may not start with" in error
    nobody = _error(lambda: protocol.call(client, party, "info", f"@{squatter.id}/other"))
    assert "may not query" in nobody


# ------------------------------------------------------------------ respond that names no request


def _one_claimed_request(hook):
    """A service "svc" on a party, one client's request submitted and claimed by the owner as object ``oid``:
    (party, owner, client, request id, oid)."""
    party, owner, client = _workers(hook, "party", "owner", "client")
    protocol.call(owner, party, "open", "svc", [client.id], INFO)
    rid, oid = new_id(), new_id()
    protocol.call(client, party, "submit", "svc", rid, torch.ones(1, 3, dtype=torch.int64))
    protocol.call(owner, party, "claim", "svc", [rid], oid)
    return party, owner, client, rid, oid


def test_an_empty_respond_is_refused_and_audited_as_no_release(hook):
    party, owner, client, rid, oid = _one_claimed_request(hook)
    before = len(party.monitor.audit_log)
    error = _error(lambda: protocol.call(owner, party, "respond", "svc", [], [], m.ObjectRef(oid)))
    assert "no request" in error
    assert ("release", "allowed") not in _rows(party, before)
    protocol.call(owner, party, "respond", "svc", [rid], [1], m.ObjectRef(oid))  # the real answer still goes
    assert torch.equal(protocol.call(client, party, "fetch", "svc", rid)[0], torch.ones(1, 3, dtype=torch.int64))


def test_a_respond_whose_clients_all_left_releases_nothing_and_frees_the_share(hook):
    party, owner, client, rid, oid = _one_claimed_request(hook)
    protocol.drop_session(party, client.id)  # the client disconnected while its request was computed
    before = len(party.monitor.audit_log)
    assert protocol.call(owner, party, "respond", "svc", [rid], [1], m.ObjectRef(oid)) == []
    assert not [row for row in _rows(party, before) if row[0] == "release"]
    assert oid not in {d.id for d in owner.send_msg(m.ListObjectsMessage(), party).descriptors}


# ------------------------------------------------------------------ listings and searches, bounded


def _store_tiny(scientist, worker, count: int, tag: str | None = None) -> list[int]:
    ids = [new_id() for _ in range(count)]
    objects = [m.StoredObject(oid, torch.zeros(1), tags=(tag,) if tag else ()) for oid in ids]
    scientist.send_msg(m.ObjectMessage(objects), worker)
    return ids


def test_a_listing_reply_is_bounded_and_the_pysyft_calls_still_list_everything(hook):
    from veil.workers import listing

    (worker,), scientist = _workers(hook, "list_host"), hook.local_worker  # (whose objects list_objects lists)
    ids = _store_tiny(scientist, worker, listing.MAX_LISTED + 40, tag="#tiny")
    first = scientist.send_msg(m.ListObjectsMessage(), worker)
    assert len(first.descriptors) == listing.MAX_LISTED and first.next_after is not None
    rest = scientist.send_msg(m.ListObjectsMessage(first.next_after), worker)
    assert rest.next_after is None
    assert sorted(d.id for d in first.descriptors + rest.descriptors) == sorted(ids)
    assert sorted(d.id for d in worker.list_objects()) == sorted(ids)  # PySyft 0.2: worker.list_objects()
    assert worker.objects_count() == len(ids)
    assert sorted(p.id_at_location for p in worker.search(["#tiny"])) == sorted(ids)  # worker.search(tags)


def test_a_search_page_scans_a_bounded_number_of_objects(hook, monkeypatch):
    from veil.workers import listing

    monkeypatch.setattr(listing, "MAX_SCANNED", 50)
    (worker,), scientist = _workers(hook, "scan_host"), hook.local_worker  # (whose objects list_objects lists)
    _store_tiny(scientist, worker, 120)
    (wanted,) = _store_tiny(scientist, worker, 1, tag="#needle")
    page = scientist.send_msg(m.SearchMessage(["#needle"]), worker)
    assert page.descriptors == [] and page.next_after is not None  # looked at 50, not all 121
    assert [p.id_at_location for p in worker.search("#needle")] == [wanted]  # the pages find it


def test_a_page_after_a_deleted_object_is_one_line_and_the_client_starts_again(hook):
    from veil.workers import listing
    from veil.workers.listing import ListingCursorGoneError

    (worker,), scientist = _workers(hook, "gone_host"), hook.local_worker  # (whose objects list_objects lists)
    ids = _store_tiny(scientist, worker, listing.MAX_LISTED + 3)
    first = scientist.send_msg(m.ListObjectsMessage(), worker)
    scientist.send_msg(m.DeleteMessage([first.next_after]), worker)
    with pytest.raises(ListingCursorGoneError, match="list again from the start") as caught:
        scientist.send_msg(m.ListObjectsMessage(first.next_after), worker)
    assert "\n" not in str(caught.value)
    with pytest.raises(VeilError, match="after="):
        scientist.send_msg(m.ListObjectsMessage("x"), worker)
    assert sorted(d.id for d in worker.list_objects()) == sorted(set(ids) - {first.next_after})
