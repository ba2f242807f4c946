"""Red team: the evaluation keys of a CKKS context a worker receives (relinearization and Galois keys).

Attackers: a scientist (or data owner) who holds the CKKS secret key and crafts the public context it sends with its
ciphertexts: keys of the right shape and crafted values, keys at indexes an honest context never fills, and a
remote ciphertext-by-ciphertext ``mul`` (the one worker op that relinearizes) on its own ciphertexts and on a
product with the owner's data. Entry points: ``ckks_wire.context_from_wire`` (every received context) and
``veil.he.op``.

Hole found and fixed: SEAL relinearizes with the key at index 0 whenever it counts one non-empty index, so a
relinearization key stored at index 1 alone (its parts honest: the per-part check passed) segfaulted the worker at
the first ciphertext product (checked in a subprocess). And Galois keys at up to 131072 indexes (SEAL's own cap,
empty ones cost nothing on the wire) were loaded, held and walked in Python, unseen by the quota. Held (guards):
SEAL refuses a key part of the wrong level, form, width or range; a key of the right shape and crafted values
(uniform words; the honest one plus P, which adds ``c2`` to what the product decrypts to) breaks only its maker's
product, and what it shows of a product with the owner's data is the worker's fresh randomness, not the data; a
context without relinearization keys makes a product fail in one line. The quota charged a ring-16384 context with
all its Galois keys 346 MiB for ~250 held (fixed, slow test). The crafted public key stays a LIMIT
(test_redteam_he_eval_second, its reason re-checked).

Every test asserts the SAFE behaviour; a hole is ``xfail(strict=True)``.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

import veil as sy
from veil.he import ckks, ckks_wire, conjugation, flooding
from veil.he.errors import WireFormatError

from fl_helpers import uid
from test_redteam_he_crypto import _field, _seal_ciphertext
from test_redteam_he_eval_second import _context_wire, _message, _seal
from test_redteam_he_leftovers_second import _key_parts, _one_line

ts = pytest.importorskip("tenseal")
sealapi = pytest.importorskip("tenseal.sealapi")

SIGMA = flooding.sigma(2.0**40, product=True)


@pytest.fixture(scope="module")
def bare():
    """The key holder's context (ring 8192, two levels, no Galois keys) with its secret key."""
    return ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)


def _relin_parts(ctx) -> list[np.ndarray]:
    """The honest relinearization key's parts (one per data prime), as sealapi makes them for ``ctx``'s key."""
    made = sealapi.RelinKeys()
    sealapi.KeyGenerator(ctx.raw.seal_context().data, ctx.raw.secret_key().data).create_relin_keys(made)
    return _key_parts(made.key(2))


def _kswitch_bytes(ctx, layout: dict, count: int | None = None) -> bytes:
    """SEAL's serialization (uncompressed) of KSwitchKeys with the parts ``layout[index]`` at each index, over
    ``count`` indexes (default: up to the last one filled)."""
    version = _field(ctx.serialize(), 1)[3:5]
    data = ctx.raw.seal_context().data
    parms_id = tuple(data.key_parms_id())
    k = len(data.key_context_data().parms().coeff_modulus())
    count = max(layout) + 1 if count is None else count
    entries = [struct.pack("<Q", 0)] * count
    for index, parts in layout.items():
        entries[index] = struct.pack("<Q", len(parts)) + b"".join(
            _seal_ciphertext(version, parms_id, 1.0, part.tolist(), k) for part in parts)
    return _seal(version, 0, struct.pack("<4Q", *parms_id) + struct.pack("<Q", count) + b"".join(entries))


def _public_bytes(ctx, member: int, keys: bytes) -> bytes:
    """``ctx``'s public context (public key only) with ``keys`` as its relinearization (4) or Galois (5) keys."""
    data = ctx.raw.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                             save_relin_keys=False)
    return data + _message(2, _message(member, keys))


def _honest_product_on(owner, ctx) -> None:
    """The worker still multiplies ciphertexts (relinearizing) under an honest context: torch's values."""
    x, y = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64), torch.tensor([4.0, 0.25, -1.0], dtype=torch.float64)
    product = (ckks.encrypt(x, ctx).send(owner) * ckks.encrypt(y, ctx).send(owner)).get().decrypt(ctx).double()
    assert torch.allclose(product, x * y, atol=1e-4)


# ------------------------------------------------------------------ 1. keys at indexes an honest context never fills


