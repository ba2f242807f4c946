"""Red team (finding of session 43, fixed): what a session registers at a crypto provider outside its memory quota.

``veil.mpc.register_mac_key`` (``worker_dealer._register_mac_key`` -> ``material.register_mac_key``) keeps
``(session, key_id) -> alpha`` in the provider's process for the session's lifetime. ``key_id`` is any
string (fixed-mask ids are 16-64 characters; MAC key ids have no bound) and a session may register any
number of them; none of it is charged to ``max_session_bytes``. One session with a 1 MB quota keeps
tens of MB (up to the message limit per command, times any number of commands) at the provider.
"""

from __future__ import annotations

import secrets

import pytest
import torch

import veil as sy
from veil.mpc import material
from veil.mpc.errors import ProviderError
from veil.mpc.providers.worker_dealer import MAC_KEY
from veil.workers.handlers import _run_command
from veil.workers.monitor import Principal


def test_mac_key_registrations_are_bounded_by_the_session_quota(hook):
    provider = sy.VirtualWorker(hook, id=f"s43b-cp-{secrets.token_hex(3)}", max_session_bytes=1 << 20)
    mallory = Principal("s43b-mallory", "mallory", namespace="s43b-mallory", roles=frozenset({"scientist"}),
                        isolated=True)
    before = dict(material.MAC_KEYS)
    accepted = 0
    try:
        for k in range(4):  # 4 x 8 MiB key ids under a 1 MiB session quota
            key_id = f"{k}" + "k" * (8 << 20)
            try:
                _run_command(provider, mallory, mallory.session, MAC_KEY,
                             [key_id, torch.tensor(5, dtype=torch.int64)], {}, [], False)
            except Exception:  # noqa: BLE001  (a refusal is what the fix gives)
                break
            accepted += 1
        kept = sum(len(k[1]) for k in material.MAC_KEYS if k not in before and isinstance(k[1], str))
        assert kept <= 1 << 20, (f"{accepted} MAC key registrations keep {kept / 2**20:.0f} MiB at the provider, "
                                 "over the session's 1 MiB quota and charged nowhere")
    finally:
        for k in [k for k in material.MAC_KEYS if k not in before]:
            material.MAC_KEYS.pop(k, None)


def test_a_session_holds_a_bounded_number_of_mac_keys_and_its_own_keep_working():
    """A network session's scope (in-process requests, scope None, are this process's own and not counted)."""
    before = dict(material.MAC_KEYS)
    try:
        with material.provider_scope("s43-eve-session"):
            ids = [f"mac-{secrets.token_hex(8)}" for _ in range(material.MAX_MAC_KEYS_PER_SCOPE)]
            for key_id in ids:
                material.register_mac_key(key_id, torch.tensor(5, dtype=torch.int64))
            with pytest.raises(ProviderError, match="MAC keys"):
                material.register_mac_key("mac-" + "f" * 16, torch.tensor(1, dtype=torch.int64))
            # re-registering one of its own ids is no new key; a long id is refused with a clear error
            material.register_mac_key(ids[0], torch.tensor(7, dtype=torch.int64))
            with pytest.raises(ProviderError, match="1 to 64"):
                material.register_mac_key("k" * 65, torch.tensor(1, dtype=torch.int64))
        with material.provider_scope("s43-other-session"):  # another session is not held back by eve's keys
            material.register_mac_key("mac-" + "e" * 16, torch.tensor(1, dtype=torch.int64))
        assert int(material.MAC_KEYS[("s43-eve-session", ids[0])]) == 7
        assert material.drop_provider_scope("s43-eve-session") == material.MAX_MAC_KEYS_PER_SCOPE
    finally:
        for k in [k for k in material.MAC_KEYS if k not in before]:
            material.MAC_KEYS.pop(k, None)
