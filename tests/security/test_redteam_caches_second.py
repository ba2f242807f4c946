"""Red team, second pass: the per-user caches (veil/workers/user_caches.py) and the caches the first pass left.

Each test counts work or reads the caches' state, never wall time.

Holes found (10 tests here failed on 4f08206, checked in a git worktree; the memory guard passed there too):
- ScopedCache's total dropped the least recently active *other* users' whole partitions. The kept PLDs gave a
  user half of the total, so two user names (two tokens) filled it and dropped every other user's PLDs at
  will, each victim's next step rebuilding them (0.1-4 s); and with a few names an attacker timed the drop:
  refilling the total after a victim's request dropped the victim, not its own older partition, iff the victim
  had been active since -- its own hits and misses said whether a chosen user had made a DP request.
- current_scope was the session's whole set of users: a connection presenting k tokens had 2^k - 1 scopes.
- veil.mpc.material._PRODUCT_SHAPES: one dict for every session (a hit said another session dealt a product
  of those shapes; 512 fresh shapes cleared it for everyone).
- veil.he.evaluation_checks._key_parms_id (lru 8: a SEALContext built per miss) and veil.he.paillier._params
  (lru 64): shared by every user (one user's parameters made another's a hit; 8 fresh ones evicted them).
- veil.dp.budget's refused training runs were kept per (user, delta), 1,024 keys for all users, the oldest
  dropped: a user out of budget sending steps at fresh deltas composed a fresh (sigma, q) each time (a PLD or
  RDP build per step, uncapped), and its keys pushed out other users' refused runs.
Fix: a scope's partition is dropped only when its own user was idle IDLE_SECONDS; the total is kept by slots
(a user without one is not kept), an issuer's clients hold at most a quarter of them; a scope is one user (the
least of the session's); product shapes and the HE parameters cached per user; refused runs counted per user
over all deltas.
Left: with every slot held by users active within IDLE_SECONDS a new user is not kept, and learns only that
(a count of recently active users, at a 10-minute grain); a crypto provider's requester is the peer link, so
one peer worker's users share its product shapes there.
"""

from __future__ import annotations

import secrets

import pytest

from veil.dp import pld_cache, queries
from veil.workers import user_caches
from veil.workers.user_caches import ScopedCache, current_scope

from cache_scopes import acting_as, user_session


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _scope(name: str, role: str = "scientist"):
    return ((role, name),)


def _cache(per_scope: int, total: int, clock=None) -> ScopedCache:
    try:
        return ScopedCache(per_scope, total, clock=clock or _Clock())
    except TypeError:  # (the first pass's cache had no clock)
        return ScopedCache(per_scope, total)


# 1 -- dropping another user's partition -------------------------------------------------------------------------

