"""Red team (fresh eyes): the least-attacked entry points - the MPC protocol steps a session can call by name
(``veil.mpc.prg_share``, ``veil.mpc.expand_material``, ``veil.mpc.receive_comparison``: never attacked for
resources) and secure aggregation's ``unmask`` (never attacked with per-client survivor sets).

They are worker functions, and worker functions are not sized on ``meta`` before they run
(``veil/workers/output_bounds.py`` sizes torch ops only): the requester names a shape and an item count, the
worker expands that much AES keystream, and only the store's quota said no - after the memory was filled.

Findings (each test below failed before this pass; checked by running it against the unfixed functions):

1. ``test_a_seeded_share_is_refused_before_it_is_expanded``: ``prg_share(seed, [2**24])`` under a 64 MiB
   quota expanded 128 MiB before the store refused it; ``[2**37]`` tried to allocate 1 TiB (the allocator's
   error proves it ran). No bound at all without a quota.
2. ``test_a_seeded_share_takes_only_whole_sizes``: ``[-1]`` and ``[3.5]`` were taken (``int()`` of each).
3. ``test_received_comparison_material_is_bounded_before_it_is_expanded``: ``receive_comparison`` had no
   element bound (``check_spec`` checks types only): a 1 TiB allocation attempt, or 3 x 128 MiB expanded
   past a 64 MiB quota.
4. ``test_expanded_dealt_material_is_refused_before_it_is_expanded``: ``expand_material`` was bounded
   (``MAX_DEAL_ELEMENTS``, 1 GiB) but expanded up to that before a smaller quota refused it.
5. ``test_a_lying_coordinator_cannot_unmask_one_clients_input`` (secure aggregation, ``veil.secagg.unmask``,
   which no test had attacked with inconsistent views at a majority threshold): each client checked only its
   own survivor/dropout lists. Told {D, A, B} to D, and A and B as dropped to the others, the coordinator
   collected t shares of D's self-mask seed and of A's and B's keys, and read D's input exactly (run against
   the unfixed code: the assertion failed with the recovered input equal to D's). Fixed by the consistency
   round (``veil/federated/secagg_confirm.py``); ``test_a_client_confirms_one_survivor_set_and_...`` pins it.

The MPC requests go through a real ``WebsocketServerWorker`` session (``serve_bytes``), in process; nothing
there allocates more than a few KiB for real (the expansion is spied on). The secure-aggregation rounds run
on in-process clients.
"""

from __future__ import annotations

import pytest
import torch

from veil.messaging import messages as m
from veil.mpc import prg
from veil.mpc.ring import DTYPE
from veil.mpc.providers import dealing_recipe, fss_dealing, worker_dealer
from veil.tensors.mpc_glue import remote_sharing

from server_sessions import quota_worker, session_helpers  # noqa: E402

TOKEN = "rt-fresh-eyes-scientist"
QUOTA = 64 << 20
SEED = torch.arange(32, dtype=torch.uint8)

_session, _request, _send, _command, _result = session_helpers(TOKEN)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def served(hook):
    # (hook: the session fixture that makes veil's torch hook)
    srv = quota_worker(hook, "fresh-eyes-a", TOKEN, QUOTA)
    return srv, _session(srv)


@pytest.fixture
def expanded(monkeypatch):
    """The element counts each protocol step asked the PRG to expand (the real expansion still runs)."""
    asked = []

    def spy(seed, label, shape, **kwargs):  # (between=: where a party hands its turn over)
        asked.append(int(torch.Size([int(d) for d in shape]).numel()))
        return prg.expand(seed, label, shape, **kwargs)

    for module in (remote_sharing, fss_dealing, worker_dealer, dealing_recipe):
        monkeypatch.setattr(module, "expand", spy)
    return asked


def _error(reply) -> tuple[str, str]:
    assert type(reply) is m.ErrorReply, reply
    return reply.error, reply.message


