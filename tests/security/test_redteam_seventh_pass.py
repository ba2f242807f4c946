"""Seventh pass: metadata a refusal or a search shows a user who may not see it (the lead's own probes)."""

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError


def test_a_refused_get_does_not_name_who_may_read_the_data(alice):
    """An owner's grant (``allowed_users``) is the owner's business: a scientist refused a ``.get()`` used to
    read the list of users who may (here, which clinic takes part) in the refusal. It must say only that it
    is refused, and the grant must still work for the user it names."""
    alice.load(torch.arange(3.0), tags=("#cohort",), allowed_users=("clinic_cardio_7",))
    (ptr,) = sy.search(alice, ["#cohort"])
    with pytest.raises(PermissionDeniedError, match="private") as refused:
        ptr.get()
    assert "clinic_cardio_7" not in str(refused.value)
    if isinstance(alice, sy.VirtualWorker):  # a network worker wants that user's token for the claim
        assert torch.equal(ptr.get(user="clinic_cardio_7"), torch.arange(3.0))
