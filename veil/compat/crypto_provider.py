"""``x.share(bob, alice)`` without ``crypto_provider=`` (PySyft 0.2 defaulted it).

PySyft dealt Beaver triples from the local worker, i.e. from the data owner
who also knows the values being shared. veil keeps the dealer out of that
role: the default is a dedicated in-process VirtualWorker (one per hook
context) that is neither a party nor the local worker, and the first use
warns once that a real deployment should name an independent provider.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Sequence

#: the id of the default dealer worker (one per hook context)
DEFAULT_PROVIDER_ID = "veil_default_crypto_provider"

_providers: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_warned = False


class DefaultCryptoProviderWarning(UserWarning):
    """share() used the dedicated in-process crypto provider."""


def default_crypto_provider(parties: Sequence[Any]) -> Any:
    """The dedicated crypto-provider worker for these parties' hook context.

    Raises:
        ValueError: If the parties are not workers (pass a provider explicitly).
    """
    from veil.tensors.mpc_glue.remote_sharing import is_worker
    from veil.workers.virtual import VirtualWorker

    if not parties or not all(is_worker(p) for p in parties):
        raise ValueError(
            "share() needs crypto_provider= when the parties are not workers, e.g. crypto_provider=sy.LocalDealer()"
        )
    hook = parties[0].hook
    provider = _providers.get(hook)
    if provider is None:
        provider = VirtualWorker(hook, id=DEFAULT_PROVIDER_ID)
        _providers[hook] = provider
    _warn_once()
    return provider


def _warn_once() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"share() without crypto_provider=: using the dedicated in-process worker {DEFAULT_PROVIDER_ID!r}. "
        "The dealer of Beaver triples must be neither a party nor the data owner (whoever deals them and "
        "sees the opened values can recover the secrets); in a deployment pass crypto_provider=<independent worker>.",
        DefaultCryptoProviderWarning,
        stacklevel=5,  # the user's share() call
    )