@pytest.mark.parametrize("shape, refusal", [([1 << 24], "QuotaExceededError"), ([1 << 37], "MPCError")])
def test_a_seeded_share_is_refused_before_it_is_expanded(served, expanded, shape, refusal):
    srv, s = served
    reply, _ = _command(srv, s, "veil.mpc.prg_share", SEED, shape)
    error, message = _error(reply)
    assert error == refusal and "allocate" not in message
    assert "\n" not in message
    assert expanded == []  # refused before any keystream was made
    ok, (rid,) = _command(srv, s, "veil.mpc.prg_share", SEED, [3, 2])  # the session still serves
    assert type(ok) is m.OkReply


@pytest.mark.parametrize("shape", [[-1], [3.5], [2, "4"], [True]])
def test_a_seeded_share_takes_only_whole_sizes(served, expanded, shape):
    srv, s = served
    reply, _ = _command(srv, s, "veil.mpc.prg_share", SEED, shape)
    assert _error(reply)[0] == "MPCError"
    assert expanded == []


def test_an_honest_seeded_share_is_the_owners_stream(served):
    """What the data owner subtracts for this party's share (``share_on_workers``) is what the party stores:
    the bound did not change the values."""
    srv, s = served
    reply, (rid,) = _command(srv, s, "veil.mpc.prg_share", SEED, [3, 2])
    assert type(reply) is m.OkReply
    stored = dict(srv.monitor.owner_entries())[rid].obj
    assert torch.equal(stored, prg.expand(bytes(SEED.tolist()), "share", [3, 2]))


@pytest.mark.parametrize("shape, count, refusal", [
    ([1 << 24], 1, "ProviderError"),  # 3 fields of 128 MiB: past MAX_EXPANDED_ELEMENTS (was: the 64 MiB quota)
    ([1 << 37], 1, "ProviderError"),  # past any bound: was a 1 TiB allocation attempt
    ([0], 1 << 27, "ProviderError"),  # empty fields, but a loop step each
])
def test_received_comparison_material_is_bounded_before_it_is_expanded(served, expanded, shape, count, refusal):
    srv, s = served
    reply, _ = _command(srv, s, "veil.mpc.receive_comparison", shape, 1, count, SEED, [], [])
    error, message = _error(reply)
    assert error == refusal and "allocate" not in message
    assert expanded == []


def test_expanded_dealt_material_is_refused_before_it_is_expanded(served, expanded):
    srv, s = served
    reply, _ = _command(srv, s, "veil.mpc.expand_material", SEED, "zero", ([1 << 25],), 1, [])
    assert _error(reply)[0] == "QuotaExceededError"
    assert expanded == []
    reply, _ = _command(srv, s, "veil.mpc.expand_material", SEED, "zero", ([4],), 1, [])
    assert type(reply) is m.OkReply and expanded == [4]  # a small one still runs


# -- secure aggregation: a coordinator that tells each client a different survivor set ------------------------

def _secagg_clients(hook, n):
    """``n`` in-process clients with ids in sort order (the pair masks' signs follow it), each holding a state."""
    import veil as sy
    from veil.ids import new_id

    prefix = f"fe{new_id() % 10**9:09d}"
    workers = [sy.VirtualWorker(hook, id=f"{prefix}-{k}") for k in range(n)]
    states = [torch.randn(6, dtype=torch.float64) for _ in workers]
    return workers, states, [s.send(w) for s, w in zip(states, workers)]


