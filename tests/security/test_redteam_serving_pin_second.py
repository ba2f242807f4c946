"""Red team, second pass: the owner pin of serving clients (5bd0a80) and the checks it added.

The attackers: a hostile party of the cluster (its ``open`` reply to the owner, its ``info`` and ``fetch``
replies to clients), whoever hands a client a cluster file (an edited, huge or special file), and a
scientist who opens the client's service name, or a name that escapes or decodes to it, on every party.

Found here, and fixed (each test asserts the safe behaviour; each failed on 5bd0a80's code):
- a hostile party answering ``open`` as another user than the other parties (or as nobody) was ignored in
  silence: the owner's cluster (and the file it saves) fell back to ``owner_user`` for that name, the pin
  of a user the parties may not know the owner as. ``ModelService`` now refuses it in one line naming the
  party, closes the service on the parties and records no owner for it;
- a hostile party whose ``fetch`` reply came first set the row count: its five-row share was accepted and
  the honest party's one-row share was refused, the error naming the *honest* party. The client now checks
  each share against the rows it submitted, so the hostile party is the one named, whatever the order;
- a hostile party's ``info`` with ``base`` a long string holding newlines (and no precision) reached the
  client as a many-line, unbounded ``ServingError`` (the encoding's message echoed it);
- ``Cluster.load`` of a deeply nested file raised a bare ``RecursionError``; a FIFO blocked it forever
  (and a character device read without end); a file of any size was read whole; its error echoed a
  hostile address unbounded. Now: a regular file of at most ``cluster.MAX_FILE_BYTES``, one bounded line;
- every client's cluster file (``Cluster.save``, per-client ones too) listed the names of all the owner's
  services, which the parties tell no client (a name it may not query reads as one nobody serves): the file
  now names only services whose owner is not the cluster's ``owner_user`` (the pins are unchanged).

Held (tested, so a regression fails): ``names.qualified`` and the parties' decoding of it are exact inverses
over names full of ``%`` and ``/`` (lowercase ``%2f``, double ``%252F``, ``%00``, invalid escapes), so a
pinned client reaches its owner's service of exactly its name and no other; a raw name that decodes to a
qualified one (``@alice/@squatter%2Fmodel``) reaches nothing; owners holding ``/``, ``@`` or a look-alike
character are matched exactly; parties that answer ``open`` with nothing (from before owners were recorded)
still serve, the cluster's ``owner_user`` pinned; honest shares of 1, 3 or 0 rows decode as plain torch; no
client token (an issued one for holder ``model-owner`` included) is the owner's user or may open a service.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from torch import nn

import veil as sy
from veil.ids import new_id
from veil.serving import cluster as cluster_module
from veil.serving import protocol
from veil.serving.client import ModelClient
from veil.serving.cluster import Cluster, NetworkWorker
from veil.serving.names import qualified
from veil.serving.party_replies import checked_info
from veil.serving.service import ModelService

from test_redteam_serving_names import INFO, _error, _workers  # noqa: E402  (one harness for the passes)
from test_redteam_serving_pin import _client_hook, _cluster, _connected, _shares  # noqa: E402

#: longest error line a test accepts where the attacker's text could be echoed
SHORT = 600


def _one_bounded_line(error: str) -> str:
    assert "\n" not in error and len(error) < SHORT, (len(error), error[:300])
    return error


# ------------------------------------------------------------------ a hostile party's open reply, on the owner


def _open_replies(monkeypatch, replace: dict) -> None:
    """Party index -> the reply it gives the owner's ``open`` instead of the honest one."""
    call_all = protocol.call_all

    def lying(local, ws, action, service, per_worker_args, return_errors=False):
        replies = call_all(local, ws, action, service, per_worker_args, return_errors=return_errors)
        return [replace.get(i, r) for i, r in enumerate(replies)] if action == "open" else replies
    monkeypatch.setattr(protocol, "call_all", lying)


@pytest.mark.parametrize("lie", [["mallory"], []], ids=["another-user", "nobody"])
def test_a_party_answering_open_as_another_user_is_refused_and_pins_nobody(hook, monkeypatch, tmp_path, lie):
    p1, p2, cp = _workers(hook, "p1", "p2", "cp")
    cluster = _cluster(monkeypatch, [p1, p2], cp)
    cluster.owners["model"] = "stale"  # (an earlier record of the name goes too)
    _open_replies(monkeypatch, {1: lie})
    client = sy.VirtualWorker(hook, id=f"c_{new_id() % 10**9}")
    error = _one_bounded_line(_error(lambda: ModelService(nn.Sequential(nn.Linear(3, 2)), cluster, (1, 3),
                                                          clients=(client.id,), hook=hook)))
    assert "open" in error and p2.id in error, error
    assert "model" not in cluster.owners
    owner = hook.local_worker.id
    for party in (p1, p2):  # nothing stays open for a client to submit its input shares to
        assert "no longer served" in _error(lambda: protocol.call(
            client, party, "submit", f"@{owner}/model", new_id(), torch.ones(1, 3, dtype=torch.int64)))


