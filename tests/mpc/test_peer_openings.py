"""Peer openings (veil/workers/peer_openings.py): Beaver openings party to party, over network workers.

The SMPC op tests of test_remote_ops.py run again with peer openings enabled on the session
servers (peered with each other in tests/conftest.py); results are compared with plain torch.
"""

import pytest
import torch

from test_remote_ops import (  # noqa: F401  (collected here with the fixtures below)
    test_comparisons_relu_max,
    test_conv_and_pooling,
    test_fixed_precision_arithmetic,
    test_integer_ops,
    test_issue_example,
)

from tests.mpc.peer_fixtures import cp, parties  # noqa: F401  (fixtures)


def _products(hook, parties, cp, op):
    """(opened product, plain product, bytes this process received during the product, rounds)."""
    from veil.mpc.opening import count_openings

    gen = torch.Generator().manual_seed(7)
    if op == "mul":
        a, b = (torch.randint(-2**20, 2**20, (64, 64), generator=gen) for _ in range(2))
        want = a * b
    elif op == "fixed-point mul":  # a Beaver opening, then truncation's opening of c = x + r
        a, b = (torch.randn(64, 64, generator=gen) for _ in range(2))
        x, y = (t.fix_precision().share(*parties, crypto_provider=cp) for t in (a, b))
        stats = hook.local_worker.stats
        before = stats.bytes_received
        with count_openings() as openings:
            z = (x * y).settle()  # the truncation it owes paid now, inside the count
        received = stats.bytes_received - before
        return z.get().float_precision(), a * b, received, openings.rounds - 1
    else:
        a = torch.randint(-2**10, 2**10, (48, 64), generator=gen)
        b = torch.randint(-2**10, 2**10, (64, 32), generator=gen)
        want = a @ b
    x, y = a.share(*parties, crypto_provider=cp), b.share(*parties, crypto_provider=cp)
    stats = hook.local_worker.stats
    before = stats.bytes_received
    with count_openings() as openings:
        z = x * y if op == "mul" else x @ y
    received = stats.bytes_received - before  # before z.get(), which fetches the product's shares
    return z.get(), want, received, openings.rounds


@pytest.mark.parametrize("op", ["mul", "matmul", "fixed-point mul"])
def test_products_open_party_to_party(hook, parties, cp, op):
    got, want, received, rounds = _products(hook, parties, cp, op)
    if op == "fixed-point mul":
        assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    else:
        assert torch.equal(got, want)
    assert rounds == 1
    # e and f (2 x 4096 x 8 bytes for mul), c (4096 x 8) never reach this process: only acknowledgements
    assert received < 1024 * len(parties), received


def test_concurrent_products_from_threads_of_one_orchestrator(parties, cp):
    """Threads of one orchestrator run peer-opened products on the same parties at once: every result
    equals torch's (a party serves one session's requests in order, so rounds must not cross)."""
    import threading

    errors, wrong = [], []

    def run(k):
        for i in range(3):
            a, b = torch.randint(-100, 100, (32, 8)), torch.randint(-100, 100, (32, 8))
            try:
                z = (a.share(*parties, crypto_provider=cp) * b.share(*parties, crypto_provider=cp)).get()
                if not torch.equal(z, a * b):
                    wrong.append((k, i))
            except Exception as e:  # noqa: BLE001
                errors.append((k, i, type(e).__name__, str(e)[:200]))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and not wrong, (errors[:3], wrong[:3])


def _truncated(parties, cp, values, divisor):
    return values.share(*parties, crypto_provider=cp).truncate(divisor).get()


def _assert_floor_or_next(got, values, divisor):
    err = got - torch.div(values, divisor, rounding_mode="floor")
    bad = (err < 0) | (err > 1)  # floor or floor + 1 (the truncation's one ulp)
    assert int(bad.sum()) == 0, f"{int(bad.sum())} wrong of {values.numel()}, e.g. {values[bad][:3].tolist()}"


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from veil.mpc.truncation import TRUNCATION_BOUND  # noqa: E402


@pytest.fixture(params=["top bits", "one exchange"])
def truncation_opening(request, monkeypatch):
    """Truncation's peer opening: ``c`` to party 0 and its top bits to the others, or (parties on one host,
    fewer than ``TOP_BITS_MIN_ELEMENTS`` entries: these tests' parties are) ``c`` to every party at once."""
    from veil.mpc import truncation

    monkeypatch.setattr(truncation, "TOP_BITS_MIN_ELEMENTS", 0 if request.param == "top bits" else 1 << 18)
    return request.param


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.integers(-(TRUNCATION_BOUND - 2**20), TRUNCATION_BOUND - 2**20), min_size=1, max_size=40),
       divisor=st.sampled_from([2, 2**16, 2**20, 10, 1000]))