def test_two_user_names_cannot_drop_another_users_kept_plds():
    """Attack: the kept PLDs gave one user half of the total; Mallory with two tokens fills both halves and
    Alice's PLDs are dropped (her next step rebuilds them, 0.1-4 s each). Must hold: Alice's entry stays."""
    cache = _cache(pld_cache.USER_BYTES, pld_cache.ONE_STEP_BYTES)
    cache.put(_scope("alice"), "alice-pld", "pld", 80 << 10)
    for name in ("mallory", "mallory-2", "mallory-3"):
        for i in range(4):
            cache.put(_scope(name), (name, i), "pld", pld_cache.USER_BYTES // 4)
    assert cache.get(_scope("alice"), "alice-pld") == "pld", "Mallory's names dropped Alice's kept PLD"
    assert cache.weight() <= pld_cache.ONE_STEP_BYTES


def test_many_issued_client_names_cannot_drop_a_scientists_sigmas_nor_take_every_slot(monkeypatch):
    """Attack: a serving owner issues client tokens ``NAME/HOLDER``; Mallory holding 80 of them fills the
    Gaussian sigma cache (256 each, 16,384 for all) and Alice's entries are dropped. Must hold: Alice's entry
    stays; Mallory's names together do not hold every slot (Bob, arriving after them, is still kept); the
    kept weight stays within the total."""
    monkeypatch.setattr(queries, "dp_lib", lambda: type("Lib", (), {"get_sigma_gaussian": lambda e, d: 2.0}))
    cache = queries.gaussian_sigma.cache
    monkeypatch.setattr(queries.gaussian_sigma, "cache", cache)  # (restored after: cleared below)
    cache.clear()
    try:
        with acting_as(user_session("alice")):
            queries.gaussian_sigma(1.0, 0.5, 1e-5)
        for holder in range(80):
            with acting_as(user_session(f"shop/c{holder}", role="client")):
                for i in range(cache.per_scope + 1):
                    queries.gaussian_sigma(1.0 + i, 0.5, 1e-5)
        with acting_as(user_session("bob")):
            queries.gaussian_sigma(3.0, 0.5, 1e-5)
        assert cache.keys(_scope("alice")) == [(1.0, 0.5, 1e-5)], "the clients dropped Alice's sigma"
        assert cache.keys(_scope("bob")) == [(3.0, 0.5, 1e-5)], "one issuer's clients took every slot"
        assert cache.weight() <= cache.total
    finally:
        cache.clear()


def test_refilling_the_cache_does_not_tell_whether_a_chosen_user_was_active():
    """Attack (activity oracle): Mallory holds two scopes; she fills the total with her second one and the
    victim's partition, the victim may or may not make a request, then Mallory's first scope puts past the
    total. The rule dropped the least recently active other partition: her own second one iff the victim had
    been active since, so probing her own entry told her whether Alice made a DP request. Must hold: what
    Mallory observes of her own entries is the same whether or not Alice was active."""
    def observed(alice_active: bool) -> list:
        clock = _Clock()
        cache = _cache(4, 12, clock)
        for k in range(2):
            cache.put(_scope("alice"), k, 1)
        for name in ("m2", "m1"):
            for k in range(4):
                cache.put(_scope(name), k, 1)
        clock.now += 1
        if alice_active:
            cache.get(_scope("alice"), 0)
        clock.now += 1
        for k in range(4):
            cache.put(_scope("m3"), k, 1)
        return [cache.get(_scope(name), k, "miss") for name in ("m1", "m2", "m3") for k in range(4)]

    assert observed(True) == observed(False), "Mallory's own entries told whether Alice was active"


def test_a_partition_goes_only_after_its_own_user_was_idle():
    """Guard: a user's entries are kept while it keeps using them, whatever others do, and dropped once it was
    idle IDLE_SECONDS (its slot then free for a new user)."""
    clock = _Clock()
    cache = _cache(2, 6, clock)
    assert getattr(cache, "slots", None) == 2  # (6 // 2 = 3 slots: two for network users, one in-process)
    cache.put(_scope("alice"), "a", 1)
    cache.put(_scope("bob"), "b", 1)
    cache.put(None, "owner", 1)
    cache.put(_scope("carol"), "c", 1)  # no slot free: not kept, nobody's dropped
    assert cache.get(_scope("carol"), "c", "miss") == "miss" and cache.get(_scope("bob"), "b") == 1
    clock.now += user_caches.IDLE_SECONDS - 1
    assert cache.get(_scope("alice"), "a") == 1  # (Alice's use keeps hers)
    clock.now += 2
    assert cache.get(_scope("bob"), "b", "miss") == "miss"  # (Bob idle: his partition went, whoever asked)
    cache.put(_scope("carol"), "c", 1)
    assert cache.get(_scope("carol"), "c") == 1 and cache.get(_scope("alice"), "a") == 1
    assert cache.get(None, "owner", "miss") == "miss"  # (the owner's in-process entries idle as long)


def test_a_user_without_a_slot_composes_its_step_once_not_again_under_the_ledger_lock(tmp_path, monkeypatch):
    """Guard (the slots' price): with every slot held by active users, a new user's entries are not kept in the
    cache; its DP-SGD step must still compose its history once, before the write transaction, not again inside
    it (every user's charge waits for that lock), and be charged the library's epsilon."""
    from veil.dp.budget import BudgetLedger

    monkeypatch.setattr(pld_cache, "_kept", ScopedCache(1 << 30, 1 << 30))  # (one slot each: Alice's)
    monkeypatch.setattr(pld_cache._composed, "cache", ScopedCache(64, 64))
    ledger = BudgetLedger(tmp_path / "ledger.db")
    for user in ("alice", "mallory"):
        ledger.set_budget(user, 1e6, 0.5)
    with acting_as(user_session("alice")):
        ledger.charge_training_step("alice", 2.5, 0.01, 1e-5, replace_one=True)
    built, under_lock, real = [], [], pld_cache._build

    def counted(*args):
        built.append(args)
        if ledger._lock._is_owned():
            under_lock.append(args)
        return real(*args)

    monkeypatch.setattr(pld_cache, "_build", counted)
    sigma = 2.0 + secrets.randbelow(10**6) / 1e7
    with acting_as(user_session("mallory")):
        ledger.charge_training_step("mallory", sigma, 0.01, 1e-5, replace_one=True)
    assert pld_cache._kept.keys(_scope("mallory")) == [] and len(built) == 1 and not under_lock, under_lock
    want = real(*built[0]).get_epsilon_for_delta(1e-5)  # (one step: its PLD at the ledger's interval)
    assert ledger.spent("mallory")[0] == pytest.approx(want, rel=1e-9)


def test_65536_users_each_filling_their_share_stay_within_the_total():
    """Guard (memory): 65,536 users each filling their share keep at most the total, in at most the slots."""
    cache = _cache(4, 256)
    for user in range(65536):
        for i in range(5):
            cache.put(_scope(f"u{user}"), i, i)
    assert cache.weight() <= 256 and len(cache._scopes) <= 256 // 4


# 2 -- the scope of a connection ---------------------------------------------------------------------------------

def test_a_connection_with_k_tokens_has_at_most_k_scopes():
    """Attack: the scope was the session's whole set of users, so 4 tokens made 15 scopes (each its own share
    and a partition in the total). Must hold: at most one scope per token held, each a user the connection
    proved, and a single user's sessions all share one."""
    names = ["m0", "m1", "m2", "m3"]
    scopes = set()
    for mask in range(1, 16):
        held = [n for i, n in enumerate(names) if mask >> i & 1]
        with acting_as(user_session(*held)):
            scope = current_scope()
        assert all(pair[1] in held for pair in scope)
        scopes.add(scope)
    assert len(scopes) <= len(names), f"{len(scopes)} scopes from {len(names)} tokens"
    assert current_scope() is None


# 3 -- the crypto provider's product shapes ------------------------------------------------------------------

def test_another_sessions_product_shape_does_not_make_mine_a_hit_nor_clear_it(monkeypatch):
    """Attack: the shape of a dealt product (a meta op, 0.1-0.5 ms) was kept in one dict for every session:
    Mallory's dealing of Alice's (op, shapes) was a hit iff Alice dealt it, and 512 fresh shapes of hers
    cleared the dict (Alice's next dealing a miss). Must hold: Mallory's first one computes, Alice's stays
    kept through Mallory's flood, and the shape is torch's."""
    import torch
    from veil.mpc import material

    calls = []
    real = material.bilinear

    def counted(op):
        calls.append(op)
        return real(op)

    monkeypatch.setattr(material, "bilinear", counted)
    n = 3 + secrets.randbelow(10**6)
    alice, mallory = user_session("alice"), user_session("mallory")
    with acting_as(alice):
        assert material.product_shape("matmul", (2, n), (n, 5), {}) == (2, 5)
    with acting_as(mallory):
        material.product_shape("matmul", (2, n), (n, 5), {})
        assert len(calls) == 2, "Mallory's product hit Alice's kept shape"
        for i in range(600):
            material.product_shape("matmul", (1, i + 1), (i + 1, 1), {})
    with acting_as(alice):
        before = len(calls)
        assert material.product_shape("matmul", (2, n), (n, 5), {}) == tuple((torch.empty(2, n) @ torch.empty(n, 5)).shape)
        assert len(calls) == before, "Mallory's shapes cleared Alice's"


# 4 -- HE parameter caches -------------------------------------------------------------------------------------

def test_another_users_ckks_parameters_do_not_make_my_check_a_hit(monkeypatch):
    """Attack: checking an encrypted batch builds a SEALContext for its parameters (milliseconds; kept, 8 for
    every user): Mallory's check at Alice's parameters was a hit iff Alice sent such a batch, and 8 fresh
    parameter sets of hers evicted Alice's. Must hold: Mallory's check builds its own; Alice's is kept."""
    from veil.he import evaluation_checks as checks

    built = []
    real = checks.sealapi.SEALContext

    def counted(*args):
        built.append(args)
        return real(*args)

    monkeypatch.setattr(checks.sealapi, "SEALContext", counted)
    params = checks.EvaluationParameters(8192, (60, 40, 40, 60), 2.0**40)
    with acting_as(user_session("alice")):
        want = checks._key_parms_id(params)
    with acting_as(user_session("mallory")):
        got = checks._key_parms_id(params)
        assert len(built) == 2 and got == want, "Mallory's check hit Alice's kept context"
        for bits in range(20, 30):  # (the scale is part of the key: each a fresh entry)
            checks._key_parms_id(checks.EvaluationParameters(8192, (60, 40, 40, 60), 2.0**bits))
    with acting_as(user_session("alice")):
        before = len(built)
        checks._key_parms_id(params)
    assert len(built) == before, "Mallory's parameter sets evicted Alice's"


def test_another_users_paillier_key_does_not_make_mine_a_hit(monkeypatch):
    """Attack: a Paillier key's derived parameters were kept for 64 moduli for every user. Must hold: another
    user's use of a modulus is no hit for Mallory, and 64 fresh moduli of Mallory's do not evict Alice's."""
    from veil.he import paillier

    made = []
    real = paillier._KeyParams

    def counted(*args):
        made.append(args)
        return real(*args)

    monkeypatch.setattr(paillier, "_KeyParams", counted)
    n = (1 << 255) + 2 * secrets.randbelow(1 << 200) + 1
    with acting_as(user_session("alice")):
        want = paillier._params(n)
    with acting_as(user_session("mallory")):
        assert paillier._params(n) == want and len(made) == 2, "Mallory's key hit Alice's kept parameters"
        for i in range(70):
            paillier._params(n + 2 * i + 2)
    with acting_as(user_session("alice")):
        before = len(made)
        paillier._params(n)
    assert len(made) == before, "Mallory's moduli evicted Alice's"


# 5 -- refused training runs in the ledger -----------------------------------------------------------------------

def test_refused_steps_at_fresh_deltas_do_not_compose_without_bound(tmp_path, monkeypatch):
    """Attack: a user out of budget sends DP-SGD steps of fresh (sigma, q) at a fresh delta each time; the cap of
    MAX_TRAINING_EVENTS distinct runs was per (user, delta), so each step composed a new run (a PLD or RDP
    build, 0.1-4 s of CPU), uncapped. Must hold: past the cap of distinct runs, a step is refused before any
    composition, whatever its delta; the refusal is one line."""
    from veil.dp import budget
    from veil.dp.accountant import Accountant
    from veil.dp.errors import BudgetExceededError, PrivacyParameterError

    composed = []
    monkeypatch.setattr(Accountant, "get_epsilon", lambda self, delta: composed.append(delta) or 1.0)
    ledger = budget.BudgetLedger(tmp_path / "ledger.db")
    ledger.set_budget("mallory", 0.5, 0.5)
    capped = []
    for i in range(budget.MAX_TRAINING_EVENTS + 8):
        try:
            ledger.charge_training_step("mallory", 1.0 + i / 100, 0.01, 1e-6 + i * 1e-9)
        except BudgetExceededError:
            pass
        except PrivacyParameterError as e:
            assert "\n" not in str(e)
            capped.append(i)
    assert len(composed) <= 2 * budget.MAX_TRAINING_EVENTS, f"{len(composed)} compositions of fresh runs"
    assert capped == list(range(budget.MAX_TRAINING_EVENTS, budget.MAX_TRAINING_EVENTS + 8))


def test_one_users_refused_runs_do_not_push_out_anothers(tmp_path, monkeypatch):
    """Attack: refused runs were kept for 1,024 (user, delta) keys in all, the oldest dropped: Mallory's steps at
    fresh deltas pushed out Alice's, whose next fresh runs then composed again past her cap. Must hold: Alice's
    cap stays whatever Mallory does."""
    from veil.dp import budget
    from veil.dp.accountant import Accountant
    from veil.dp.errors import BudgetExceededError, PrivacyParameterError

    monkeypatch.setattr(budget, "_KNOWN_TOTALS", 8)
    monkeypatch.setattr(Accountant, "get_epsilon", lambda self, delta: 1.0)
    ledger = budget.BudgetLedger(tmp_path / "ledger.db")
    for user in ("alice", "mallory"):
        ledger.set_budget(user, 0.5, 0.5)
    for i in range(budget.MAX_TRAINING_EVENTS):
        with pytest.raises(BudgetExceededError):
            ledger.charge_training_step("alice", 1.0 + i / 100, 0.01, 1e-6)
    for i in range(12):
        try:
            ledger.charge_training_step("mallory", 2.0, 0.01, 1e-6 + i * 1e-9)
        except BudgetExceededError:
            pass
    with pytest.raises(PrivacyParameterError, match="distinct"):
        ledger.charge_training_step("alice", 3.0, 0.01, 1e-6)
