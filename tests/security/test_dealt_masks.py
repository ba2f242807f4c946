"""Red team, serving openings: a hostile serving owner picks which dealt fields mask a client's input.

Before: the mask check asked only for *fresh dealer material*. A truncation pair's wrap bit ``g`` (almost always
0) passed as the mask opened the client's input in the clear, and ``q = r >> d`` of a pair whose ``r`` masked the
input could be opened alone. Now masks must be uniform fields, used once, each as large as what it hides, and an
item's fields belong to the value its mask protected (veil/workers/dealt.py).
"""

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.messaging import messages as m
from veil.mpc.party import WIRE_PREFIX, OpenMessage
from veil.mpc.providers.worker_dealer import WorkerDealer
from veil.mpc.ring import DTYPE
from veil.serving import protocol

SHAPE = (1, 3)
SECRET = torch.tensor([[11, 22, 33]], dtype=DTYPE)
BATCH = 4242


@pytest.fixture(params=[True, False], ids=["seeded", "sent"])
def serving(hook, request):
    """Two parties, a provider, and ``claim()``: the owner claims a client's input share into a batch
    (from then on its session is tainted: in-process, every sender shares one namespace)."""
    tag = f"dm{'s' if request.param else 'u'}{request.node.name[-12:]}"
    a, b, cp = (sy.VirtualWorker(hook, id=f"{tag}-{n}") for n in ("a", "b", "cp"))
    owner, client = sy.VirtualWorker(hook, id=f"{tag}-owner"), sy.VirtualWorker(hook, id=f"{tag}-client")
    for party, share in ((a, SECRET), (b, torch.zeros(SHAPE, dtype=DTYPE))):
        protocol.call(owner, party, "open", "svc", [client.id], {"input_shape": list(SHAPE)})
        protocol.call(client, party, "submit", "svc", 7, share)

    def claim():
        for party in (a, b):
            assert protocol.call(owner, party, "claim", "svc", [7], BATCH) == [1]

    dealer = WorkerDealer(cp, owner, seeded=request.param)
    yield a, b, owner, dealer, claim
    for party in (a, b):
        protocol.call(owner, party, "close", "svc")


def _open(owner, party, name, *args):
    return owner.send_msg(OpenMessage(name, tuple(args)), party).objects


def _ref(ptr):
    return m.ObjectRef(ptr.id_at_location)


def _opened(owner, a, b, name, per_party):
    """Sums an opening over both parties (what a hostile owner sees)."""
    return sum(_open(owner, p, name, *per_party[p])[0] for p in (a, b))


def test_honest_masks_open_a_uniformly_masked_value(serving):
    a, b, owner, dealer, claim = serving
    claim()
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    opened = _opened(owner, a, b, "trunc_mask", {p: (m.ObjectRef(BATCH), _ref(pair[p.id][0])) for p in (a, b)})
    assert opened.shape == SHAPE and not torch.equal(opened, SECRET)


@pytest.mark.parametrize("field", [1, 2], ids=["q", "wrap_bit"])
def test_a_derived_field_is_not_a_mask(serving, field):
    a, b, owner, dealer, claim = serving
    claim()
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    with pytest.raises(PermissionDeniedError, match="not a uniform field"):
        _open(owner, a, "trunc_mask", m.ObjectRef(BATCH), _ref(pair[a.id][field]))
    triple = dealer.beaver_triples("mul", SHAPE, SHAPE, [a.id, b.id])
    with pytest.raises(PermissionDeniedError, match="not a uniform field"):  # c = a*b as a mask
        _open(owner, a, "beaver_mask", m.ObjectRef(BATCH), m.ObjectRef(BATCH), _ref(triple[a.id][2]),
              _ref(triple[a.id][1]))


def test_the_fields_of_a_used_mask_belong_to_the_client(serving):
    """x + r opened, then q = r >> d: neither opened alone, nor computed on and fetched, nor laundered
    through a party step (its output inherits the client's restriction)."""
    a, b, owner, dealer, claim = serving
    claim()
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    _opened(owner, a, b, "trunc_mask", {p: (m.ObjectRef(BATCH), _ref(pair[p.id][0])) for p in (a, b)})
    q = pair[a.id][1]
    zero = torch.zeros(SHAPE, dtype=DTYPE)
    with pytest.raises(PermissionDeniedError, match="masks at argument 1"):
        _open(owner, a, "trunc_mask", _ref(q), zero)
    with pytest.raises(PermissionDeniedError):
        (q + 0).get()
    with pytest.raises(PermissionDeniedError):  # a protocol step's output: a share, still the client's
        owner.send_msg(m.CommandMessage(WIRE_PREFIX + "beaver_combine", (_ref(q), _ref(q), _ref(q), zero, zero,
                                                                           "mul", True, {}), {}, [91001]), a)
        owner.send_msg(m.GetObjectsMessage([91001]), a)


def test_an_item_used_unrestricted_first_never_masks_a_client_value(serving):
    a, b, owner, dealer, claim = serving
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    owner.send_msg(m.CommandMessage("Tensor.add", (_ref(pair[a.id][1]), 0), {}, [91002]), a)  # q, unrestricted
    claim()
    # (q computed with spends r too: veil.workers.dealt.consume)
    with pytest.raises(PermissionDeniedError, match="already used (for an unrestricted|as a mask or in a) computation"):
        _open(owner, a, "trunc_mask", m.ObjectRef(BATCH), _ref(pair[a.id][0]))


