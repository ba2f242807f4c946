"""What the plan red teams share: a worker holding one owner tensor for a scientist's session, a get, the check
that the owner's tensor is unchanged and the worker still serves, and a one-line error reply."""

from __future__ import annotations

from typing import Any

import torch

from veil.messaging import messages as m

from server_sessions import answers_next_command, open_session, quota_worker, request

#: the owner's tensor (tag ``#x``)
SECRET = torch.arange(12.0).reshape(4, 3) * 1.5 - 4


def setup(hook: Any, wid: str, quota: int | None = None, secret: torch.Tensor = SECRET, *, token: str,
          **load: Any) -> tuple:
    """``(worker, scientist session, id of the owner's tensor)``: a worker taking ``token`` (session quota
    ``quota`` bytes) that loaded a copy of ``secret`` (``load``: its policy and the like)."""
    srv = quota_worker(hook, wid, token, quota)
    xid = srv.load(secret.clone(), tags=("#x",), description="secret x", **load)
    return srv, open_session(srv, token), xid


def get(srv: Any, s: Any, oid: int) -> Any:
    return request(srv, s, m.GetObjectsMessage([oid], False, None))


def serving(srv: Any, s: Any, xid: int, expected: torch.Tensor = SECRET) -> None:
    """The owner's tensor is ``expected`` still, and the worker runs and answers the scientist's next command."""
    assert torch.equal(srv.monitor.owner_objects()[xid], expected), "owner data changed"
    answers_next_command(srv, s)


def one_line(reply: Any) -> Any:
    assert type(reply) is m.ErrorReply and "\n" not in reply.message, reply
    return reply


def snapshot_spy(monkeypatch: Any) -> list:
    """Records the bytes of every copy step_undo takes (values and gradients), one entry per step."""
    from veil.plans import step_undo

    taken: list = []
    real = step_undo.snapshot

    def spy(*args, **kwargs):
        copies = real(*args, **kwargs)
        taken.append(sum(c.untyped_storage().nbytes() for item in copies for c in item[1::2]
                         if isinstance(c, torch.Tensor)))
        return copies

    monkeypatch.setattr(step_undo, "snapshot", spy)
    return taken
