"""Sources of correlated randomness (Beaver triples, truncation pairs, ...).

Registry of provider kinds, explicit so a type checker can read it.
"""

from veil.mpc.providers.base import Provider
from veil.mpc.providers.local_dealer import LocalDealer

PROVIDERS: dict[str, type[Provider]] = {"local_dealer": LocalDealer}

__all__ = ["PROVIDERS", "LocalDealer", "Provider"]