def test_a_mask_is_used_once_and_never_twice_in_one_opening(serving):
    a, b, owner, dealer, claim = serving
    claim()
    triple = dealer.beaver_triples("mul", SHAPE, SHAPE, [a.id, b.id])
    mask = _ref(triple[a.id][0])
    with pytest.raises(PermissionDeniedError, match="twice"):  # (x - a, y - a) gives x - y
        _open(owner, a, "beaver_mask", m.ObjectRef(BATCH), m.ObjectRef(BATCH), mask, mask)
    with pytest.raises(PermissionDeniedError, match="twice"):
        _open(owner, a, "fss_mask", [m.ObjectRef(BATCH), m.ObjectRef(BATCH)], [mask, mask])
    _open(owner, a, "beaver_mask", m.ObjectRef(BATCH), m.ObjectRef(BATCH), mask, _ref(triple[a.id][1]))
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "trunc_mask", m.ObjectRef(BATCH), mask)


def test_a_broadcast_mask_is_refused(serving):
    """A (1,)-mask over a (1, 3) input would open every difference x_i - x_j."""
    a, b, owner, dealer, claim = serving
    claim()
    pair = dealer.truncation_pairs((1,), 2 ** 16, [a.id, b.id])
    with pytest.raises(PermissionDeniedError, match="mask of its own shape"):
        _open(owner, a, "trunc_mask", m.ObjectRef(BATCH), _ref(pair[a.id][0]))


def test_client_shares_are_not_written_into_the_owners_objects(serving):
    """Laundering by writing: ``mine.add_(client_share)`` then ``mine.get()`` gave the share."""
    a, b, owner, dealer, claim = serving
    claim()
    mine = torch.zeros(SHAPE, dtype=DTYPE).send(a)
    for op, args, kwargs in (("Tensor.add_", (_ref(mine), m.ObjectRef(BATCH)), {}),
                             ("Tensor.copy_", (_ref(mine), m.ObjectRef(BATCH)), {}),
                             ("torch.add", (m.ObjectRef(BATCH), 0), {"out": _ref(mine)})):
        with pytest.raises(PermissionDeniedError, match="restricted value"):
            owner.send_msg(m.CommandMessage(op, args, kwargs, [0]), a)
    assert torch.equal(mine.get(), torch.zeros(SHAPE, dtype=DTYPE))
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    mine = torch.zeros(SHAPE, dtype=DTYPE).send(a)
    with pytest.raises(PermissionDeniedError, match="restricted value"):  # dealt material is never revealed
        owner.send_msg(m.CommandMessage("Tensor.add_", (_ref(mine), _ref(pair[a.id][1])), {}, [0]), a)
    # the other direction is the protocol's own business: a restricted share may take public values
    owner.send_msg(m.CommandMessage("Tensor.add_", (m.ObjectRef(BATCH), _ref(mine)), {}, [0]), a)


def test_every_dealer_function_declares_its_layout():
    """A dealer worker function without a layout would store material no mask check can use."""
    from veil.mpc.runtime import DEALT_LAYOUTS
    from veil.workers.monitor import DEALER_OUTPUTS

    assert set(DEALT_LAYOUTS) == DEALER_OUTPUTS


def test_chunks_of_a_client_value_stay_its_own_and_open_only_under_their_own_masks(serving):
    """The chunked FSS comparison (veil/mpc/comparison.py): a client share cut into chunks keeps its
    restriction, each chunk opens only under a fresh mask of the chunk's shape, and the join stays restricted."""
    a, b, owner, dealer, claim = serving
    claim()
    owner.send_msg(m.CommandMessage(WIRE_PREFIX + "fss_chunks", ([m.ObjectRef(BATCH)],), {"size": 2},
                                    [91101, 91102]), a)  # (1, 3) -> chunks of 2 and 1 entries
    with pytest.raises(PermissionDeniedError):
        owner.send_msg(m.GetObjectsMessage([91101]), a)
    chunks = [m.ObjectRef(91101), m.ObjectRef(91102)]
    keys = [dealer.comparison_keys((n,), 1, [a.id, b.id])[a.id] for n in (2, 1, 2, 1)]
    with pytest.raises(PermissionDeniedError, match="mask of its own shape"):  # masks swapped: 2 entries under 1
        _open(owner, a, "fss_mask", chunks, [_ref(keys[1][0]), _ref(keys[0][0])])
    with pytest.raises(PermissionDeniedError, match="not a uniform field"):  # R_hi as a mask
        _open(owner, a, "fss_mask", chunks, [_ref(keys[2][1]), _ref(keys[3][0])])
    opened = _open(owner, a, "fss_mask", chunks, [_ref(keys[2][0]), _ref(keys[3][0])])
    assert [tuple(t.shape) for t in opened] == [(2,), (1,)]
    owner.send_msg(m.CommandMessage(WIRE_PREFIX + "fss_join", (chunks, list(SHAPE)), {}, [91103]), a)
    with pytest.raises(PermissionDeniedError):
        owner.send_msg(m.GetObjectsMessage([91103]), a)
