"""The interface of sources of correlated randomness (crypto providers).

A provider is a party that deals correlated secret-shared randomness and sees
no data. Returned shares are handles supporting torch ops: plain tensors for
an in-process dealer, pointers to the parties' workers for a remote one.
"""

from __future__ import annotations

import abc
from typing import Callable, ContextManager, Hashable, Mapping, Optional, Sequence

import torch

from veil.exceptions import register_remote_error
from veil.mpc.errors import ProviderError

#: Context managers a dealer's ``record()`` block runs inside, exited before its plan closes. The tensor
#: layer registers one that, when the block ends without an error, pays the truncations the block's lazy
#: products still owe (``FixedPrecisionTensor.pending_divisor``), so that the plan counts the material a
#: later read of its results takes (mpc imports no tensors: the hook is injected).
RECORD_HOOKS: list[Callable[[], ContextManager]] = []


def check_distinct_parties(party_ids: object, what: str) -> None:
    """Refuses a dealing that names a party twice: that party would receive two (or every) share of an item,
    and so the mask hiding another party's value when it is opened."""
    if type(party_ids) is not list or len(set(map(repr, party_ids))) != len(party_ids):
        raise ProviderError(f"{what} needs a list of distinct parties (one party must never hold two shares)")


class MaterialExhaustedError(ProviderError):
    """Material dealt ahead ran out and the owner asked for no on-demand dealing."""


register_remote_error(MaterialExhaustedError)

PartyShares = Mapping[Hashable, tuple]