def test_parties_that_answer_open_with_nothing_still_serve_the_clusters_owner_user(hook, monkeypatch):
    p1, p2, cp = _workers(hook, "p1", "p2", "cp")
    owner = hook.local_worker.id
    cluster = _cluster(monkeypatch, [p1, p2], cp, owner_user=owner)
    _open_replies(monkeypatch, {0: [], 1: []})  # parties from before open named the opener
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.tensor([[1.0, -0.5, 0.25]])
    expected = model(x).detach()
    client_user = f"cli_{new_id() % 10**9}"
    service = ModelService(model, cluster, (1, 3), clients=(client_user,), hook=hook)
    try:
        assert cluster.owners == {} and cluster.owner_of("model") == owner
        client = ModelClient(hook=_client_hook(client_user), timeout=20).connect_to_model((1, 3), (1, 2), cluster)
        rid = client.submit(x)
        service.serve(num_requests=1)
        torch.testing.assert_close(client.result(rid), expected, atol=1e-3, rtol=0)
        client.parties = []
    finally:
        service.stop(timeout=0)


# ------------------------------------------------------------------ a hostile party's fetch and info, on the client


def _fetch_replies(monkeypatch, replies_of) -> None:
    call_all = protocol.call_all
    monkeypatch.setattr(protocol, "call_all", lambda local, ws, action, *a, **k: (
        replies_of(ws) if action == "fetch" else call_all(local, ws, action, *a, **k)))


@pytest.mark.parametrize("order", ["hostile-first", "hostile-alone-first"])
def test_a_hostile_partys_extra_rows_are_blamed_on_it_whichever_answers_first(hook, monkeypatch, order):
    client, cluster, (p1, p2, alice) = _connected(hook, monkeypatch)
    client.connect_to_model((1, 3), (1, 2), cluster)
    rid = client.submit(torch.ones(1, 3))  # one row
    y = torch.tensor([[0.5, -1.25]])
    honest = _shares(y)
    hostile = honest[0].repeat(5, 1)  # p1 is hostile: five rows of its share
    rounds = iter([[[hostile], [honest[1]]]] if order == "hostile-first" else [[[hostile], []], [[honest[1]]]])
    _fetch_replies(monkeypatch, lambda ws: next(rounds))
    error = _error(lambda: client.result(rid))
    assert "malformed output share" in error and p1.id in error and p2.id not in error, error
    rid = client.submit(torch.ones(1, 3))
    _fetch_replies(monkeypatch, lambda ws: [[s] for s in honest])
    torch.testing.assert_close(client.result(rid), y, atol=1e-4, rtol=0)  # honest shares still decode
    client.parties = []


@pytest.mark.parametrize("rows", [1, 3, 0], ids=["batch-1", "batch-3", "empty"])
def test_honest_shares_of_any_batch_the_client_sent_decode_as_plain_torch(hook, monkeypatch, rows):
    client, cluster, _ = _connected(hook, monkeypatch)
    client.connect_to_model((1, 3), (1, 2), cluster)
    rid = client.submit(torch.ones(rows, 3))
    y = torch.linspace(-3, 3, rows * 2).reshape(rows, 2)  # the model's outputs, in plain torch
    honest = _shares(y)
    _fetch_replies(monkeypatch, lambda ws: [[s] for s in honest])
    torch.testing.assert_close(client.result(rid), y, atol=1e-4, rtol=0)
    client.parties = []


def test_a_hostile_partys_info_text_is_not_echoed_over_lines(hook, monkeypatch):
    def hostile(reply):
        return [{**reply[0], "precision_fractional": None, "base": "forged\nline " * 5000}]
    client, cluster, (p1, p2, alice) = _connected(hook, monkeypatch, hostile)
    error = _one_bounded_line(_error(lambda: client.connect_to_model((1, 3), (1, 2), cluster)))
    assert p2.id in error and "malformed service description" in error, error
    client.parties = []
    info = {**INFO, "output_shape": [1, 2], "parties": ["p"], "precision_fractional": None, "base": "x" * 10**6}
    _one_bounded_line(_error(lambda: checked_info("p", [info], None)))


# ------------------------------------------------------------------ cluster files: nesting, size, special files


def _valid(tmp_path) -> dict:
    parties = [NetworkWorker(f"127.0.0.1:{9 + i}", id=f"s{i}") for i in range(3)]
    return json.loads(Cluster(*parties, client_token="t").save(tmp_path / "valid.json").read_text())


def test_a_deeply_nested_or_huge_cluster_file_is_refused_in_one_bounded_line(tmp_path):
    desc = _valid(tmp_path)
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps(desc)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "not a veil cluster file" in _one_bounded_line(_error(lambda: Cluster.load(deep)))
    huge = tmp_path / "huge.json"  # valid JSON, padded past any cluster's size
    huge.write_text(json.dumps({**desc, "pad": " " * (cluster_module.MAX_FILE_BYTES + 1)}))
    assert "not a veil cluster file" in _one_bounded_line(_error(lambda: Cluster.load(huge)))
    forged = tmp_path / "forged.json"  # an address (or owner) as long as the file allows: not echoed whole
    forged.write_text(json.dumps({**desc, "parties": [["s0", "x" * 200_000], desc["parties"][1]]}))
    assert "not a veil cluster file" in _one_bounded_line(_error(lambda: Cluster.load(forged)))
    assert Cluster.load(tmp_path / "valid.json").owner_of("model") == "model-owner"  # a real one still loads


