"""Red team: caches a worker keeps for every user at once (process-wide), as side channels and resource holes.

The threat model lets a scientist learn its own results and noised releases, not what other users do. A
cache shared by all of a worker's sessions answers a hit in microseconds and a miss in milliseconds to
seconds, so its timing tells one user whether another recently made the same request, and filling it evicts
everyone's entries. Each test counts the work done (the cached function monkeypatched), never wall time.

Holes found (with the fixed files at f2ed87f's code, 8 tests here failed; the 2 guards of the new module passed):
- veil.dp.queries.gaussian_sigma (lru_cache 1024; ~3 ms miss, ~2 us hit): another user's Gaussian query
  with the same (sensitivity, epsilon, delta) made mine a hit; 1,024 queries of fresh parameters evicted
  everyone's (each paid the search again).
- veil.dp.core._measurement (OpenDP measurement per (kind, integer, scale), lru_cache 256, milliseconds to
  build): the same, for the noise scale of any Laplace or Gaussian release.
- veil.dp.accountant._rdp_one_step (~0.1 s per (sigma, q), lru_cache 1024): the RDP ledger's charge of a
  DP-SGD step was fast iff someone had trained with that (sigma, q).
- veil.dp.pld_cache (one-step PLDs per (sigma, q), 0.1-4 s to build, 64 MiB for all; the composed epsilon
  per history): the same for the PLD ledger, and one user's fresh pairs evicted everyone's PLDs, so their
  next step rebuilt them inside the ledger's write lock (every user's charges waiting).
- veil.workers.owner_guard._signature (lru_cache 512 for ~530 allowlisted functions): one user's commands
  evicted the entries of others' ops (prime and probe of which ops others call).
Fix: veil/workers/user_caches.py keeps the DP entries per requesting user (the session's users), each user
within its own bound, all users within a total that drops the least recently active *other* users' whole
partitions (never one of the requester's entries, never a single entry another user could probe); the
signature cache holds every allowlisted function. (Also dp.federated.max_releases, per user.)
Held (guards): a user's own repeats stay cached across its sessions; a charge builds a new PLD once, not
again inside the write lock; the scoped cache's bounds; a network session's scope is its users.
"""

from __future__ import annotations

import math
import secrets

import pytest

from veil.dp import accountant, core, pld_cache, queries
from veil.workers.user_caches import ScopedCache, current_scope

from cache_scopes import acting_as, user_session


class _Counted:
    """Wraps ``module.name`` so that every call (a cache miss's work) is counted."""

    def __init__(self, monkeypatch, module, name: str) -> None:
        self.calls = 0
        real = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def _fresh_epsilon() -> float:
    return 0.5 + secrets.randbelow(10**9) / 1e10  # (parameters no other test used: a miss the first time)


# 1 -- gaussian_sigma -------------------------------------------------------------------------------------------

def test_another_users_gaussian_query_does_not_make_mine_a_hit(monkeypatch):
    """Attack: Mallory times a Gaussian query at the parameters she suspects Alice uses: ~2 us (hit) says
    Alice ran it recently, ~3 ms (miss) that she did not. Must hold: Mallory's query does the search whether
    or not Alice ran it; Alice's own repeat (and her second session's) is still a hit."""
    work = _Counted(monkeypatch, queries, "dp_lib")
    eps = _fresh_epsilon()
    alice, alice_again, mallory = user_session("alice"), user_session("alice"), user_session("mallory")
    with acting_as(alice):
        want = queries.gaussian_sigma(1.0, eps, 1e-5)
    assert work.calls == 1
    with acting_as(mallory):
        got = queries.gaussian_sigma(1.0, eps, 1e-5)
    assert work.calls == 2, "Mallory's query hit Alice's entry: its time says Alice used these parameters"
    assert got == want
    with acting_as(alice_again):
        queries.gaussian_sigma(1.0, eps, 1e-5)
    assert work.calls == 2, "a user's own repeat must stay cached (the honest path)"


def test_a_user_filling_the_sigma_cache_does_not_evict_another_users_entry(monkeypatch):
    """Attack (slowing honest users): Mallory sends 2,000 queries of fresh parameters; a shared LRU of 1,024
    drops Alice's entry, and every Alice query pays the search again. Must hold: Alice's entry survives."""
    work = _Counted(monkeypatch, queries, "dp_lib")
    eps = _fresh_epsilon()
    alice, mallory = user_session("alice"), user_session("mallory")
    with acting_as(alice):
        queries.gaussian_sigma(1.0, eps, 1e-5)
    monkeypatch.setattr(queries, "dp_lib", lambda: type("Lib", (), {"get_sigma_gaussian": lambda e, d: 1.0}))
    with acting_as(mallory):
        for i in range(2000):
            queries.gaussian_sigma(1.0 + i, eps, 1e-5)
    monkeypatch.undo()
    work = _Counted(monkeypatch, queries, "dp_lib")
    with acting_as(alice):
        queries.gaussian_sigma(1.0, eps, 1e-5)
    assert work.calls == 0, "Mallory's queries evicted Alice's cached sigma"