@pytest.mark.parametrize("layout", ["index 1 alone", "indexes 0 and 1"])
def test_a_relinearization_key_at_another_index_is_refused_on_arrival(bare, hook, layout):
    """Attack (resources: a crash): SEAL relinearizes a product with the key at index 0, and checks only that it
    counts one non-empty index; the per-part check looked at each index's parts, which were honest. A context whose
    relinearization key sits at index 1 alone loaded, and the first ciphertext product under it (``veil.he.op``
    ``mul`` of two of its ciphertexts) segfaulted the worker process; keys at indexes 0 and 1 hold memory an honest
    context never has. Must hold: refused on arrival in one line, at the wire and at a worker (the send fails),
    and the worker then multiplies ciphertexts under an honest context (torch's values)."""
    from veil.exceptions import SerializationError

    honest = _relin_parts(bare)
    keys = _kswitch_bytes(bare, {1: honest} if layout == "index 1 alone" else {0: honest, 1: honest})
    with pytest.raises(WireFormatError) as refused:
        ckks_wire.context_from_wire(_context_wire(_public_bytes(bare, 4, keys)))
    assert "relinearization" in _one_line(refused.value)
    owner = sy.VirtualWorker(hook, id=uid("he-relin-index"))
    hostile = ckks.CKKSContext.from_bytes(_public_bytes(bare, 4, keys))  # (as the scientist holds it: sent as is)
    with pytest.raises(SerializationError) as at_send:
        ckks.CKKSTensor(hostile, [ts.ckks_vector(hostile.raw, [1.0, 2.0])], (2,), torch.float64).send(owner)
    assert "relinearization" in _one_line(at_send.value)
    _honest_product_on(owner, bare)


def test_galois_keys_at_more_indexes_than_the_ring_has_are_refused(bare):
    """Attack (resources, the quota): an honest context's Galois keys span one index per ring coefficient (8192);
    SEAL loads up to 131072, each empty one 8 bytes on the wire (a few with zstd) and a list SEAL holds and veil
    walks in Python (0.3 s) twice, one the quota charges nothing for. Must hold: Galois keys over more indexes than
    the ring has are refused in one line; the honest conjugation key (at index n - 1 of n) still loads."""
    conjugation.add_conjugation_key(bare)
    n = 2 * bare.slots
    key = _key_parts(conjugation.keys(bare).key(conjugation.element(bare)))
    with pytest.raises(WireFormatError) as refused:
        ckks_wire.context_from_wire(_context_wire(_public_bytes(bare, 5, _kswitch_bytes(bare, {n - 1: key},
                                                                                         count=131072))))
    assert "Galois" in _one_line(refused.value) and "131072" in str(refused.value)
    honest = ckks_wire.context_from_wire(_context_wire(_public_bytes(bare, 5, _kswitch_bytes(bare, {n - 1: key},
                                                                                               count=n))))
    assert conjugation.keys(honest) is not None and honest.key_id == bare.key_id


def test_a_product_under_a_context_without_relinearization_keys_is_one_line(hook):
    """Attack: the scientist's context carries no relinearization keys (TenSEAL relinearizes every product) and it
    asks the worker for a ciphertext product. Must hold: the op fails in one line that says why, and the worker then
    multiplies under an honest context."""
    mine = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)
    keyless = ckks.CKKSContext.from_bytes(mine.raw.serialize(save_public_key=True, save_secret_key=False,
                                                             save_galois_keys=False, save_relin_keys=False))
    assert keyless.key_id == mine.key_id and not keyless.raw.has_relin_keys()
    owner = sy.VirtualWorker(hook, id=uid("he-no-relin"))
    x = torch.tensor([0.5, -2.0], dtype=torch.float64)
    with pytest.raises(Exception) as refused:
        (ckks.encrypt(x, keyless).send(owner) * ckks.encrypt(x, keyless).send(owner)).get()
    assert "Relinearization" in _one_line(refused.value)
    _honest_product_on(owner, mine)


# ------------------------------------------------------------------ 2. keys of the right shape, crafted values


def _crafted_relin_parts(bare, craft: str) -> list[np.ndarray]:
    """The relinearization key's parts as the key holder crafts them: the right count and width, every word below
    its prime (SEAL loads them)."""
    honest = _relin_parts(bare)
    primes = [q.value() for q in bare.raw.seal_context().data.key_context_data().parms().coeff_modulus()]
    n, crafted = 2 * bare.slots, [part.copy() for part in honest]
    if craft == "uniform":  # words uniform below their primes: no key of anyone's (zeros would be a zstd bomb)
        rng = np.random.default_rng(5)
        for part in crafted:
            for block in range(2 * len(primes)):
                part[block * n:(block + 1) * n] = rng.integers(0, primes[block % len(primes)], n, dtype=np.uint64)
        return crafted
    # the honest key plus P in part j's b at prime j (NTT words of the constant P): relinearizing adds c2 itself
    for j, part in enumerate(crafted):
        part[j * n:(j + 1) * n] = (part[j * n:(j + 1) * n] + np.uint64(primes[-1] % primes[j])) % np.uint64(primes[j])
    return crafted