def test_a_lying_coordinator_cannot_unmask_one_clients_input(hook):
    from veil.exceptions import VeilError
    from veil.federated import secagg_crypto as sc
    from veil.federated.secure_agg import ENCODING, _call, _fetch
    from veil.mpc.encoding import decode

    workers, states, ptrs = _secagg_clients(hook, 5)
    a, b, c, d, e = ids = [w.id for w in workers]
    by_id = dict(zip(ids, zip(workers, ptrs)))
    tag, t = 7301, 3  # 2t > 5: the majority rule holds

    def call(wid, name, *args):
        return _call(f"veil.secagg.{name}", (tag, *args), by_id[wid][0])

    publics = {i: bytes(_fetch(call(i, "advertise", 5, t)).tolist()) for i in ids}
    table = torch.tensor([list(publics[i]) for i in ids], dtype=torch.int64)
    for i in ids:
        call(i, "share_keys", ids, table)
    # each client is told a survivor set of its own (all of at least t, all containing itself)
    told = {d: ([d, a, b], []), a: ([a, c, d], [b]), b: ([b, c, d], [a]), c: ([c, d, e], [a, b]),
            e: ([c, d, e], [a, b])}
    masked = {i: _fetch(call(i, "masked_input", sorted(s + dr), [by_id[i][1]], 1.0)) for i, (s, dr) in told.items()}
    confirmed = {}  # each client confirms the survivor set it was told; the coordinator forwards what it has
    for i, (survivors, _) in told.items():
        confirmed[i] = (survivors, _fetch(call(i, "confirm", survivors)))
    answers = {}
    for i, (survivors, dropped) in told.items():
        rows = [confirmed[v][1][confirmed[v][0].index(i)] if i in confirmed[v][0] else torch.zeros(32, dtype=DTYPE)
                for v in survivors]
        try:
            answers[i] = _fetch(call(i, "unmask", survivors, dropped, torch.stack(rows)))
        except VeilError as e:  # refused: that client hands over nothing
            assert "unmask: refused" in str(e) and "\n" not in str(e)
    point = {i: k + 1 for k, i in enumerate(ids)}  # share of the k-th id is the polynomial at k + 1

    def recover(secret_of, column):  # secret_of's shares, from the clients that answered with it in `column`
        got = {}
        for i, (survivors, dropped) in told.items():
            names = survivors if column == 0 else dropped
            if secret_of in names and i in answers:
                row = answers[i][column][names.index(secret_of)]
                got[point[i]] = sc.from_tensor(row.reshape(1, -1))[0]
        return sc.reconstruct(dict(list(got.items())[:t])) if len(got) >= t else None

    b_d, sk_a, sk_b = recover(d, 0), recover(a, 1), recover(b, 1)
    if None in (b_d, sk_a, sk_b):
        return  # too few shares of a mask reached the coordinator: nothing recovered
    n = masked[d].numel()
    mask = sc.expand(b_d, n)
    for partner, sk in ((a, sk_a), (b, sk_b)):
        pair = sc.expand(sc.pair_seed(sk, publics[d], tag), n)
        mask = mask + pair if d < partner else mask - pair
    unmasked = decode(masked[d] - mask, ENCODING, dtype=torch.float64)[:6]
    target = states[ids.index(d)]
    assert not torch.allclose(unmasked, target, atol=1e-5), "the coordinator read one client's input alone"


def test_a_client_confirms_one_survivor_set_and_unmasks_only_with_its_peers_tags(hook):
    """The consistency round itself: one confirmation per client and round (a second set is refused), tags the
    coordinator made up are refused, and the tags the members sent let the same unmask through."""
    from veil.exceptions import VeilError
    from veil.federated.secure_agg import _call, _fetch

    workers, _, ptrs = _secagg_clients(hook, 3)
    ids = [w.id for w in workers]
    tag, t = 7302, 2

    def call(k, name, *args):
        return _fetch(_call(f"veil.secagg.{name}", (tag, *args), workers[k]))

    publics = torch.stack([call(k, "advertise", 3, t) for k in range(3)])
    for k in range(3):
        _call("veil.secagg.share_keys", (tag, ids, publics), workers[k])
    for k in range(3):
        call(k, "masked_input", ids, [ptrs[k]], 1.0)
    tags = [call(k, "confirm", ids) for k in range(3)]
    with pytest.raises(VeilError, match="confirm: refused"):
        call(0, "confirm", ids[:2])  # a second set, for another set of unmask answers
    forged = torch.randint(0, 256, (3, 32), dtype=DTYPE)
    with pytest.raises(VeilError, match=r"unmask: refused \(1 of the survivors"):
        call(0, "unmask", ids, [], forged)
    with pytest.raises(VeilError, match="not the survivor set this client confirmed"):
        call(1, "unmask", ids[:2], [ids[2]], torch.stack([tags[v][1] for v in range(2)]))
    b_rows, sk_rows = call(1, "unmask", ids, [], torch.stack([tags[v][1] for v in range(3)]))
    assert tuple(b_rows.shape) == (3, 66) and sk_rows.numel() == 0
