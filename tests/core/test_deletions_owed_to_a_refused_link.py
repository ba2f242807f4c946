"""Deletions owed to a worker whose link now refuses us (a revoked token, a closed peer link) fail no later flush.

Found when the suite first ran on two xdist processes: a pointer to a network worker that had since refused the
test's token (a revocation test) queued its deletion in the session's local worker, and the next unrelated
``flush_deletes()`` raised that worker's ``PermissionDeniedError``. A lost worker was already forgiven for
deletions alone (tests/network/test_robustness.py); a refusing one is as far out of reach. A deferred command,
the user's computation, still raises.
"""

from __future__ import annotations

import gc

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError


class Refusing(sy.VirtualWorker):
    """Serves until ``refusing``; then every request is refused as a revoked token's handshake would be."""

    refusing = False

    def _recv_msg(self, data):
        if self.refusing:
            raise PermissionDeniedError(f"worker {self.id!r} at ws://127.0.0.1:1 refused the access token")
        return super()._recv_msg(data)


def test_deletions_owed_to_a_refusing_worker_fail_no_later_flush(hook):
    gone = Refusing(hook, id=f"refusing-{id(object())}")
    kept = sy.VirtualWorker(hook, id=f"kept-{id(object())}")
    me = hook.local_worker
    p = torch.tensor([1.0, 2.0]).send(gone)
    q = torch.tensor([3.0]).send(kept)
    gone.refusing = True
    del p
    gc.collect()  # its deletion is queued for the refusing worker
    me.flush_deletes()  # deletions alone: nothing raised
    assert torch.equal((q + 1).get(), torch.tensor([4.0]))  # the other worker serves as before
    with pytest.raises(PermissionDeniedError, match="refused the access token"):
        torch.tensor([5.0]).send(gone)  # the user's own request to it still hears the refusal
    me.flush_deletes()