def test_truncation_top_bits_peer_opening_property(parties, cp, truncation_opening, values, divisor):
    """Truncation over peer openings (party 0 gets c, the others its packed top bits; or every party c) is
    floor(x / d) or one more over the whole range, edges included, on 2 and 3 parties."""
    edge = TRUNCATION_BOUND - divisor
    values = torch.tensor([max(-edge, min(edge, v)) for v in values] + [edge, -edge, 0, -1])
    _assert_floor_or_next(_truncated(parties, cp, values, divisor), values, divisor)


def test_truncation_top_bits_moves_eight_bytes_and_an_eighth_per_entry(hook, parties, cp, monkeypatch):
    """A peer truncation of 10^4 entries across the range (shapes that do not fill a packed byte): correct,
    nothing through the orchestrator, and the parties after the first are counted 1/64 of the bytes back
    (8 bytes per entry to the first party, one bit per entry from it)."""
    from veil.mpc import truncation
    from veil.mpc.opening import count_openings

    monkeypatch.setattr(truncation, "TOP_BITS_MIN_ELEMENTS", 0)  # (else these one-host parties open c to all)

    gen = torch.Generator().manual_seed(3)
    bound = TRUNCATION_BOUND - 2**16
    values = torch.empty(10_003, dtype=torch.int64).random_(-bound, bound + 1, generator=gen).view(7, 1429)
    x = values.share(*parties, crypto_provider=cp)
    stats = hook.local_worker.stats
    before = stats.bytes_received
    with count_openings() as openings:
        z = x.truncate(2**16)
    received = stats.bytes_received - before
    _assert_floor_or_next(z.get(), values, 2**16)
    assert received < 1024 * len(parties), received
    first, *rest = [p.id for p in parties]
    n = values.numel()
    assert openings.bytes_by_party[first] == (len(parties) - 1) * ((n + 7) // 8)
    assert all(openings.bytes_by_party[p] == 8 * n for p in rest)


def test_truncation_on_one_host_opens_c_to_every_party_in_one_exchange(hook, parties, cp, monkeypatch):
    """Parties on one host (loopback) and fewer than TOP_BITS_MIN_ELEMENTS entries: every party reconstructs
    c (each counted 8 bytes per entry from every other party) and finishes from it (trunc_finish, party 0
    alone adding the public terms); correct across the range; across hosts the top bits are used."""
    from veil.mpc import truncation
    from veil.mpc.opening import count_openings
    from veil.tensors.mpc_glue import runtime

    finishes = []
    real = truncation.run_party
    monkeypatch.setattr(truncation, "run_party", lambda name, *a, **kw: finishes.append((name, kw.get("first")))
                        or real(name, *a, **kw))
    gen = torch.Generator().manual_seed(4)
    bound = TRUNCATION_BOUND - 2**16
    values = torch.empty(3_003, dtype=torch.int64).random_(-bound, bound + 1, generator=gen).view(3, 1001)
    assert runtime.RUNTIME.one_host(parties)
    x = values.share(*parties, crypto_provider=cp)
    with count_openings() as openings:
        z = x.truncate(2**16)
    _assert_floor_or_next(z.get(), values, 2**16)
    assert finishes == [("trunc_finish", True)] + [("trunc_finish", False)] * (len(parties) - 1)
    n = values.numel()
    assert all(openings.bytes_by_party[p.id] == 8 * n * (len(parties) - 1) for p in parties)
    finishes.clear()  # a party reached over another address than loopback: the top bits again
    monkeypatch.setattr(runtime.WorkerRuntime, "one_host", lambda self, where: False)
    _assert_floor_or_next(values.share(*parties, crypto_provider=cp).truncate(2**16).get(), values, 2**16)
    assert [name for name, _ in finishes] == ["trunc_finish"] + ["trunc_finish_bits"] * (len(parties) - 1)


@pytest.mark.parametrize("host, here", [("localhost", True), ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True),
                                        ("[::1]", True), ("127.example.org", False), ("10.0.0.1", False),
                                        ("example.com", False), ("", False)])
def test_only_loopback_addresses_count_as_this_host(host, here):
    """A worker reached at a loopback address runs on this host (truncation then opens c to every party in one
    exchange); a host name that merely starts like one does not."""
    from veil.tensors.mpc_glue.runtime import _loopback

    assert _loopback(host) is here