class Provider(abc.ABC):
    """Deals correlated randomness for the protocols in :mod:`veil.mpc`."""

    @abc.abstractmethod
    def beaver_triples(
        self,
        op: str,
        shape_a: Sequence[int],
        shape_b: Sequence[int],
        parties: Sequence[Hashable],
        **op_kwargs,
    ) -> Mapping[Hashable, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Deals a Beaver triple ``c = op(a, b)`` for a bilinear op.

        Args:
            op: A name in :data:`veil.mpc.ring.BILINEAR_OPS` ("mul", "matmul",
                "mm", "bmm", "conv2d").
            shape_a: Shape of the left operand.
            shape_b: Shape of the right operand.
            parties: Party ids, in share order.
            **op_kwargs: Extra arguments of ``op`` (e.g. conv stride/padding).

        Returns:
            party -> (a_i, b_i, c_i), additive shares of uniform ``a``, ``b``
            and of ``c = op(a, b)``.
        """

    @abc.abstractmethod
    def truncation_pairs(
        self, shape: Sequence[int], divisor: int, parties: Sequence[Hashable]
    ) -> Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]]:
        """Deals shares of ``(r, floor(r / divisor), g)`` for uniform ``r``.

        ``r`` is read as an unsigned integer and ``g`` is its wrap
        correction (:func:`veil.mpc.truncation.wrap_correction`).

        Returns:
            party -> (r_i, q_i, g_i).
        """

    def local_triples(self, op: str, shape_a: Sequence[int], shape_b: Sequence[int],
                      parties: Sequence[Hashable]) -> Optional[Mapping[Hashable, tuple]]:
        """Deals a two-party matrix product's ``(a_i, b_i, d_i)`` with ``d = a0 @ b1 + a1 @ b0`` (material kind
        ``beaver_local``: :func:`veil.mpc.beaver.deal_product` uses it for 2-D ``mm``/``matmul`` between two
        parties); None where this provider deals none (the product then takes :meth:`beaver_triples`)."""
        return None

    def zero_shares(self, shape: Sequence[int], parties: Sequence[Hashable]) -> Mapping[Hashable, tuple]:
        """Deals fresh additive shares of zero (to re-randomize a sharing).

        Returns:
            party -> ``(z_i,)`` with ``sum z_i = 0`` and any ``n - 1`` of them uniform.

        Raises:
            ProviderError: If this provider cannot deal them.
        """
        raise ProviderError(f"{self!r} does not deal shares of zero")

    def comparison_keys(
        self, shape: Sequence[int], n_values: int, parties: Sequence[Hashable]
    ) -> Mapping[Hashable, tuple]:
        """Deals the material of one private comparison (:mod:`veil.mpc.fss.material`).

        Args:
            shape: Shape of the compared tensor.
            n_values: How many values are multiplied by the comparison bit
                (0: the bit alone, which takes a smaller key).
            parties: Party ids, in share order (the first two get DCF keys).

        Returns:
            party -> shares of ``(r_0.., R_hi, r_0*R_hi..)``, followed for the
            first two parties by their DCF key's 5 tensors.

        Raises:
            ProviderError: If this provider cannot deal comparison material.
        """
        raise ProviderError(f"{self!r} does not deal comparison material")

    def comparison_material(
        self, shape: Sequence[int], n_values: int, parties: Sequence[Hashable], first_product: int = 0
    ) -> Mapping[Hashable, tuple]:
        """Deals the material of one bitwise comparison (:mod:`veil.mpc.bit_comparison`).

        ``first_product``: 1 when the first value is compared but not multiplied by the bit.

        Returns:
            party -> its shares of every field of
            :class:`veil.mpc.comparison_material.ComparisonLayout` (additive or XOR).

        Raises:
            ProviderError: If this provider cannot deal comparison material.
        """
        raise ProviderError(f"{self!r} does not deal comparison material")

    def fixed_operand_mask(self, fixed_id: str, shape: Sequence[int], parties: Sequence[Hashable]) -> Mapping[
            Hashable, tuple]:
        """Deals shares of a uniform fixed mask ``b`` for a constant operand and keeps ``b`` under
        ``fixed_id`` (once per id; :mod:`veil.mpc.fixed_operand`).

        Returns:
            party -> ``(b_i,)``.

        Raises:
            ProviderError: If this provider cannot deal fixed-operand material.
        """
        raise ProviderError(f"{self!r} does not deal fixed-operand material")

    def fixed_operand_triples(self, fixed_id: str, op: str, shape_a: Sequence[int], shape_b: Sequence[int],
                              parties: Sequence[Hashable], **op_kwargs) -> Mapping[Hashable, tuple]:
        """Deals ``(a, c = op(a, b))`` for fresh uniform ``a`` and the fixed mask ``b`` kept under ``fixed_id``.

        Returns:
            party -> ``(a_i, c_i)``.
        """
        raise ProviderError(f"{self!r} does not deal fixed-operand material")

    def register_mac_key(self, key_id: str, alpha: torch.Tensor) -> None:
        """Gives the provider a SPDZ MAC key (see :mod:`veil.mpc.mac`).

        Raises:
            ProviderError: If this provider cannot deal authenticated material.
        """
        raise ProviderError(f"{self!r} does not deal authenticated (active security) material")

    def authenticated_triples(
        self, key_id: str, op: str, shape_a: Sequence[int], shape_b: Sequence[int], parties: Sequence[Hashable],
        **op_kwargs,
    ) -> Mapping[Hashable, tuple]:
        """Deals an authenticated Beaver triple under a registered MAC key.

        Returns:
            party -> ``(a_i, b_i, c_i, (alpha*a)_i, (alpha*b)_i, (alpha*c)_i)``.
        """
        raise ProviderError(f"{self!r} does not deal authenticated (active security) material")

    def authenticated_truncation_pairs(
        self, key_id: str, shape: Sequence[int], divisor: int, parties: Sequence[Hashable]
    ) -> Mapping[Hashable, tuple]:
        """Deals an authenticated truncation pair under a registered MAC key.

        Returns:
            party -> ``(r_i, q_i, g_i, (alpha*r)_i, (alpha*q)_i, (alpha*g)_i)``
            with ``q``, ``h`` as in :meth:`truncation_pairs`.
        """
        raise ProviderError(f"{self!r} does not deal authenticated (active security) material")

    def authenticated_zero_shares(self, shape: Sequence[int], parties: Sequence[Hashable]) -> Mapping[Hashable, tuple]:
        """Deals 128-bit shares of zero for an authenticated value and its MAC (``refresh``).

        Returns:
            party -> ``(z_lo, z_hi, zm_lo, zm_hi)``: shares mod 2^128 of 0 (value) and of 0 (MAC).
        """
        raise ProviderError(f"{self!r} does not deal authenticated (active security) material")

    def authenticated_comparison_material(
        self, key_id: str, shape: Sequence[int], parties: Sequence[Hashable]
    ) -> Mapping[Hashable, tuple]:
        """Deals an authenticated random ``r`` with its 64 low bits (``comparison_mac``,
        :mod:`veil.mpc.mac_comparison`) under a registered MAC key.

        Returns:
            party -> ``(r, bits, pairs, alpha*r, alpha*bits, alpha*pairs)``, each as ``(lo, hi)`` (12 tensors).
        """
        raise ProviderError(f"{self!r} does not deal authenticated (active security) material")
