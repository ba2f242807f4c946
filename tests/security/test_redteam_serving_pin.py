"""Red team: which owner's service a serving client's queries reach, and what a hostile party can make it do.

The attackers: a scientist (another user with a scientist token on the cluster's parties) who opens the
client's service name on every party *before* the model owner does, to catch queries; a hostile party of
the cluster answering ``info`` or ``fetch`` with anything; a session with many objects slowing others' pages.

Found here, and fixed (each test asserts the safe behaviour; each failed on the code before):
- a client pinned the owner only *after* connecting, from the ``info`` its plain name found: the first user
  to open the name there. A scientist who opened ``model`` on every party first got the client's pin, so
  its first query and all later ones (the input shares). ``Cluster.save`` (and the owner's own ``Cluster``)
  now records each service's owner (``ModelService`` takes it from the parties' ``open`` reply) and the
  cluster's ``owner_user``; a client pins ``@OWNER/NAME`` before its first message. An addresses-only
  cluster (PySyft's ``TFECluster(*workers)``) pins ``owner_user`` (``model-owner``, the user a ``Cluster``
  gives the owner's token), and a cluster with no owner at all is refused in one line (``owner=`` names one);
- a service name holding ``/`` could not be pinned (``@OWNER/NAME`` splits at its last ``/``): now its ``/``
  and ``%`` are escaped (``%2F``, ``%25``), so every name can be pinned to exactly one owner;
- a hostile party's ``info`` (no description, bad sizes, an encoding past the ring, another owner) or
  ``fetch`` reply (a float share, another row count: honest ``[1, 2]`` shares broadcast to five rows; a
  string) reached the client as a bare IndexError/TypeError, a silently accepted other owner, or a wrong
  shaped output: each is now one ``ServingError`` line naming the party.

Held (tested, so a regression fails): a scientist's many objects are not in another session's listing
snapshot (each page snapshots only the sender's namespace and the shared one).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.encoding import encode, make_encoding
from veil.mpc.sharing import split
from veil.serving import names, protocol
from veil.serving.client import ModelClient
from veil.serving.cluster import OWNER_USER, Cluster, NetworkWorker
from veil.serving.errors import ServingError
from veil.serving.service import ModelService
from veil.workers import listing
from veil.workers.principals import Principal
from veil.workers.registry import HookContext

from test_redteam_serving_names import INFO, _error, _workers  # noqa: E402  (one harness for the passes)

SHAPES = {"input_shape": [1, 3], "output_shape": [1, 2], "base": 2, "precision_fractional": 16, "max_rows": 4}


def _cluster(monkeypatch, parties: list, cp, **attributes) -> Cluster:
    """A client's or owner's Cluster whose connections are the in-process ``parties`` (and ``cp``)."""
    cluster = Cluster(*(NetworkWorker(f"127.0.0.1:{9 + i}", id=w.id) for i, w in enumerate(parties)),
                      crypto_provider=NetworkWorker("127.0.0.1:8", id=cp.id), client_token="client-token",
                      owner_token="owner-token")
    for key, value in attributes.items():  # (Cluster(..., owner_user=...), set after: the same Cluster)
        setattr(cluster, key, value)
    monkeypatch.setattr(Cluster, "connect",
                        lambda self, hook_, token, workers=None, timeout=0: [*parties, cp][:len(workers or []) or 3])
    return cluster


def _client_hook(tag: str) -> HookContext:
    """A client's own hook context: in-process its user is its local worker's id (``tag``), not the owner's."""
    ctx = HookContext()
    ctx._local_worker = sy.VirtualWorker(ctx, id=tag)
    return ctx


def _squat(squatter, parties: list, client_user: str, name: str = "model") -> None:
    info = {**SHAPES, "parties": [p.id for p in parties]}
    for party in parties:  # first, on every party: a plain name found the first opened
        protocol.call(squatter, party, "open", name, [client_user], info)


def _nothing_reached(squatter, parties: list, name: str = "model") -> None:
    for party in parties:
        assert protocol.call(squatter, party, "pending", name) == []


# ------------------------------------------------------------------ the owner is pinned from the first query