# 2 -- OpenDP measurements -------------------------------------------------------------------------------------

def test_another_users_noise_scale_does_not_make_my_measurement_a_hit(monkeypatch):
    """Attack: the OpenDP measurement of a release is built once per (kind, integer, scale): a Laplace count
    at scale 1/epsilon answered faster iff another user released at that scale. Must hold: Mallory's
    release builds its own measurement; the noise is the same mechanism (plain OpenDP, checked by its map)."""
    work = _Counted(monkeypatch, core, "_opendp")
    scale = 1 / _fresh_epsilon()
    with acting_as(user_session("alice")):
        core._measurement("laplace", True, scale)
    with acting_as(user_session("mallory")):
        built = core._measurement("laplace", True, scale)
    assert work.calls == 2, "Mallory's release reused Alice's measurement: its time says Alice used that scale"
    assert built.map(1) == pytest.approx(1 / scale, rel=1e-9)


# 3 -- the RDP ledger's one-step RDP ----------------------------------------------------------------------------

def test_another_users_training_does_not_make_my_rdp_step_a_hit(monkeypatch):
    """Attack: the RDP ledger computes one step's RDP per (sigma, q) (~0.1 s) and kept it for every user:
    Mallory's charge at Alice's (sigma, q) came back 0.1 s sooner iff Alice trained with it. Must hold:
    Mallory's charge computes it; the epsilon equals dp_accounting's RdpAccountant."""
    work = _Counted(monkeypatch, accountant, "sgm_event")
    sigma = 1.0 + _fresh_epsilon()
    with acting_as(user_session("alice")):
        accountant._rdp_epsilon([[sigma, 0.01, 10]], 1e-5)
    with acting_as(user_session("mallory")):
        eps = accountant._rdp_epsilon([[sigma, 0.01, 10]], 1e-5)
    assert work.calls == 2, "Mallory's RDP step hit Alice's entry"
    lib = accountant.dp_lib().rdp.RdpAccountant()
    lib.compose(accountant.sgm_event(sigma, 0.01, 10))
    assert eps == pytest.approx(lib.get_epsilon(1e-5), rel=1e-9)


# 4 -- the PLD ledger's one-step PLDs and composed epsilons ------------------------------------------------------

def test_another_users_training_does_not_make_my_pld_a_hit(monkeypatch):
    """Attack: a one-step PLD (0.1-4 s to build) was kept per (sigma, q) for every user, and the composed
    epsilon per history: Mallory's DP-SGD charge at Alice's parameters (or her whole history) returned
    seconds sooner iff Alice trained with them. Must hold: Mallory's composition builds its own PLD, and
    gives the same epsilon (the library's, composed directly)."""
    builds = _Counted(monkeypatch, pld_cache, "_build")
    sigma = 2.0 + _fresh_epsilon()
    runs = [[sigma, 0.01, 5]]
    with acting_as(user_session("alice")):
        alice = pld_cache.composed_epsilon(runs, 1e-5, True, 1e-2)
    assert builds.calls == 1
    with acting_as(user_session("mallory")):
        mine = pld_cache.composed_epsilon(runs, 1e-5, True, 1e-2)
    assert builds.calls == 2, "Mallory's composition reused Alice's kept PLD (or her composed epsilon)"
    want = pld_cache._build(sigma, 0.01, True, 1e-2).self_compose(5).get_epsilon_for_delta(1e-5)
    assert alice == mine == pytest.approx(want, rel=1e-12)


def test_a_user_filling_the_kept_plds_does_not_evict_another_users(monkeypatch):
    """Attack (slowing everyone's charges): Mallory trains with fresh (sigma, q) pairs at several deltas (the
    cap on distinct pairs is per delta) until the kept bytes are full; Alice's PLD is dropped and her next
    step rebuilds it inside the ledger's write lock. Must hold: Alice's kept PLD survives Mallory's, and
    the kept bytes stay within their bound (Mallory's within her share)."""
    one = pld_cache._pld_bytes(pld_cache._build(2.0, 0.01, True, 1e-2))
    monkeypatch.setattr(pld_cache, "ONE_STEP_BYTES", 4 * one)
    monkeypatch.setattr(pld_cache, "_kept", ScopedCache(2 * one, 4 * one))  # (Mallory's share: two PLDs)
    alice, mallory = user_session("alice"), user_session("mallory")
    with acting_as(alice):
        mine = pld_cache.one_step_pld(2.0, 0.01, True, 1e-2)
    with acting_as(mallory):
        for i in range(1, 7):
            pld_cache.one_step_pld(2.0 + i / 100, 0.01, True, 1e-2)
    builds = _Counted(monkeypatch, pld_cache, "_build")
    with acting_as(alice):
        again = pld_cache.one_step_pld(2.0, 0.01, True, 1e-2)
    assert builds.calls == 0 and again is mine, "Mallory's pairs evicted Alice's kept PLD"
    kept = pld_cache._kept
    assert kept.weight(mallory.account.users) <= 2 * one and kept.weight() <= 4 * one


