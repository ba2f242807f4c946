"""An in-process trusted dealer, for tests and single-process simulation."""

from __future__ import annotations

import secrets
from typing import Hashable, Optional, Sequence

import torch

from veil.mpc.errors import ProviderError
from veil.mpc.fss import material as fss_material
from veil.mpc.comparison_material import comparison_spec
from veil.mpc.material import (FROM_SHARES, WIDE_KINDS, fields_from_shares, recipe, register_mac_key, split_shares,
                               split_wide, xor_fields)
from veil.mpc.providers.base import Provider
from veil.mpc.ring import bilinear, random_ring
from veil.mpc.sharing import split


class LocalDealer(Provider):
    """Generates correlated randomness in the current process.

    Whoever runs the dealer could learn everything, so it stands in for a
    separate crypto-provider party only in tests and simulations.

    Args:
        seed: Seed for reproducible runs. If None, the generator is seeded
            from ``secrets.randbits`` (OS entropy). torch's generator is a
            Mersenne Twister, not a cryptographic PRG.
        name: Label used in reprs and error messages.
    """

    def __init__(self, seed: Optional[int] = None, name: str = "local_dealer") -> None:
        self.name = name
        self._generator = torch.Generator()
        self._generator.manual_seed(secrets.randbits(63) if seed is None else seed)
        self.dealt = {"beaver": 0, "truncation": 0, "comparison": 0}

    def __repr__(self) -> str:
        return f"LocalDealer(name={self.name!r})"

    def _split(self, value: torch.Tensor, parties: Sequence[Hashable]) -> list[torch.Tensor]:
        return split(value, len(parties), self._generator)

    def beaver_triples(self, op, shape_a, shape_b, parties, **op_kwargs):
        fn = bilinear(op)
        a = random_ring(shape_a, self._generator)
        b = random_ring(shape_b, self._generator)
        c = fn(a, b, **op_kwargs)
        self.dealt["beaver"] += 1
        triples = zip(self._split(a, parties), self._split(b, parties), self._split(c, parties))
        return dict(zip(parties, triples))

    def local_triples(self, op, shape_a, shape_b, parties):
        if len(parties) != 2:
            raise ProviderError(f"a 'beaver_local' item is dealt to two parties, not {len(parties)}")
        self.dealt["beaver"] += 1
        return self._deal_recipe("beaver_local", (op, tuple(shape_a), tuple(shape_b), {}), parties)

    def truncation_pairs(self, shape, divisor, parties):
        self.dealt["truncation"] += 1
        return self._deal_recipe("truncation", (tuple(shape), int(divisor)), parties)

    def comparison_keys(self, shape, n_values, parties):
        masks = [random_ring(shape, self._generator) for _ in range(fss_material.n_masks(int(n_values)))]
        derived, keys = fss_material.derive(masks, int(n_values), self._generator)
        self.dealt["comparison"] += 1
        per_field = [self._split(v, parties) for v in masks + derived]
        return {p: tuple(f[i] for f in per_field) + (tuple(keys[i]) if i < 2 else ())
                for i, p in enumerate(parties)}

    def comparison_material(self, shape, n_values, parties, first_product=0):
        self.dealt["comparison"] += 1
        return self._deal_recipe("comparison", comparison_spec(shape, n_values, first_product), parties)

    def zero_shares(self, shape, parties):
        return self._deal_recipe("zero", (tuple(shape),), parties)

    def fixed_operand_mask(self, fixed_id, shape, parties):
        return self._deal_recipe("fixed_mask", (fixed_id, tuple(int(s) for s in shape)), parties)

    def fixed_operand_triples(self, fixed_id, op, shape_a, shape_b, parties, **op_kwargs):
        self.dealt["beaver"] += 1
        spec = (fixed_id, op, tuple(shape_a), tuple(shape_b), dict(sorted(op_kwargs.items())))
        return self._deal_recipe("fixed_beaver", spec, parties)

    def register_mac_key(self, key_id, alpha):
        register_mac_key(key_id, alpha)

    def authenticated_triples(self, key_id, op, shape_a, shape_b, parties, **op_kwargs):
        spec = (key_id, op, tuple(shape_a), tuple(shape_b), dict(sorted(op_kwargs.items())))
        self.dealt["beaver"] += 1
        return self._deal_recipe("beaver_mac", spec, parties)

    def authenticated_truncation_pairs(self, key_id, shape, divisor, parties):
        self.dealt["truncation"] += 1
        return self._deal_recipe("truncation_mac", (key_id, tuple(shape), int(divisor)), parties)

    def authenticated_zero_shares(self, shape, parties):
        return self._deal_recipe("zero_mac", (tuple(int(s) for s in shape),), parties)

    def authenticated_comparison_material(self, key_id, shape, parties):
        self.dealt["comparison"] += 1
        return self._deal_recipe("comparison_mac", (key_id, tuple(int(s) for s in shape)), parties)

    def _deal_recipe(self, kind, spec, parties):
        uniform_shapes, _, derive = recipe(kind, spec)
        xor = xor_fields(kind, spec)
        if kind in FROM_SHARES:  # the derived fields follow from each party's shares of the uniform ones
            per_field = fields_from_shares(derive, uniform_shapes, len(parties),
                                           lambda s: random_ring(s, self._generator), lambda v: self._split(v, parties))
            return {p: tuple(f[i] for f in per_field) for i, p in enumerate(parties)}
        uniform = [random_ring(s, self._generator) for s in uniform_shapes]
        fields = uniform + derive(uniform, self._generator)
        if kind in WIDE_KINDS:  # 128-bit SPDZ2k fields: split with carries
            per_field = split_wide(fields, len(parties), lambda s: random_ring(s, self._generator))
        else:
            per_field = [split_shares(v, len(parties), j in xor, self._generator) for j, v in enumerate(fields)]
        return {p: tuple(f[i] for f in per_field) for i, p in enumerate(parties)}


__all__ = ["LocalDealer"]
