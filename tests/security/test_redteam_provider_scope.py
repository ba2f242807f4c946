"""A crypto provider's kept secrets belong to the session that registered them.

The fixed mask ``b`` of a served weight (veil/mpc/fixed_operand.py) and a SPDZ2k MAC key stay at the
provider under ids that travel to every party inside material specs. A party's owner holding any
session at the provider must not deal itself triples on another session's ``b`` (it would learn
``b``, and with the public ``f = w - b`` the weights) or on its MAC key, nor replace them.
"""

import secrets

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.mpc import fixed_operand
from veil.mpc.opening import reconstruct
from veil.mpc.providers.worker_dealer import dealer_for

SCIENTIST = "test-scientist-token"  # tests/conftest.py's WS_TOKENS: the session servers' scientist token


def _intruder(hook, websocket_servers):
    """A second session at the provider "dave", with the same scientist token as the victim's."""
    return sy.WebsocketClientWorker(hook, id=f"dave-intruder-{secrets.token_hex(4)}", host="127.0.0.1",
                                    port=websocket_servers["dave"].port, token=SCIENTIST, timeout=60)


def test_another_session_cannot_use_or_replace_a_fixed_mask(hook, connect_websocket, websocket_servers):
    parties = [connect_websocket(n) for n in ("alice", "bob")]
    cp = connect_websocket("dave")
    dealer = dealer_for(cp, hook.local_worker)
    gen = torch.Generator().manual_seed(11)
    w = torch.randint(-1000, 1000, (7, 3), generator=gen)
    ws = w.share(*parties, crypto_provider=cp).child
    fixed = fixed_operand.fix_operand(ws, dealer)
    intruder = _intruder(hook, websocket_servers)
    try:
        sneaky = dealer_for(intruder, hook.local_worker)
        with pytest.raises(VeilError, match="no fixed mask"):  # triples on the victim's b: refused
            sneaky.fixed_operand_triples(fixed.fixed_id, "mm", (5, 7), (7, 3), ("alice", "bob"))
        sneaky.fixed_operand_mask(fixed.fixed_id, (7, 3), ("alice", "bob"))  # its own b under that id ...
        x = torch.randint(-1000, 1000, (5, 7), generator=gen)
        xs = x.share(*parties, crypto_provider=cp).child
        out = reconstruct(fixed_operand.fixed_product(xs, fixed, "mm"))  # ... does not replace the victim's
        assert torch.equal(out, x @ w)
    finally:
        intruder.close()
    # the victim's session still serves, and its mask is still there
    x = torch.randint(-1000, 1000, (5, 7), generator=gen)
    assert torch.equal(reconstruct(fixed_operand.fixed_product(x.share(*parties, crypto_provider=cp).child,
                                                               fixed, "mm")), x @ w)


def test_another_session_cannot_use_or_replace_a_mac_key(hook, connect_websocket, websocket_servers):
    parties = [connect_websocket(n) for n in ("alice", "bob")]
    cp = connect_websocket("dave")
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    A, B = (t.fix_precision().share(*parties, crypto_provider=cp, active_security=True) for t in (a, b))
    assert ((A * B).get().float_precision() - a * b).abs().max() < 1e-3
    from veil.mpc import mac

    key_id = next(key.key_id for provider, key in mac._KEYS.values())
    intruder = _intruder(hook, websocket_servers)
    try:
        sneaky = dealer_for(intruder, hook.local_worker)
        with pytest.raises(VeilError, match="unknown MAC key"):  # material under the victim's key: refused
            sneaky.authenticated_triples(key_id, "mul", (3, 4), (3, 4), ("alice", "bob"))
        sneaky.register_mac_key(key_id, torch.tensor(5, dtype=torch.int64))  # an alpha it knows, same id
        sneaky.authenticated_zero_shares((3, 4), ("alice", "bob"))
    finally:
        intruder.close()
    # the victim's next products are dealt under its own alpha: they still pass the MAC check
    assert ((A * B + A).get().float_precision() - (a * b + a)).abs().max() < 1e-3
