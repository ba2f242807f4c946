"""Error text from the other side is raised as one bounded line (veil/exceptions.py: one_line).

A hostile worker (a party, a serving node, a peer) chooses its error replies' text, and a requester chooses
the ids, names and ops a worker's refusal quotes. Before, a reply's message was raised as sent: a megabyte
over many lines, ANSI escapes that recolour or clear a terminal, bidirectional controls that make a line
read as something else; and a worker's refusal echoing a requester's text was as long as that text.
"""

from __future__ import annotations

import torch

import veil as sy
from veil.exceptions import MAX_REPLY_MESSAGE, PermissionDeniedError, RemoteExecutionError, error_from_reply, one_line
from veil.ids import new_id
from veil.messaging import messages as m

HOSTILE = "denied\n[INFO] budget reset to 1000\r\x1b[2J\x1b[31mall clear\u202eevil\x00" * 20_000  # ~900 KB


def test_a_hostile_replys_text_is_raised_as_one_bounded_line():
    error = error_from_reply("PermissionDeniedError", HOSTILE)
    text = str(error)
    assert type(error) is PermissionDeniedError
    assert len(text) <= MAX_REPLY_MESSAGE + 3 and text.endswith("...")
    assert not any(c in text for c in "\n\r\x1b\u202e\x00"), "control characters reached the raised error"
    assert text.startswith("denied\\n[INFO] budget reset to 1000\\r\\x1b[2J")  # escaped, still readable


def test_honest_text_is_kept_as_written():
    honest = "budget exhausted for user 'zoë' on dataset 'München' (ε 1.5 of 1.0)"
    assert str(error_from_reply("PermissionDeniedError", honest)) == honest
    assert one_line(honest) == honest


def test_a_reply_naming_no_string_class_or_a_non_string_message_stays_generic():
    assert type(error_from_reply(["PermissionDeniedError"], "x")) is RemoteExecutionError
    assert type(error_from_reply("NoSuchError", "x")) is RemoteExecutionError
    assert str(error_from_reply("PermissionDeniedError", 12345)) == "12345"


def test_a_refusal_quoting_a_requesters_text_is_bounded_and_the_worker_serves():
    hook = sy.TorchHook(torch)
    w = sy.VirtualWorker(hook, id=f"errlines-{new_id()}")
    x = torch.tensor([1.0, 2.0]).send(w)
    op = "evil\n" * 100_000  # a 500 KB op name the refusal quotes
    try:
        w.send_msg(m.CommandMessage(op, [m.ObjectRef(x.id_at_location)], {}, [new_id()], False), location=w)
    except sy.exceptions.OperationNotAllowedError as e:
        text = str(e)
    else:
        raise AssertionError("an unknown op was run")
    assert len(text) <= MAX_REPLY_MESSAGE + 3 and "\n" not in text
    assert torch.equal((x + 1).get(), torch.tensor([2.0, 3.0]))  # still serving, values as plain torch