@pytest.mark.parametrize("handed", ["file", "cluster"])
def test_a_client_of_the_owners_cluster_sends_its_first_query_to_the_owner_not_a_squatter(hook, monkeypatch,
                                                                                         tmp_path, handed):
    p1, p2, cp, squatter = _workers(hook, "p1", "p2", "cp", "squatter")
    client_user = f"cli_{new_id() % 10**9}"
    _squat(squatter, [p1, p2], client_user)
    cluster = _cluster(monkeypatch, [p1, p2], cp)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.tensor([[0.5, -1.0, 2.0]])
    expected = model(x).detach()  # plain torch, before sharing
    service = ModelService(model, cluster, (1, 3), clients=(client_user,), hook=hook)
    try:
        given = cluster.save(tmp_path / "cluster.json") if handed == "file" else cluster
        client = ModelClient(hook=_client_hook(client_user), timeout=20).connect_to_model((1, 3), (1, 2), given)
        rid = client.submit(x)
        _nothing_reached(squatter, [p1, p2])  # the first query's input shares: the owner's only
        service.serve(num_requests=1)
        torch.testing.assert_close(client.result(rid), expected, atol=1e-3, rtol=0)
        owner = hook.local_worker.id  # (in-process, the owner's user is its local worker's id)
        assert cluster.owners == {"model": owner}  # recorded from the parties' open reply
        assert json.loads((tmp_path / "cluster.json").read_text() if handed == "file" else "{}").get(
            "services", {"model": owner}) == {"model": owner}
    finally:
        service.stop(timeout=0)


def _alice_serves(alice, parties: list, client_user: str, name: str = "model") -> None:
    info = {**SHAPES, "parties": [p.id for p in parties]}
    for party in parties:
        protocol.call(alice, party, "open", name, [client_user], info)


def test_a_client_with_no_known_owner_is_refused_before_its_first_query(hook, monkeypatch):
    p1, p2, cp, squatter, alice = _workers(hook, "p1", "p2", "cp", "squatter", "alice")
    client_user = f"cli_{new_id() % 10**9}"
    _squat(squatter, [p1, p2], client_user)
    _alice_serves(alice, [p1, p2], client_user)
    cluster = _cluster(monkeypatch, [p1, p2], cp)
    cluster.owner_user = None  # (a cluster that names no owner: Cluster(..., owner_user=None), "owner": null)
    client = ModelClient(hook=_client_hook(client_user), timeout=20)
    with pytest.raises(ServingError, match="owner=") as caught:
        client.connect_to_model((1, 3), (1, 2), cluster)
        client.submit(torch.ones(1, 3))
    assert "\n" not in str(caught.value)
    _nothing_reached(squatter, [p1, p2])
    # naming the owner (as owner= or @OWNER/NAME) reaches alice from the first query
    for how in ({"owner": alice.id}, {"name": f"@{alice.id}/model"}):
        client.parties = []  # (in-process parties: nothing to close)
        client.connect_to_model((1, 3), (1, 2), cluster, **how)
        rid = client.submit(torch.ones(1, 3))
        _nothing_reached(squatter, [p1, p2])
        assert [r[0] for r in protocol.call(alice, p1, "pending", "model")] == [rid]
        protocol.call(alice, p1, "fail", "model", [rid], "done")
        protocol.call(alice, p2, "fail", "model", [rid], "done")
    client.parties = []
    with pytest.raises(ServingError, match="another owner"):  # a qualified name and owner= that disagree
        client.connect_to_model((1, 3), (1, 2), cluster, name=f"@{squatter.id}/model", owner=alice.id)
    client.parties = []  # (in-process parties: nothing to close)


def test_an_addresses_only_pysyft_cluster_pins_the_clusters_owner_user_not_a_squatter(hook, monkeypatch):
    p1, p2, cp, squatter = _workers(hook, "p1", "p2", "cp", "squatter")
    client_user = f"cli_{new_id() % 10**9}"
    _squat(squatter, [p1, p2], client_user)  # only the squatter serves "model" (the owner's connection dropped)
    workers = [sy.TFEWorker(host=f"127.0.0.1:{9 + i}", id=w.id, auto_managed=False) for i, w in enumerate((p1, p2, cp))]
    cluster = sy.TFECluster(*workers)
    monkeypatch.setattr(Cluster, "connect", lambda self, hook_, token, workers=None, timeout=0: [p1, p2])
    error = _error(lambda: ModelClient(hook=_client_hook(client_user)).connect_to_model(
        (1, 3), (1, 2), cluster, token="client-token"))
    assert "may not query" in error and f"@{OWNER_USER}/model" in error  # refused: the squatter is no owner
    _nothing_reached(squatter, [p1, p2])
    assert cluster.owner_user == OWNER_USER


