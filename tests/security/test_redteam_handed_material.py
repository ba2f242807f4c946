"""Red team of the in-process hand-over of a dealer's corrections (commit 34cff27).

The seeded dealing's message to its last party is marked ``fresh`` and ``Outbox._exchange`` hands it to an
in-process worker as ``HandedParts``: the party keeps the frame's tensors in the sender's memory. Checked here:

* the deferred commands that ride in front of that message (its prelude) are the sender's own tensors, not the
  dealer's corrections: where the orchestrator's worker is the crypto provider they rode in the handed frame too,
  and a party stored an object sharing memory with the caller's tensor (a ``.send()``-like leak both ways);
* every stored dealt field owns its memory (no two fields of any party, of any item or request, share storage,
  nor one with the provider's fixed masks) and every item of many requests, dealt ahead, in the background and on
  demand, is exact against plain torch / numpy after all the dealings ran;
* an end-to-end mixed computation on material dealt in the background matches torch.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
import torch.nn.functional as F

import veil as sy
from veil.mpc import material
from veil.mpc.material import recipe, xor_fields
from veil.mpc.providers.worker_dealer import WorkerDealer, dealer_for

#: elements per field: past the 64 KiB from which handed parts are used in place
N = 9000


def _workers(hook, tag):
    return [sy.VirtualWorker(hook, id=f"rth-{tag}-{n}") for n in ("alice", "bob", "carol")]


def test_a_deferred_command_in_front_of_handed_material_keeps_its_own_copy(hook):
    """The caller's tensor in a deferred ``view_as`` that rides on the last party's material (the local worker
    deals) must be copied: otherwise the party's stored view and the caller's tensor are one memory."""
    me = hook.local_worker
    parties = _workers(hook, "prelude")
    last = parties[-1]
    dealer = WorkerDealer(me, me)  # the orchestrator's own worker as crypto provider (``crypto_provider=me``)
    p = torch.zeros(N, dtype=torch.int64).send(last)
    mine = torch.ones(N, dtype=torch.int64)
    kept = mine.view_as(p)  # deferred: rides on the next request to the last party
    assert not me.link_idle(last), "the view_as was sent at once: this test no longer puts it in a prelude"
    item = dealer.zero_shares((N,), [w.id for w in parties])  # its corrections go to the last party, handed
    assert me.link_idle(last)
    mine.add_(7)  # the caller writes its own tensor
    assert torch.equal(kept.get(), torch.ones(N, dtype=torch.int64)), "the party's object changed with the caller's"
    mine2 = torch.ones(N, dtype=torch.int64)
    kept2 = mine2.view_as(p)
    dealer.zero_shares((N,), [w.id for w in parties])
    kept2.add_(5)  # the party writes its stored object in place
    assert torch.equal(kept2.get(), torch.full((N,), 6, dtype=torch.int64))
    assert torch.equal(mine2, torch.ones(N, dtype=torch.int64)), "a party's in-place op wrote the caller's tensor"
    total = sum(w._objects[ptr.id_at_location] for w, (ptr,) in zip(parties, (item[w.id] for w in parties)))
    assert torch.equal(total, torch.zeros(N, dtype=torch.int64))


def _unsigned(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint64)


def _reconstruct(item: dict, parties, xor: frozenset) -> list:
    fields = []
    for j in range(len(item[parties[0].id])):
        shares = [w._objects[item[w.id][j].id_at_location] for w in parties]
        total = shares[0].clone()
        for s in shares[1:]:
            total = total ^ s if j in xor else total + s
        fields.append(total)
    return fields


def _stored(item: dict, parties) -> list:
    return [w._objects[ptr.id_at_location] for w in parties for ptr in item[w.id]]


def _check_plain(kind: str, spec, fields: list, fixed_b: torch.Tensor) -> None:
    """The relation of one item's fields, computed with plain torch / numpy (not veil's derive)."""
    if kind == "beaver":
        a, b, c = fields
        want = torch.mul(a, b) if spec[0] == "mul" else torch.matmul(a, b)
        assert torch.equal(c, want)
    elif kind == "truncation":
        r, q, g = (_unsigned(t) for t in fields)
        d = np.uint64(spec[1])
        assert np.array_equal(q, r // d)
        h = (r >> np.uint64(63)).astype(np.uint64)
        with np.errstate(over="ignore"):
            want_g = h * (r // d + (np.uint64(0) - r) // d + np.uint64(1))
        assert np.array_equal(g, want_g)
    elif kind == "zero":
        assert torch.equal(fields[0], torch.zeros_like(fields[0]))
    elif kind == "fixed_beaver":
        a, c = fields
        assert torch.equal(c, torch.mul(a, fixed_b))


def test_every_dealt_field_owns_its_memory_and_every_item_stays_exact(hook):
    parties = _workers(hook, "own")
    ids = [w.id for w in parties]
    cp = sy.VirtualWorker(hook, id="rth-own-cp")
    dealer = WorkerDealer(cp, hook.local_worker)
    fid = secrets.token_hex(16)
    mask_item = dealer.fixed_operand_mask(fid, (N,), ids)
    fixed_b = material.FIXED_MASKS[(None, fid)]
    takes = [
        ("beaver", ("mul", (N,), (N,), {}), lambda: dealer.beaver_triples("mul", (N,), (N,), ids)),
        ("beaver", ("matmul", (96, 96), (96, 96), {}),
         lambda: dealer.beaver_triples("matmul", (96, 96), (96, 96), ids)),
        ("truncation", ((N,), 1 << 16), lambda: dealer.truncation_pairs((N,), 1 << 16, ids)),
        ("truncation", ((N,), 1000), lambda: dealer.truncation_pairs((N,), 1000, ids)),
        ("zero", ((N,),), lambda: dealer.zero_shares((N,), ids)),
        ("comparison", ((N,), 1), lambda: dealer.comparison_material((N,), 1, ids)),
        ("fixed_beaver", (fid, "mul", (N,), (N,), {}),
         lambda: dealer.fixed_operand_triples(fid, "mul", (N,), (N,), ids)),
    ]
    items = []
    with dealer.record() as plan:
        items += [(kind, spec, take()) for kind, spec, take in takes]  # on demand, count 1
    dealer.on_exhausted = "raise"
    dealer.deal_ahead(plan, repeat=3)  # one request of 3 items per kind
    dealer.deal_ahead(plan, repeat=2)  # more requests before any is taken
    items += [(kind, spec, take()) for _ in range(5) for kind, spec, take in takes]
    with dealer.start_background(plan, repeat=3):
        items += [(kind, spec, take()) for _ in range(3) for kind, spec, take in takes]
    dealer.on_exhausted = "deal"
    items += [(kind, spec, take()) for _ in range(2) for kind, spec, take in takes[::-1]]  # dealt on demand
    # nothing stored at any party shares memory with another stored field or with the provider's mask
    owners: dict = {fixed_b.untyped_storage().data_ptr(): "the provider's fixed mask"}
    for n, (kind, _, item) in enumerate(items + [("fixed_mask", None, mask_item)]):
        for t in _stored(item, parties):
            ptr = t.untyped_storage().data_ptr()
            assert ptr not in owners, f"a {kind} field (item {n}) shares memory with {owners[ptr]}"
            owners[ptr] = f"a {kind} field (item {n})"
    assert torch.equal(_reconstruct(mask_item, parties, frozenset())[0], fixed_b)
    gen = torch.Generator().manual_seed(0)
    for kind, spec, item in items:
        xor = xor_fields(kind, spec)
        fields = _reconstruct(item, parties, xor)
        _check_plain(kind, spec, fields, fixed_b)
        uniform_shapes, _, derive = recipe(kind, spec)
        n_u = len(uniform_shapes)
        want = derive(fields[:n_u], gen)
        for j, (got, expected) in enumerate(zip(fields[n_u:], want)):
            assert torch.equal(got, expected), f"{kind} derived field {j} differs from its uniform fields' values"


def test_a_mixed_computation_on_background_material_matches_torch(hook):
    parties = _workers(hook, "mixed")
    cp = sy.VirtualWorker(hook, id="rth-mixed-cp")
    dealer = dealer_for(cp, hook.local_worker)  # (the one a sharing with crypto_provider=cp takes from)

    def step(seed):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(N, generator=g), torch.randn(N, generator=g)
        m1, m2 = torch.randn(96, 96, generator=g), torch.randn(96, 96, generator=g)
        x, y, u, v = (t.fix_precision().share(*parties, crypto_provider=cp) for t in (a, b, m1, m2))
        got = [F.relu(x * y), u @ v, x * y - y]
        return got, [F.relu(a * b), m1 @ m2, a * b - b]

    with dealer.record() as plan:
        got, want = step(0)
    dealer.drop_ahead()
    dealer.on_exhausted = "raise"
    try:
        with dealer.start_background(plan, repeat=3):
            outs = [step(k + 1) for k in range(3)]
        dealer.deal_ahead(plan, repeat=2)
        outs += [step(k + 10) for k in range(2)]
        for got, want in [(got, want)] + outs:  # read after every dealing ran
            for g_, w_ in zip(got, want):
                torch.testing.assert_close(g_.get().float_precision(), w_, atol=2e-2, rtol=1e-3)
    finally:
        dealer.on_exhausted = "deal"
        dealer.drop_ahead()
