"""Peer openings for comparisons (veil/mpc/bit_comparison.py over network workers that open among
themselves): ReLU, max-pooling and the truncation folded into a ReLU, compared with plain torch, and
nothing opened reaching the orchestrator (its results are shares: it needs none of the opened values).
"""

import pytest
import torch
import torch.nn.functional as F

from veil.mpc import bit_comparison
from veil.mpc.comparison_material import AND_LEVELS
from veil.mpc.opening import count_openings
from veil.tensors.additive import AdditiveSharingTensor
from veil.tensors.mpc_glue.runtime import enable_peer_openings

from tests.mpc.peer_fixtures import cp, parties  # noqa: F401  (fixtures)

ULP = 2.0**-16


def _received(hook, run):
    """(result of ``run()``, bytes this process received meanwhile, opening rounds)."""
    stats = hook.local_worker.stats
    before = stats.bytes_received
    with count_openings() as openings:
        out = run()
    return out, stats.bytes_received - before, openings.rounds


def test_relu_and_comparison_open_party_to_party(hook, parties, cp):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(32, 64, generator=gen) * 10
    a[0, :5] = 0.0  # ties at zero
    x = a.fix_precision().share(*parties, crypto_provider=cp)
    x.child.child  # noqa: B018  (the shares exist before the count)
    y, received, rounds = _received(hook, lambda: F.relu(x))
    assert torch.allclose(y.get().float_precision(), F.relu(a), atol=ULP)
    assert rounds == 1 + AND_LEVELS
    # the star receives every party's share of x + r, 4 AND words and e (2048 x 8 bytes each): > 100 kB
    assert received < 1024 * len(parties), received
    gt = (x > 0).get().float_precision()
    assert torch.equal(gt, (a.fix_precision().child > 0).float())


def test_max_pool_opens_party_to_party(hook, parties, cp):
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 3, 8, 8, generator=gen)
    x = a.fix_precision().share(*parties, crypto_provider=cp)
    y, received, _ = _received(hook, lambda: F.max_pool2d(x, 2))
    assert torch.allclose(y.get().float_precision(), F.max_pool2d(a, 2), atol=ULP)
    assert received < 1024 * len(parties) * 4, received  # a few acknowledgements per round, no tensors


def test_truncate_relu_opens_party_to_party(hook, parties, cp):
    """The truncation's ``c`` is opened with the comparison's mask and every party truncates its own
    share (``cmp_trunc_finish``); ``z + r_1`` rides on the first AND level (XOR word + additive value)."""
    gen = torch.Generator().manual_seed(5)
    divisor = 2**16
    y = torch.randint(-(2**40), 2**40, (40, 50), generator=gen)
    y[0, :4] = torch.tensor([0, 1, -1, divisor])
    shares = y.share(*parties, crypto_provider=cp)
    out, received, rounds = _received(
        hook, lambda: bit_comparison.truncate_relu(shares.child, divisor, shares.crypto_provider))
    got = AdditiveSharingTensor(out, shares.crypto_provider).get()
    z = torch.div(y, divisor, rounding_mode="floor")
    ok = torch.where(y > 0, (got == z) | (got == z + 1), got == 0)
    assert bool(ok.all()), (got[~ok][:5], y[~ok][:5])
    assert rounds == 1 + AND_LEVELS
    assert received < 1024 * len(parties), received


def test_openings_below_the_threshold_stay_a_star(hook, connect_websocket):
    """With the default PEER_MIN_ELEMENTS a small ReLU opens through this process (one hop fewer per round)
    and a large one's masked values party to party; its AND levels' compacted words, below the threshold in
    ring words, go through this process. Both equal
    torch's."""
    from veil.mpc.bit_comparison import AND_LEVELS, opened_words
    from veil.tensors.mpc_glue.runtime import PEER_MIN_ELEMENTS

    ws = [connect_websocket(n) for n in ("alice", "bob")]
    cp = connect_websocket("dave")
    enable_peer_openings(*ws)
    try:
        gen = torch.Generator().manual_seed(6)
        for numel, through_here in ((256, True), (PEER_MIN_ELEMENTS + 8, False)):
            a = torch.randn(numel, generator=gen)
            x = a.fix_precision().share(*ws, crypto_provider=cp)
            y, received, _ = _received(hook, lambda: F.relu(x))
            assert torch.allclose(y.get().float_precision(), F.relu(a), atol=ULP)
            if through_here:  # every party's share of x + r at least
                assert received > 2 * 8 * numel, received
            else:  # each party's compacted words, and not its share of x + r
                star = 8 * sum(opened_words(level, numel) for level in range(AND_LEVELS))
                assert len(ws) * star <= received < len(ws) * (star + 1024) < 2 * 8 * numel, received
    finally:
        enable_peer_openings(*ws, enabled=False)
