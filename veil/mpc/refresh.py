"""Re-randomizing shares: every party adds its share of a dealt sharing of zero.

A protocol step of its own (not a plain ``add``) so that the result is a
protocol share, not dealer material, in the worker's reference monitor.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch

from veil.mpc.party import party_function, run_party


@party_function("refresh_add")
def _refresh_add(x_i: torch.Tensor, z_i: torch.Tensor) -> torch.Tensor:
    return x_i + z_i


def refresh_shares(shares: Mapping[Hashable, object], zeros: Mapping[Hashable, tuple]) -> dict:
    """Party -> ``share + zero share`` (no communication between the parties)."""
    return {p: run_party("refresh_add", s, zeros[p][0]) for p, s in shares.items()}