def test_a_cluster_file_records_owners_and_a_malformed_one_is_refused_in_one_line(tmp_path):
    parties = [NetworkWorker(f"127.0.0.1:{9 + i}", id=f"s{i}") for i in range(3)]
    cluster = Cluster(*parties, client_token="t", owner_user="lab/alice")
    cluster.owners["digits"] = "lab/bob"
    loaded = Cluster.load(cluster.save(tmp_path / "c.json"))
    assert (loaded.owner_of("digits"), loaded.owner_of("model")) == ("lab/bob", "lab/alice")
    desc = json.loads((tmp_path / "c.json").read_text())
    for key in ("owner", "services"):  # a file from before owners were written: the Cluster's default owner
        desc.pop(key)
    (tmp_path / "old.json").write_text(json.dumps(desc))
    assert Cluster.load(tmp_path / "old.json").owner_of("digits") == OWNER_USER
    for bad in ({"services": {"m": 3}}, {"services": ["m"]}, {"owner": ""}, {"owner": 7}):
        (tmp_path / "bad.json").write_text(json.dumps({**desc, **bad}))
        assert "not a veil cluster file" in _error(lambda: Cluster.load(tmp_path / "bad.json"))


def test_a_service_name_with_a_slash_or_percent_is_pinned_to_exactly_its_owner(hook):
    party, alice, squatter, client = _workers(hook, "party", "alice", "squatter", "client")
    lab = sy.VirtualWorker(hook, id=f"{alice.id}/team")  # a user whose name ends where alice's name's "/" is
    protocol.call(squatter, party, "open", "team/model", [client.id], {**INFO, "max_rows": 1})  # first
    protocol.call(lab, party, "open", "model", [client.id], {**INFO, "max_rows": 2})
    protocol.call(alice, party, "open", "team/model", [client.id], {**INFO, "max_rows": 3})
    protocol.call(alice, party, "open", "team%2Fmodel", [client.id], INFO)  # max_rows 4: a literal "%2F"
    escaped = {"team/model": f"@{alice.id}/team%2Fmodel", "team%2Fmodel": f"@{alice.id}/team%252Fmodel"}
    for name, rows in (("team/model", 3), ("team%2Fmodel", 4)):
        assert protocol.call(client, party, "info", escaped[name])[0]["max_rows"] == rows, name
    rid = new_id()
    protocol.call(client, party, "submit", escaped["team/model"], rid, torch.ones(1, 3, dtype=torch.int64))
    assert protocol.call(squatter, party, "pending", "team/model") == []
    assert protocol.call(lab, party, "pending", "model") == []
    assert [r[0] for r in protocol.call(alice, party, "pending", "team/model")] == [rid]
    assert all(names.qualified(name, alice.id) == pinned for name, pinned in escaped.items())  # the client's


# ------------------------------------------------------------------ a hostile party's answers, on the client


def _connected(hook, monkeypatch, info_of_p2=None):
    """A client connected to alice's service on p1 and p2; p2 answers ``info`` with ``info_of_p2`` if given."""
    p1, p2, cp, alice = _workers(hook, "p1", "p2", "cp", "alice")
    client_user = f"cli_{new_id() % 10**9}"
    _alice_serves(alice, [p1, p2], client_user)
    cluster = _cluster(monkeypatch, [p1, p2], cp, owner_user=alice.id)
    call = protocol.call
    if info_of_p2 is not None:
        monkeypatch.setattr(protocol, "call", lambda local, w, action, *a: (
            info_of_p2(call(local, w, action, *a)) if w is p2 and action == "info" else call(local, w, action, *a)))
    client = ModelClient(hook=_client_hook(client_user), timeout=5)
    return client, cluster, (p1, p2, alice)


