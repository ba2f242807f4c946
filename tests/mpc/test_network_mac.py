"""SPDZ2k-authenticated arithmetic and comparisons over network workers (``veil worker`` processes on loopback).

The 128-bit limbs, the MAC key's shares and the authenticated material travel
as ordinary int64 tensors; the protocol steps are the ``mac_*`` party
functions. Results are MAC-checked on ``.get()`` and compared with torch.
"""

import torch


def test_authenticated_fixed_point_over_network(connect_websocket):
    parties = [connect_websocket(n) for n in ("alice", "bob")]
    cp = connect_websocket("dave")
    g = torch.Generator().manual_seed(3)
    a, b, w = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(4, 2, generator=g)
    A, B, W = (t.fix_precision().share(*parties, crypto_provider=cp, active_security=True) for t in (a, b, w))
    assert ((A * B - 0.5).get().float_precision() - (a * b - 0.5)).abs().max() < 1e-3
    assert ((A @ W).sum(0).get().float_precision() - (a @ w).sum(0)).abs().max() < 1e-3
    assert ((A @ w.fix_precision()).get().float_precision() - a @ w).abs().max() < 1e-3


def test_authenticated_relu_and_refresh_over_network(connect_websocket):
    parties = [connect_websocket(n) for n in ("alice", "bob")]
    cp = connect_websocket("dave")
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 5, generator=g)
    A = a.fix_precision().share(*parties, crypto_provider=cp, active_security=True).refresh()
    assert (torch.relu(A).get().float_precision() - torch.relu(a)).abs().max() <= 2.0**-16
    assert torch.equal((A > 0.5).get().float_precision(), (a > 0.5).float())
