"""The SMPC op tests of test_remote_ops.py, over network workers.

Parties and the crypto provider are ``veil worker`` processes on loopback
(tests/conftest.py's session servers; dave deals): triples travel from the
provider's process to the parties' processes over their peer connections,
openings through this test process. The imported tests are collected here
again and get this module's ``parties`` and ``cp`` fixtures.
"""

import pytest

from test_remote_ops import (  # noqa: F401  (collected here with the fixtures below)
    test_comparisons_relu_max,
    test_conv_and_pooling,
    test_fixed_precision_arithmetic,
    test_integer_ops,
    test_issue_example,
)


@pytest.fixture(params=[2, 3], ids=["2party", "3party"])
def parties(request, connect_websocket):
    return [connect_websocket(n) for n in ("alice", "bob", "charlie")[: request.param]]


@pytest.fixture
def cp(connect_websocket):
    return connect_websocket("dave")