@pytest.mark.parametrize("hostile", [
    lambda reply: [],  # no description (a bare IndexError)
    lambda reply: [{**reply[0], "input_shape": "1,3"}],  # sizes that are none (bare TypeError at submit)
    lambda reply: [{**reply[0], "base": 3, "precision_fractional": 10**6}],  # past the ring (bare ValueError)
    lambda reply: [{**reply[0], "max_rows": "4"}],  # (a bare TypeError at the row check)
    lambda reply: [{**reply[0], "owner": "mallory"}],  # another owner's service (accepted, and pinned)
], ids=["empty", "shape", "encoding", "max_rows", "owner"])
def test_a_hostile_partys_info_is_refused_in_one_line_naming_it(hook, monkeypatch, hostile):
    client, cluster, (p1, p2, alice) = _connected(hook, monkeypatch, hostile)
    both = lambda reply: hostile(reply) if reply else reply  # noqa: E731  (the same lie from p1 too)
    error = _error(lambda: client.connect_to_model((1, 3), (1, 2), cluster))
    assert p2.id in error or "differently" in error, error
    monkeypatch.setattr(protocol, "call", lambda local, w, action, *a, _c=protocol.call: (
        both(_c(local, w, action, *a)) if action == "info" and w is p1 else _c(local, w, action, *a)))
    client.parties = []
    error = _error(lambda: client.connect_to_model((1, 3), (1, 2), cluster))  # every party lies alike
    assert "malformed service description" in error or "another owner" in error, error
    client.parties = []


def _shares(x: torch.Tensor, parties: int = 2) -> list:
    return split(encode(x, make_encoding(SHAPES["precision_fractional"], SHAPES["base"])), parties)


@pytest.mark.parametrize("hostile", [
    lambda honest: [honest.repeat(5, 1)],  # five rows: honest [1, 2] shares broadcast to a five-row output
    lambda honest: [honest.double()],  # a float share
    lambda honest: ["shares"],  # no tensor (a bare TypeError)
    lambda honest: [honest, honest],  # two answers for one request
    lambda honest: [honest[:, :1]],  # another output width
], ids=["rows", "float", "string", "two", "width"])
def test_a_hostile_partys_output_share_is_refused_in_one_line_not_decoded(hook, monkeypatch, hostile):
    client, cluster, (p1, p2, alice) = _connected(hook, monkeypatch)
    client.connect_to_model((1, 3), (1, 2), cluster)
    y = torch.tensor([[1.5, -2.25]])
    honest = _shares(y)
    call_all = protocol.call_all
    lied = lambda i, share: hostile(share) if i == 1 else [share]  # noqa: E731  (p2 is hostile)
    monkeypatch.setattr(protocol, "call_all", lambda local, ws, action, *a, **k: (
        [lied(i, honest[i]) for i in range(len(ws))] if action == "fetch" else call_all(local, ws, action, *a, **k)))
    error = _error(lambda: client.result(new_id()))
    assert "malformed output share" in error and p2.id in error, error
    monkeypatch.setattr(protocol, "call_all", lambda local, ws, action, *a, **k: [[s] for s in honest])
    torch.testing.assert_close(client.result(new_id()), y, atol=1e-4, rtol=0)  # honest shares still decode
    client.parties = []


# ------------------------------------------------------------------ listing pages: whose objects a page walks


def test_a_scientists_many_objects_are_not_in_another_sessions_listing_snapshot(hook, monkeypatch):
    (worker,) = _workers(hook, "snap_host")
    tag = new_id() % 10**9
    hoarder, victim = sy.VirtualWorker(hook, id=f"hoard{tag}"), sy.VirtualWorker(hook, id=f"victim{tag}")
    for w in (hoarder, victim):  # (as on a network worker: each scientist session its own namespace)
        worker._principals[w.id] = Principal(w.id, w.id, namespace=w.id, isolated=True)
    hoard = [new_id() for _ in range(3000)]
    hoarder.send_msg(m.ObjectMessage([m.StoredObject(oid, torch.zeros(1)) for oid in hoard]), worker)
    mine = [new_id() for _ in range(3)]
    victim.send_msg(m.ObjectMessage([m.StoredObject(oid, torch.zeros(1)) for oid in mine]), worker)
    sizes, visible_after = [], listing.visible_after

    def measured(spaces, after, visible):
        sizes.append(sum(len(s) for s in {id(s): s for s in spaces}.values()))
        return visible_after(spaces, after, visible)

    monkeypatch.setattr(listing, "visible_after", measured)
    assert sorted(d.id for d in victim.send_msg(m.ListObjectsMessage(), worker).descriptors) == sorted(mine)
    hook.local_worker.send_msg(m.ListObjectsMessage(), worker)  # the owner's (shared) namespace
    assert len(sizes) == 2 and max(sizes) < len(hoard), sizes  # neither page snapshots the hoard
