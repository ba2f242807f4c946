"""Red team, second pass: secure aggregation's consistency round (``veil.secagg.confirm``,
veil/federated/secagg_confirm.py) and the FSS comparison steps' bounds (veil/mpc/providers/fss_dealing.py).

Findings (each test below failed on the code before this pass; checked by running it there):

1. ``test_confirmation_tags_bind_the_exact_survivor_ids``: a tag MACed the survivor ids joined by "\\0", so
   the sets ["a\\0b", "c"] and ["a", "b\\0c"] had one tag: a confirmation of one set counted for another.
   Now each id is length-prefixed.
2. ``test_every_stage_secure_aggregate_runs_is_in_STAGES``: ``STAGES`` (the per-stage dropout tests) lacked
   ``confirm``, so no test killed clients there.
3. ``test_a_confirmed_survivor_set_is_charged_to_its_round``: ``client_memory.round_bytes`` did not count the
   ``confirmed`` list (a copy of up to 1000 coordinator-sized ids per round).
4. ``test_a_comparison_dealing_of_many_items_is_refused_before_any_key_is_made``: ``deal_comparison`` had no
   item bound; each item costs a DCF key generation (~30-50 ms whatever its size): 10^5 items of one entry
   were about an hour of the provider's CPU from one request.
5. ``test_a_received_comparison_of_many_items_is_refused_before_it_is_expanded``: ``receive_comparison``
   allowed 2^27 elements, so 10^5 one-entry items (~0.1 ms of checks per field) passed its bound.
   Both now take at most ``MAX_COMPARISON_ITEMS`` per request; an honest dealer asks in requests of that many
   (``test_honest_bulk_comparison_dealing_is_split_into_bounded_requests``).

Guards that held (they fail if the round stops binding its tags): tags replayed from an earlier round, and one
member's tag copied into other members' rows, do not count towards the threshold.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.exceptions import VeilError
from veil.federated import client_memory, secagg_confirm, secagg_crypto as sc
from veil.federated import secure_agg as sa
from veil.ids import new_id
from veil.mpc import comparison
from veil.mpc.errors import ProviderError
from veil.mpc.providers import fss_dealing
from veil.mpc.providers.worker_dealer import dealer_for


def _workers(hook, n):
    prefix = f"sc{new_id() % 10**9:09d}"
    workers = [sy.VirtualWorker(hook, id=f"{prefix}-{k}") for k in range(n)]
    ptrs = [torch.randn(4, dtype=torch.float64).send(w) for w in workers]
    return workers, [w.id for w in workers], ptrs


def _call(name, args, w):
    return sa._fetch(sa._call(f"veil.secagg.{name}", args, w))


def _masked_round(workers, ids, ptrs, tag, t):
    """advertise, share_keys and masked_input over all ``workers`` (everyone survives)."""
    pks = torch.stack([_call("advertise", (tag, len(ids), t), w) for w in workers])
    for w in workers:
        sa._call("veil.secagg.share_keys", (tag, ids, pks), w)
    for w, p in zip(workers, ptrs):
        _call("masked_input", (tag, ids, [p], 1.0), w)


# -- the consistency round ---------------------------------------------------------------------------------

def test_confirmation_tags_bind_the_exact_survivor_ids():
    key = sc.new_private_key()
    private, public = sc.private_bytes(key), sc.public_bytes(sc.new_private_key())
    one = secagg_confirm._tag(private, public, 5, ["a\0b", "c"])
    assert one != secagg_confirm._tag(private, public, 5, ["a", "b\0c"])
    assert one == secagg_confirm._tag(private, public, 5, ["c", "a\0b"])  # (order-free: a set)
    assert one != secagg_confirm._tag(private, public, 6, ["a\0b", "c"])  # bound to the round


def test_replayed_or_copied_tags_do_not_count_towards_the_threshold(hook):
    workers, ids, ptrs = _workers(hook, 4)
    t = 3  # a majority of 4
    _masked_round(workers, ids, ptrs, 8101, t)
    old = {i: _call("confirm", (8101, ids), w) for i, w in zip(ids, workers)}
    _masked_round(workers, ids, ptrs, 8102, t)
    new = {i: _call("confirm", (8102, ids), w) for i, w in zip(ids, workers)}
    with pytest.raises(VeilError, match=r"unmask: refused \(1 of the survivors confirmed this set, 3 needed\)"):
        _call("unmask", (8102, ids, [], secagg_confirm.for_client(old, ids, ids[0])), workers[0])  # last round's
    copied = secagg_confirm.for_client(new, ids, ids[0])
    copied[2] = copied[3] = copied[1]  # member 1's (valid) tag in the rows of members 2 and 3
    with pytest.raises(VeilError, match=r"unmask: refused \(2 of the survivors confirmed this set, 3 needed\)"):
        _call("unmask", (8102, ids, [], copied), workers[0])
    b_rows, _ = _call("unmask", (8102, ids, [], secagg_confirm.for_client(new, ids, ids[0])), workers[0])
    assert tuple(b_rows.shape) == (4, sc.SHARE_BYTES)  # the round still finishes with the real tags
    for w in workers:
        sa._call("veil.secagg.discard", (8101,), w), sa._call("veil.secagg.discard", (8102,), w)


def test_every_stage_secure_aggregate_runs_is_in_STAGES(hook):
    """STAGES drives the dropout-per-stage tests (tests/federated/test_secure_agg.py): a stage missing from it
    is one where no test kills clients."""
    workers, ids, _ = _workers(hook, 3)
    plains = [torch.randn(4, dtype=torch.float64) for _ in workers]
    ran = []
    inputs = {i: sa.ClientInput(w, [p.send(w)], 1.0) for i, w, p in zip(ids, workers, plains)}
    result = sa.secure_aggregate(inputs, int(new_id()), before_stage=ran.append)
    assert tuple(ran) == sa.STAGES
    plain = sum(plains)
    torch.testing.assert_close(result.total[0], plain, atol=1e-5, rtol=0)


def test_a_confirmed_survivor_set_is_charged_to_its_round(hook):
    workers, _, _ = _workers(hook, 1)
    long_ids = [f"{'x' * 4000}-{k}" for k in range(3)]  # ids are the coordinator's to size
    state = types.SimpleNamespace(ids=[], publics={}, held={}, deposited_keys={}, masked_with=None, n=3,
                                  confirmed=None)
    before = client_memory.round_bytes(state)
    state.confirmed = sorted(long_ids)
    assert client_memory.round_bytes(state) >= before + 3 * 4000


# -- FSS comparison material: CPU per request ------------------------------------------------------------

@pytest.fixture
def derive_spy(monkeypatch):
    made = []

    def spy(masks, n_values):
        made.append(n_values)
        raise RuntimeError("a DCF key was generated")
    monkeypatch.setattr(fss_dealing.fss, "derive", spy)
    return made


def test_a_comparison_dealing_of_many_items_is_refused_before_any_key_is_made(hook, derive_spy):
    workers, ids, _ = _workers(hook, 3)
    count = 100_000
    per_party = [len(fss_dealing.fss.field_shapes((1,), 0, i < 2)) for i in range(2)]
    id_lists = [list(range(count * k)) for k in per_party]
    with pytest.raises(ProviderError, match="comparison item count must be an int in") as e:
        fss_dealing._deal_comparison(workers[0], ((1,), 0), ids[1:], id_lists, count, True)
    assert "\n" not in str(e.value) and derive_spy == []
    with pytest.raises(ProviderError, match="ring elements per party"):  # few items, each of many entries
        fss_dealing._deal_comparison(workers[0], ((1 << 16,), 0), ids[1:],
                                     [list(range(20 * k)) for k in per_party], 20, True)
    assert derive_spy == []


def test_a_received_comparison_of_many_items_is_refused_before_it_is_expanded(monkeypatch):
    expanded = []

    def spy(seed, label, shape):
        expanded.append(label)
        raise RuntimeError("expanded")
    monkeypatch.setattr(fss_dealing, "expand", spy)
    party = types.SimpleNamespace(id="party")  # (no monitor: no session quota to check)
    seed = torch.zeros(fss_dealing.SEED_BYTES, dtype=torch.uint8)
    with pytest.raises(ProviderError, match="comparison item count must be an int in"):
        fss_dealing._receive_comparison(party, [1], 0, 100_000, seed, [], [])
    assert expanded == []


@pytest.fixture
def fss_setup(hook, monkeypatch):
    monkeypatch.setattr(comparison, "DEFAULT_COMPARISON", "fss")
    prefix = f"sb{new_id() % 10**9:09d}"
    parties = [sy.VirtualWorker(hook, id=f"{prefix}-{n}") for n in ("alice", "bob", "charlie")]
    cp = sy.VirtualWorker(hook, id=f"{prefix}-cp")
    dealer = dealer_for(cp, hook.local_worker)
    yield parties, cp, dealer
    dealer.drop_ahead()
    dealer.on_exhausted = "deal"


def test_honest_bulk_comparison_dealing_is_split_into_bounded_requests(fss_setup, monkeypatch):
    parties, cp, dealer = fss_setup
    values = [torch.randn(5) * 100 for _ in range(7)]
    shared = [v.fix_precision().share(*parties, crypto_provider=cp) for v in values]
    with dealer.record() as plan:
        F.relu(shared[0]).get()
    monkeypatch.setattr(fss_dealing, "MAX_COMPARISON_ITEMS", 3)
    requests = dealer.requests
    dealer.deal_ahead(plan, repeat=7)  # 7 items of one key: requests of 3 + 3 + 1
    assert dealer.requests == requests + 3
    dealer.on_exhausted = "raise"  # the calls use exactly that material
    for v, x in zip(values, shared):
        torch.testing.assert_close(F.relu(x).get().float_precision(), F.relu(v), atol=2**-15, rtol=0)


def test_a_long_comparison_dealing_or_expansion_stops_at_the_commands_deadline(hook, monkeypatch):
    """A request's items (a DCF key generation each, ~33-55 ms; up to 2^27 expanded elements) ran on past the
    owner's per-command limit: the steps now check the command's deadline between items."""
    from veil.exceptions import CommandTimeoutError
    from veil.mpc.providers import worker_dealer
    from veil.workers import cancellation

    workers, ids, _ = _workers(hook, 3)
    made: list = []
    real_derive = fss_dealing.fss.derive

    def slow_derive(masks, n_values, **options):  # (options: the between-chunks checkpoint)
        made.append(n_values)
        token.deadline = 0.0  # (the deadline passes while the first item's key is made)
        return real_derive(masks, n_values, **options)

    monkeypatch.setattr(fss_dealing.fss, "derive", slow_derive)
    per_party = [len(fss_dealing.fss.field_shapes((4,), 0, i < 2)) for i in range(2)]
    token = cancellation.CancelToken(seconds=60)
    token.start()
    with cancellation.running(token), pytest.raises(CommandTimeoutError):
        fss_dealing._deal_comparison(workers[0], ((4,), 0), ids[1:], [list(range(5 * k)) for k in per_party], 5,
                                     True)
    assert len(made) == 1, f"{len(made)} of 5 keys made past the deadline"

    expanded: list = []
    real_expand = worker_dealer.expand

    def counting_expand(seed, label, shape, **options):  # (options: the hand-overs within a field)
        expanded.append(label)
        token.deadline = 0.0
        return real_expand(seed, label, shape, **options)

    monkeypatch.setattr(worker_dealer, "expand", counting_expand)
    token = cancellation.CancelToken(seconds=60)
    token.start()
    seed = torch.zeros(fss_dealing.SEED_BYTES, dtype=torch.uint8)
    party = types.SimpleNamespace(id="party")  # (no monitor: no session quota to check)
    monkeypatch.setattr(worker_dealer, "room_for", lambda *a: None)
    with cancellation.running(token), pytest.raises(CommandTimeoutError):
        worker_dealer._expand_material(party, seed, "beaver", ("mul", [4], [4], {}), 5, [])
    assert 0 < len(expanded) <= 3, f"{len(expanded)} fields expanded past the deadline (3 per item)"
    # outside a worker's command nothing is checked: an honest expansion gives every item
    monkeypatch.setattr(worker_dealer, "expand", real_expand)
    assert len(worker_dealer._expand_material(party, seed, "beaver", ("mul", [4], [4], {}), 2, [])) == 6
