"""A dtype the wire does not carry (uint16, uint32, float8, complex32) is refused in one line where it is asked for.

Found by the review red team: ``x.to(torch.uint16)`` on a pointer was queued (pipelined), and the next command
failed with a bare ``KeyError: torch.uint16`` raised while serializing, far from the call that caused it.
"""

from __future__ import annotations

import pytest
import torch

from veil.exceptions import SerializationError
from veil.messaging import serde
from veil.messaging.messages import CommandMessage

UNCARRIED = [torch.uint16, torch.uint32, torch.float8_e4m3fn, torch.complex32]


@pytest.mark.parametrize("dtype", UNCARRIED, ids=str)
def test_a_conversion_to_an_uncarried_dtype_is_refused_at_the_call_and_the_pointer_still_works(alice, dtype):
    x = torch.tensor([1.5, -2.0, 3.25]).send(alice)
    with pytest.raises(SerializationError, match="does not carry") as info:
        x.to(dtype)
    assert "\n" not in str(info.value) and str(dtype) in str(info.value)
    # nothing was queued: the next commands run and the values are torch's
    assert torch.equal((x + 1).get(), torch.tensor([2.5, -1.0, 4.25]))
    assert torch.equal(x.to(torch.int8).get(), torch.tensor([1.5, -2.0, 3.25]).to(torch.int8))


@pytest.mark.parametrize("dtype", UNCARRIED, ids=str)
def test_serializing_an_uncarried_dtype_is_a_one_line_serialization_error(dtype):
    with pytest.raises(SerializationError, match="cannot send dtype") as info:
        serde.serialize(CommandMessage("Tensor.to", [dtype], {}, [7], False))
    assert "\n" not in str(info.value)
    msg, _sender, _ = serde.deserialize(serde.serialize(CommandMessage("Tensor.to", [torch.int16], {}, [7], False)))
    assert list(msg.args) == [torch.int16]
