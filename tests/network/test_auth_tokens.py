"""Access tokens made by ``sy.new_token()``."""

from __future__ import annotations

from unittest import mock

import veil as sy
from veil.workers import websocket_auth


def test_new_tokens_never_start_with_a_dash():
    # One URL-safe draw in 64 starts with "-", which `veil worker --token -...` reads as an option.
    draws = iter(["-leading-dash-token", "Abc_def-ghi"])
    with mock.patch.object(websocket_auth.secrets, "token_urlsafe", lambda n: next(draws)):
        assert websocket_auth.new_token() == "Abc_def-ghi"
    tokens = {sy.new_token() for _ in range(2000)}
    assert len(tokens) == 2000 and not any(t.startswith("-") for t in tokens)
    assert all(len(t) == 43 for t in tokens)  # 256 bits, URL-safe base64
