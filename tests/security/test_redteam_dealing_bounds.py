"""Red team (findings of session 43): dealing parameters chosen by a requester at the crypto provider.

``veil.mpc.deal`` (``worker_dealer._deal``/``_deal_scoped``) takes ``kind, spec, party_ids, ids, count,
seeded`` from whoever sends the command to the provider: any scientist session there (FULL_ROLES). The
provider then pushes the material to every named party over its *peer* link, and each party stores it
as an unclaimed hand-off in the provider's peer namespace (``monitor.store``: ``hand_off`` for a peer).

* Nothing bounds ``count`` x the spec's shapes at the provider (``WorkerDealer.max_elements`` is the
  honest client's own cap), and nothing checks ``ids`` against ``count`` x fields (the FSS dealing does).
* The material is charged to the provider's peer session at the party, not to the requester, and stays
  there until the peer link drops: a requester that never claims its ids leaves it behind when it goes.

The first is fixed (``dealing_recipe.bounded_recipe``: count and size bounded, the ids checked, before
anything is generated or expanded). The second was: a session holding only a token at the crypto provider
filled every party's memory (no quota) or, with ``--max-session-mb`` at the parties, the provider's peer
namespace there, after which every other session's dealing through that provider failed (QuotaExceeded),
long after the attacker disconnected. Fixed in session 44 (``veil/workers/accounts.py``): a peer's
frames name the requester account they are for; unclaimed hand-offs are charged per account, and freed when
the requester's session at the peer ends. The last three tests show it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from veil.exceptions import VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.providers.worker_dealer import DEAL, _deal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker_processes import peer_mesh_args, spawn_all  # noqa: E402

from network_helpers import base_args  # noqa: E402  (tests/network, on the path via conftest)

MALLORY = "s43b-mallory-token"  # a scientist token at the crypto provider only
QUOTA_MB = 2


def _peer_token(name: str) -> str:
    return f"s43b-peer-{name}"


def _cluster(spawn, party_quota_mb=None):
    from veil.workers.websocket_launcher import free_port

    ports = {n: free_port() for n in ("alice", "bob", "dave")}
    specs = {}
    for name in ports:
        extra = peer_mesh_args(name, ports, _peer_token)
        if name == "dave":
            extra += ["--user", f"mallory={MALLORY}"]  # mallory has no account at alice or bob
        elif party_quota_mb is not None:
            extra += ["--max-session-mb", str(party_quota_mb)]
        specs[name] = (base_args(extra), ports[name])
    return spawn_all(spawn, specs)


def _deal_raw(local, provider, kind, spec, ids, count, seeded=False):
    msg = m.CommandMessage(DEAL, (kind, spec, ["alice", "bob"], ids, count, seeded), {}, [], False)
    local.send_msg(msg, provider)


@pytest.mark.slow  # ~8 s: a provider, two parties and several sessions
def test_a_provider_only_session_cannot_block_other_sessions_dealing_at_the_parties(spawn, connect, hook):
    """Mallory (a token at dave only) deals unclaimed material to alice and bob until their peer namespace for
    dave is full, then leaves. An honest scientist's product through dave must still work."""
    wps = _cluster(spawn, party_quota_mb=QUOTA_MB)
    local = hook.local_worker
    alice, bob, dave = (connect(wps[n], id=n, timeout=60) for n in ("alice", "bob", "dave"))
    x = torch.tensor([1, 2, 3])
    assert torch.equal((x.share(alice, bob, crypto_provider=dave) * x.share(alice, bob, crypto_provider=dave))
                       .get(), x * x)  # control: the honest session's product works before mallory comes
    for c in (alice, bob, dave):
        c.close()
    mallory = connect(wps["dave"], token=MALLORY, id="dave", timeout=60)
    filled = 0
    for size in (16384, 1024, 64, 1):  # 128 KiB items, then smaller ones: up to the last bytes of the quota
        while True:
            ids = [[new_id()], [new_id()]]
            try:
                _deal_raw(local, mallory, "zero", ((size,),), ids, 1)
            except VeilError:
                break
            filled += 8 * size
            if filled > 4 * QUOTA_MB * 2**20:  # (no quota at all: stop, the assertion below says so)
                break
    mallory.close()
    assert filled <= QUOTA_MB * 2**20, "the parties kept more than their session quota of dealt material"
    time.sleep(0.5)

    alice, bob, dave = (connect(wps[n], id=n, timeout=60) for n in ("alice", "bob", "dave"))
    xs = x.share(alice, bob, crypto_provider=dave)
    try:
        out = (xs * xs).get()
    except VeilError as e:  # the finding: mallory's leftovers at alice/bob refuse the honest session's triples
        pytest.fail(f"an honest product failed after a provider-only session left unclaimed material: {e}")
    assert torch.equal(out, x * x)


