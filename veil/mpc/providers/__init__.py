"""Sources of correlated randomness (Beaver triples, truncation pairs, ...).

Registry of provider kinds, explicit so a type checker can read it.
"""

from veil.mpc.providers.base import Provider
from veil.mpc.providers.local_dealer import LocalDealer
from veil.mpc.providers.worker_dealer import WorkerDealer, dealer_for

PROVIDERS: dict[str, type[Provider]] = {"local_dealer": LocalDealer, "worker_dealer": WorkerDealer}

__all__ = ["PROVIDERS", "LocalDealer", "Provider", "WorkerDealer", "dealer_for"]