def test_a_cluster_file_that_is_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "cluster.json"
    os.mkfifo(fifo)
    outcome = []
    loading = threading.Thread(target=lambda: outcome.append(_error(lambda: Cluster.load(fifo))), daemon=True)
    loading.start()
    loading.join(5)
    if loading.is_alive():  # blocked on the FIFO: a writer releases it (the test then fails)
        with open(fifo, "w") as writer:
            writer.write("{}")
        loading.join(5)
    assert outcome and "cannot read cluster file" in _one_bounded_line(outcome[0]), outcome


# ------------------------------------------------------------------ escapes: exact inverses, exact owners


TRICKY = ["a%2fb", "a/b", "a%2Fb", "a%252Fb", "a%00b", "%", "%%2F", "a%b", "%25", "/", "//", "%2F%2F", "a%2",
          "a%zz", "a%2f%2F/", "%252525", "x\u2215y"]


def test_every_escaped_name_reaches_exactly_its_owners_service_of_that_name(hook):
    party, alice, squatter, client = _workers(hook, "party", "alice", "squatter", "client")
    for rows, name in enumerate(TRICKY, start=1):  # each name its own max_rows; the squatter opens all first
        protocol.call(squatter, party, "open", name, [client.id], {**INFO, "max_rows": 100 + rows})
        protocol.call(alice, party, "open", name, [client.id], {**INFO, "max_rows": rows})
    for rows, name in enumerate(TRICKY, start=1):
        pinned = qualified(name, alice.id)
        assert pinned.count("/") == 1 and protocol.call(client, party, "info", pinned)[0]["max_rows"] == rows, name
    for raw in (f"@{alice.id}/@{squatter.id}%2Fa", f"@{alice.id}/@{squatter.id}/a"):  # decode to a qualified name
        assert "may not query" in _error(lambda: protocol.call(client, party, "info", raw)), raw


def test_owners_with_a_slash_an_at_or_a_look_alike_are_matched_exactly(hook):
    party, client = _workers(hook, "party", "client")
    tag = new_id() % 10**9
    owners = [f"lab{tag}/alice", f"@at{tag}", f"lab{tag}", f"lab{tag}\uff0falice", f"lab{tag}/alice/"]
    for rows, owner in enumerate(owners, start=1):
        protocol.call(sy.VirtualWorker(hook, id=owner), party, "open", "alice/model" if owner == f"lab{tag}"
                      else "model", [client.id], {**INFO, "max_rows": rows})
    for rows, owner in enumerate(owners, start=1):
        name = "alice/model" if owner == f"lab{tag}" else "model"
        info = protocol.call(client, party, "info", qualified(name, owner))[0]
        assert (info["owner"], info["max_rows"]) == (owner, rows), owner


# ------------------------------------------------------------------ what a cluster file tells, who can be the owner


def test_a_clients_cluster_file_names_none_of_the_owners_services(tmp_path):
    parties = [NetworkWorker(f"127.0.0.1:{9 + i}", id=f"s{i}") for i in range(3)]
    owner_cluster = Cluster(*parties, client_token="t", owner_user="model-owner")
    owner_cluster.owners.update({"model": "model-owner", "hiv-risk-for-bob": "model-owner"})  # as ModelService does
    text = owner_cluster.save(tmp_path / "alice.json").read_text()
    assert "hiv-risk" not in text and "model-owner" in text  # (the parties tell no client other names either)
    loaded = Cluster.load(tmp_path / "alice.json")
    assert loaded.owner_of("model") == loaded.owner_of("hiv-risk-for-bob") == "model-owner"  # pins unchanged


def test_no_client_token_is_the_owners_user_nor_may_open_a_service():
    from veil.serving.cluster import CLIENT_USER, OWNER_USER
    from veil.workers import client_tokens
    from veil.workers.websocket_auth import TokenTable, authenticate, check_request

    table, secret = TokenTable(), "s" * 32  # as Cluster.worker_args configures a party
    table.add("owner-token", OWNER_USER)
    table.add("client-token", CLIENT_USER, role="client")
    table.add_issuer(secret, CLIENT_USER)
    session = authenticate(table, [client_tokens.issue(secret, CLIENT_USER, OWNER_USER)])
    assert session.user == f"{CLIENT_USER}/{OWNER_USER}" and session.user != OWNER_USER
    with pytest.raises(Exception, match="client token may only"):
        check_request(session, protocol.ServingMessage("open", "model", [[CLIENT_USER], INFO]))
    for alike in ("Model-Owner", "model-owner\u200b", "\uff4dodel-owner"):  # no second principal reads as it
        with pytest.raises(ValueError):
            table.add("other-token", alike)
