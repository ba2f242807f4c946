"""Truncation folded into the ReLU that follows it (bit_comparison.truncate_relu): exact to truncation's ulp."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc import bit_comparison, quad_level
from veil.mpc.comparison_material import AND_LEVELS
from veil.mpc.opening import count_openings, reconstruct
from veil.mpc.providers import LocalDealer
from veil.mpc.sharing import split
from veil.mpc.truncation import TRUNCATION_BOUND

from tests.mpc.test_exact_range import across_range


def _check(y: torch.Tensor, divisor: int, parties, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    shares = dict(zip(parties, split(y, len(parties), gen)))
    got = reconstruct(bit_comparison.truncate_relu(shares, divisor, LocalDealer(seed=seed)))
    z = torch.div(y, divisor, rounding_mode="floor")  # truncation's result is z or z + 1
    # the reference: max(y / d, 0) with truncation's one ulp; exactly 0 where y <= 0 (y = 0: z in {0, 1})
    ok = torch.where(y > 0, (got == z) | (got == z + 1), got == 0)
    assert bool(ok.all()), f"{int((~ok).sum())} wrong of {y.numel()}, e.g. y={y[~ok][:3].tolist()}"


@pytest.mark.parametrize("divisor", [2**16, 4 * 2**16, 3, 1000003])
def test_across_the_range(divisor):
    gen = torch.Generator().manual_seed(divisor)
    y = across_range(50_000, TRUNCATION_BOUND - divisor, gen)
    for parties in (("a", "b"), ("a", "b", "c")):
        _check(y, divisor, parties, seed=divisor % 1000)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.integers(-(2**62) + 2**20, 2**62 - 2**20), min_size=1, max_size=20),
       divisor=st.sampled_from([2, 7, 2**16, 2**18, 12345]), n_parties=st.sampled_from([2, 3]),
       seed=st.integers(0, 2**31))
def test_property(values, divisor, n_parties, seed):
    edges = [0, 1, -1, divisor, -divisor, divisor - 1, -divisor + 1, 2**62 - 2**20, -(2**62) + 2**20]
    _check(torch.tensor(values + edges), divisor, ("a", "b", "c")[:n_parties], seed)


def test_one_round_fewer_than_truncate_then_relu():
    y = torch.arange(-500, 500, dtype=torch.int64) * 977
    shares = dict(zip(("a", "b"), split(y, 2)))
    with count_openings() as stats:
        bit_comparison.truncate_relu(shares, 2**16, LocalDealer(seed=1))
    assert stats.rounds == 1 + AND_LEVELS  # the comparison's own rounds: the truncation rides on its first


def test_open_values_step_refuses_bad_arguments():
    w = torch.zeros(3, dtype=torch.int64)
    q = torch.zeros(7, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="one mask per value"):
        quad_level._quad_open_values([w, w], q, [w], [])
    with pytest.raises(ValueError, match="one mask per value"):
        quad_level._quad_open_values([w, w], q, [], [])


def test_only_the_product_value_gets_a_select_table_product():
    """``r_0`` masks the compared ``y``, which is not multiplied by the bit: the dealer deals ``r_1`` times the
    select table only (10 derived words per entry and 82 per 16 entries, not 14), through a provider worker too."""
    import veil as sy
    from veil.mpc.comparison_material import ComparisonLayout
    from veil.mpc.material import recipe
    from veil.mpc.providers.worker_dealer import dealer_for

    def derived_words(spec):
        return sum(torch.Size(s).numel() for s in recipe("comparison", spec)[1])

    # per 16 entries: R and the group products (4 + 11 rows of 4 group-layout words), the quad products (22)
    assert derived_words(((16,), 2, 1)) == 16 * 10 + 82 and derived_words(((16,), 2)) == 16 * 14 + 82
    with pytest.raises(ValueError, match="not multiplied"):
        ComparisonLayout(2, first_product=1).masks_table(0)
    for bad in (2, -1, "1"):
        with pytest.raises(Exception, match="first_product"):
            recipe("comparison", ((1,), 2, bad))
    with pytest.raises(Exception, match="first_product"):
        recipe("comparison", ((1,), 0, 1))  # the bit alone has no value to skip

    hook = sy.TorchHook(torch)
    parties = {n: sy.VirtualWorker(hook, id=f"trp_{n}") for n in ("alice", "bob")}
    cp = sy.VirtualWorker(hook, id="trp_cp")
    dealer = dealer_for(cp, hook.local_worker)
    dealer.max_batch = 1
    y = torch.arange(-500, 500, dtype=torch.int64) * 977
    shares = {w.id: w for w in parties.values()}
    ptrs = dict(zip(shares, (t.send(w) for t, w in zip(split(y, 2), parties.values()))))
    sent = cp.stats.snapshot()["bytes_sent"]
    out = bit_comparison.truncate_relu(ptrs, 2**16, dealer)
    dealt = cp.stats.snapshot()["bytes_sent"] - sent
    got = sum(out[p].get() for p in shares)
    z = torch.div(y, 2**16, rounding_mode="floor")
    assert bool(torch.where(y > 0, (got == z) | (got == z + 1), got == 0).all())
    # the truncation pair's derived fields and the comparison's, to the last party
    pair_words = sum(torch.Size(s).numel() for s in recipe("truncation", ((1000,), 2**16))[1])
    words = pair_words + derived_words(((1000,), 2, 1))
    assert words * 8 <= dealt <= words * 8 + 4000, (dealt, words)