def test_the_crypto_provider_bounds_a_dealing_request_before_generating_it(monkeypatch):
    """In-process spy: a ``zero`` dealing of 2^24 elements x 6 items (768 MiB of material) with ids for none of
    it. The provider must refuse it (count x size over a server-side bound, or ids that do not match
    count x fields) before generating anything; today it generates every item first."""
    import veil.mpc.providers.dealing_recipe as recipes
    import veil.mpc.providers.worker_dealer as wd

    generated = []

    def spy_split(value, n, xor, generator=None):  # the unseeded path splits every field of every item
        generated.append(value.numel())
        raise RuntimeError("s43b: stop after the first field (the test allocates no more)")

    monkeypatch.setattr(wd, "split_shares", spy_split)
    monkeypatch.setattr(wd, "random_ring", lambda shape, generator=None: torch.empty(0))

    class _Provider:
        def resolve_worker(self, pid):
            return pid

        def send_msg(self, msg, to):  # pragma: no cover - never reached today
            raise AssertionError("nothing should be sent")

    orig_zero = recipes.recipe

    def recipe_spy(kind, spec):  # the derive of "zero" would allocate the full tensor: a 0-size stand-in
        u, d, _ = orig_zero(kind, spec)
        return u, d, lambda uu, g: [torch.empty(0, dtype=torch.int64)]

    monkeypatch.setattr(recipes, "recipe", recipe_spy)  # (the recipe _deal takes: bounded_recipe)
    with pytest.raises(Exception) as info:
        _deal(_Provider(), "zero", ((1 << 24,),), ["alice", "bob"], [[], []], 6, False)
    assert not generated and "s43b" not in str(info.value), (
        "the provider started generating a 2^24-element x 6-item dealing whose ids name none of it "
        "(no server-side bound on count x shape, no ids check)")


def test_a_party_bounds_expand_material_before_expanding(monkeypatch):
    """``veil.mpc.expand_material`` (a peer command, and a worker function any scientist at the party may run)
    expands ``count`` x the recipe's shapes before the command's ids or the quota are looked at."""
    import veil.mpc.providers.worker_dealer as wd

    asked = []

    def spy_expand(seed, label, shape):
        asked.append(int(torch.Size(shape).numel()))
        raise RuntimeError("s43b: stop at the first expansion")

    monkeypatch.setattr(wd, "expand", spy_expand)
    seed = torch.zeros(32, dtype=torch.uint8)
    with pytest.raises(Exception) as info:
        wd._expand_material(None, seed, "beaver", ("mul", (1 << 26,), (1 << 26,), {}), 1000, [])
    assert not asked and "s43b" not in str(info.value), (
        f"a party started expanding 1000 items of 2^26-element fields ({asked[:1]} elements first): "
        "no bound on count x shape before allocation")


@pytest.mark.slow  # ~8 s: a provider, two parties and several sessions
def test_material_a_provider_only_session_never_claims_is_not_kept_at_the_parties(spawn, connect, hook):
    """No quota at the parties: mallory (a token at dave only) has dave deal 64 MiB of unclaimed ``zero``
    shares to alice and bob, then leaves. Nothing of it should stay at alice (it is for nobody); before session
    44 all of it did, for as long as dave's peer link lived: any session at alice naming an id found it."""
    wps = _cluster(spawn)
    local = hook.local_worker
    mallory = connect(wps["dave"], token=MALLORY, id="dave", timeout=60)
    ids = []
    for _ in range(8):  # 8 x 1 Mi int64 = 64 MiB per party
        item = [[new_id()], [new_id()]]
        _deal_raw(local, mallory, "zero", ((1 << 20,),), item, 1)
        ids.append(item[0][0])
    mallory.close()
    time.sleep(2)
    alice = connect(wps["alice"], id="alice", timeout=60)  # another user's session at alice
    kept = 0
    for oid in ids:
        try:
            reply = local.send_msg(m.CommandMessage("torch.add", (m.ObjectRef(oid), 0), {}, None, False), alice)
        except VeilError:
            continue
        kept += 8 * int(torch.Size(reply.result.shape).numel())  # (the claimed share's shape: 1 Mi entries)
    assert kept == 0, f"{kept / 2**20:.0f} MiB dealt for a session that left (and holds no account here) is still kept"


def test_hand_offs_a_session_never_claims_do_not_use_up_the_peer_link_for_others(spawn, connect, hook):
    """The same root cause without a dealer: a session at dave only (mallory) moves its own objects to alice
    under ids it never claims there. Its quota at dave is freed by each move; alice keeps the objects in dave's
    peer namespace, shared by every session of dave. Once full, an honest move from dave to alice fails."""
    wps = _cluster(spawn, party_quota_mb=QUOTA_MB)
    local = hook.local_worker
    mallory = connect(wps["dave"], token=MALLORY, id="dave", timeout=60)
    moved = 0
    for _ in range(4 * QUOTA_MB * 8):  # 128 KiB each: up to 4x the quota
        p = torch.zeros(1 << 14, dtype=torch.int64).send(mallory)
        try:
            local.send_msg(m.MoveMessage([p.id_at_location], "alice", [new_id()]), mallory)
        except VeilError:
            break
        moved += 128 << 10
    mallory.close()
    time.sleep(0.5)
    dave = connect(wps["dave"], id="dave", timeout=60)
    q = torch.ones(4, dtype=torch.int64).send(dave)
    try:
        local.send_msg(m.MoveMessage([q.id_at_location], "alice", [new_id()]), dave)
    except VeilError as e:
        pytest.fail(f"an honest move failed after another session left {moved >> 10} KiB of unclaimed hand-offs: {e}")