def test_a_relinearization_key_part_seal_cannot_hold_is_refused_in_one_line(bare):
    """Attack: key parts of the right count at another level (the data level's primes), out of NTT form, or with
    words past their primes (what the key switch would index or reduce by). Must hold: refused in one line on
    arrival (SEAL's own validation, under veil's message)."""
    honest = _relin_parts(bare)
    version = _field(bare.serialize(), 1)[3:5]
    data = bare.raw.seal_context().data
    k, n = len(data.key_context_data().parms().coeff_modulus()), 2 * bare.slots
    first = tuple(data.first_parms_id())
    lower = _seal(version, 0, struct.pack("<4Q", *data.key_parms_id()) + struct.pack("<QQ", 1, len(honest)) + b"".join(
        _seal_ciphertext(version, first, 1.0, part[:2 * (k - 1) * n].tolist(), k - 1) for part in honest))
    past = _kswitch_bytes(bare, {0: [np.full_like(part, (1 << 61) - 1) for part in honest]})
    for keys in (lower, past):
        with pytest.raises(WireFormatError) as refused:
            ckks_wire.context_from_wire(_context_wire(_public_bytes(bare, 4, keys)))
        _one_line(refused.value)


@pytest.mark.parametrize("craft", ["uniform", "plus P"])
def test_a_crafted_relinearization_key_breaks_only_its_makers_product(bare, hook, craft):
    """Attack: the scientist's context carries a relinearization key of the right shape and crafted values, and it
    multiplies, on the worker, its ciphertext of y by the product of its x with the owner's review data w (``mul``
    is not sealed: approved, it releases x * w * y). With the key plus P, what the product decrypts to gains
    ``c2 = c1(x * w) * c1(y)``: were ``c1(x * w)`` its own ``c1(x) * w`` (no randomness of the worker's), that
    would be w times polynomials it knows, unflooded and unrounded. Must hold: the worker computes and serves on
    (no crash); what the key holder gets is not x * w * y and changes from one approved product to the next by
    far more than any flooding (the worker's fresh zero is in ``c1(x * w)``); an honest context's product on the
    same worker gives torch's values."""
    from veil.exceptions import ReviewPendingError

    weights = torch.tensor([3.0, -1.5, 7.25], dtype=torch.float64) / 8
    x, y = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64), torch.tensor([2.0, -0.75, 1.5], dtype=torch.float64)
    owner = sy.VirtualWorker(hook, id=uid("he-relin-crafted"))
    owner.load(weights.clone(), tags=("#w",), policy="review")
    # (a key pair of its own: a secret context this process registered, the in-process worker would compute under)
    mine = ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), galois_keys=False)
    keys = _kswitch_bytes(mine, {0: _crafted_relin_parts(mine, craft)})
    hostile = ckks.CKKSContext.from_bytes(_public_bytes(mine, 4, keys))
    assert hostile.key_id == mine.key_id and hostile.raw.has_relin_keys()
    ex, ey = ckks.encrypt(x, hostile).send(owner), ckks.encrypt(y, hostile).send(owner)
    released = []
    for _ in range(2):
        product = (ex * owner.search(["#w"])[0]) * ey
        with pytest.raises(ReviewPendingError) as pending:
            product.get()
        owner.release_requests.approve(pending.value.request_id)
        released.append(product.get().decrypt(mine).double())
    expected = x * weights * y
    assert all((r - expected).abs().max() > 1.0 for r in released), "the crafted key left the product intact"
    assert (released[0] - released[1]).abs().max() > 1e3 * SIGMA, "what the crafted key showed is no fresh noise"
    _honest_product_on(owner, bare)


# ------------------------------------------------------------------ 3. the quota's charge for many Galois keys


@pytest.mark.slow
def test_an_honest_context_with_all_galois_keys_fits_the_quota_its_memory_fits(hook):
    """Honest user (over-refusal): a ring-16384 context of four levels with all its Galois keys (171 MB on the wire)
    held 244 to 255 MiB a loaded copy (one thread, or a fresh thread each), and was charged 1.5 times its key words,
    346 MiB: a session quota of 300 MiB refused it. Must hold: it is charged at least every key word and SEAL's
    tables, and at most 300 MiB, so that quota stores it (and refuses a second copy in one line)."""
    from veil.workers.monitor import Principal, QuotaExceededError

    full = ckks.context(depth=4)
    public = ckks_wire.context_from_wire(ckks_wire.context_to_wire(full))
    parms = public.raw.seal_context().data.key_context_data().parms()
    n, k = parms.poly_modulus_degree(), len(parms.coeff_modulus())
    keys = 2 * k * n * 8 * (1 + (k - 1) * (1 + sum(1 for index in public.raw.galois_keys().data.data() if index)))
    session = Principal("hk", "u", namespace="hk", isolated=True)
    worker = sy.VirtualWorker(hook, id=uid("he-galois-quota"), max_session_bytes=300 * 2**20)
    charged = worker.monitor.store(session, 1, public).nbytes
    assert keys + 33 * n * k * k <= charged <= 300 * 2**20, f"charged {charged / 2**20:.0f} MiB"
    with pytest.raises(QuotaExceededError) as refused:
        worker.monitor.store(session, 2, ckks_wire.context_from_wire(ckks_wire.context_to_wire(full)))
    _one_line(refused.value)