def test_a_charge_builds_each_new_pld_once_for_its_user(tmp_path, monkeypatch):
    """Guard (the honest path): the ledger composes a step before its write transaction and again inside it;
    both run for the same requesting user, so a DP-SGD step of a new (sigma, q) builds its PLD once (not
    again inside the lock every user's charge waits for), and the user's next step builds none. Another
    user's step at the same pair builds its own, and both are charged the same epsilon."""
    from veil.dp.budget import BudgetLedger

    builds = _Counted(monkeypatch, pld_cache, "_build")
    ledger = BudgetLedger(tmp_path / "ledger.db")
    sigma = 2.0 + _fresh_epsilon()
    for user in ("alice", "mallory"):
        ledger.set_budget(user, 1e6, 0.5)
    with acting_as(user_session("alice")):
        ledger.charge_training_step("alice", sigma, 0.01, 1e-5, replace_one=True)
        assert builds.calls == 1
        ledger.charge_training_step("alice", sigma, 0.01, 1e-5, replace_one=True)
        assert builds.calls == 1
    with acting_as(user_session("mallory")):
        ledger.charge_training_step("mallory", sigma, 0.01, 1e-5, replace_one=True)
        ledger.charge_training_step("mallory", sigma, 0.01, 1e-5, replace_one=True)
    assert builds.calls == 2
    assert ledger.spent("alice")[0] == ledger.spent("mallory")[0] > 0


# 5 -- the scoped cache itself ------------------------------------------------------------------------------------

def test_scoped_cache_bounds_every_scope_and_all_of_them():
    """Must hold: each scope keeps at most its share (its own oldest dropped), all scopes at most the total:
    total // per_scope slots, one the in-process scope's; a scope without a free slot is not kept and drops
    nobody's entries (second pass: tests/security/test_redteam_caches_second.py)."""
    cache = ScopedCache(per_scope=3, total=12)
    for scope in range(5):
        for k in range(5):
            cache.put(scope, k, (scope, k))
            assert cache.weight(scope) <= 3 and cache.weight() <= 12
            assert cache.get(scope, k) == ((scope, k) if scope < 3 else None)
    assert cache.keys(2) == [2, 3, 4] and cache.keys(0) == [2, 3, 4] and cache.keys(4) == []
    cache.put(None, "owner", 1)  # (the in-process scope's slot)
    assert cache.get(None, "owner") == 1 and cache.weight() <= 12
    cache.put(None, "big", 0, weight=4)  # heavier than a share: not kept, nothing dropped for it
    assert cache.get(None, "big", "none") == "none" and cache.keys(None) == ["owner"]


def test_sessions_name_their_users_as_the_cache_scope(monkeypatch, hook):
    """Guard: the scope is the session's users, whatever its session: two sessions of one user share it
    (the honest path stays cached across reconnects), two users never; in-process callers have none."""
    import torch
    from server_sessions import open_session, quota_worker, send_tensor

    srv = quota_worker(hook, f"cache-scope-{secrets.token_hex(4)}", "token-alice", None)
    srv.tokens.add("token-mallory", "mallory", "scientist")
    seen = []
    real = type(srv)._recv_msg

    def recording(self, data):
        seen.append(current_scope())
        return real(self, data)

    monkeypatch.setattr(type(srv), "_recv_msg", recording)
    for token in ("token-alice", "token-alice", "token-mallory"):
        send_tensor(srv, open_session(srv, token), torch.ones(2))
    assert seen == [(("scientist", "sci"),), (("scientist", "sci"),), (("scientist", "mallory"),)]
    assert current_scope() is None
    assert math.isfinite(queries.gaussian_sigma(1.0, 1.0, 1e-5))


# 6 -- owner_guard's signature cache ---------------------------------------------------------------------------

def test_one_users_commands_cannot_evict_another_users_op_signatures():
    """Attack (prime and probe): the in-place check keeps ``inspect.signature`` per allowlisted function in an
    LRU of 512, fewer than the ~530 functions a command may name; Mallory calling 512 of them evicts the
    entries of the ops others use, and her own next calls then tell which of hers others' calls pushed out.
    Must hold: every allowlisted function's signature stays kept (no user can evict another's entry)."""
    from veil.messaging.allowlist import ALLOWLIST
    from veil.workers import owner_guard

    funcs = list({id(op.func): op.func for op in ALLOWLIST._by_name.values()}.values())
    for func in funcs:
        owner_guard._signature(func)
    before = owner_guard._signature.cache_info()
    for func in funcs:
        owner_guard._signature(func)
    after = owner_guard._signature.cache_info()
    assert after.misses == before.misses, f"{after.misses - before.misses} of {len(funcs)} signatures were evicted"
