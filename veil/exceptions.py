"""Exceptions raised by veil, and the registry used to re-raise remote errors locally.

A worker never lets an exception escape while handling a message: it replies with
the exception's registered name and message, and the caller raises the same class
here. Only names in ``REMOTE_ERRORS`` cross the wire, so a reply cannot make the
caller instantiate arbitrary classes.
"""

from __future__ import annotations

import re

#: longest error text a reply carries, or a caller raises from a reply: a requester's text echoed in an error
#: (an id, a name, an op) could otherwise make every reply and audit row as long as its frame, and a hostile
#: worker's reply could put a megabyte of lines on a client's terminal
MAX_REPLY_MESSAGE = 4000

# line breaks, other C0/C1 controls, DEL, zero-width and bidirectional controls: what lets text from the
# other side print as extra lines, move the cursor (ANSI escapes) or read in another order than it is
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


class VeilError(Exception):
    """Base class of every error veil raises on purpose.

    ``value_free``: the message is veil's own text about the request (parameters,
    budgets), never a quote of protected values, so it may reach a client even
    when the failing call touched the owner's data (see ``owner_guard.client_error``).
    """

    value_free: bool = False


class SerializationError(VeilError):
    """Bytes that are not a valid veil message (malformed, truncated, hostile)."""


class VersionMismatchError(SerializationError):
    """A message written in a wire-format version this worker does not speak."""


class OperationNotAllowedError(VeilError):
    """The operation is not in the worker's allowlist."""


class ObjectNotFoundError(VeilError):
    """No object with the requested id on the worker (freed, never sent, or guessed)."""


class PermissionDeniedError(VeilError):
    """The data owner's rules forbid this request (e.g. ``.get()`` of a private tensor)."""


class WorkerMismatchError(VeilError):
    """An operation mixes pointers to objects that live on different workers."""


class WorkerNotFoundError(VeilError):
    """A worker id that this worker does not know how to reach."""


class RemoteExecutionError(VeilError):
    """The allowlisted operation itself failed on the worker (bad shapes, dtypes, ...)."""


class RevealError(VeilError):
    """A local operation would need the remote value (e.g. ``bool(ptr)``); use ``.get()``."""


class ConnectionLostError(VeilError):
    """The connection to a remote worker failed or timed out."""


class BudgetExceededError(PermissionDeniedError):
    """A privacy budget would be exceeded by the request."""


class ProtectedDataError(RemoteExecutionError):
    """An operation failed while computing on the owner's protected data.

    The client sees only which operation failed: the original error text may
    quote values (an out-of-range index, a shape built from data), so it goes to
    the data owner's log instead.
    """


class CommandTimeoutError(VeilError):
    """A command ran past the worker's per-command time limit (``veil worker --max-command-seconds``)."""


class CommandCancelledError(CommandTimeoutError):
    """A command was stopped because the session that sent it disconnected."""
class ReviewPendingError(PermissionDeniedError):
    """The object derives from data under the owner's review policy: a release request waits for the owner.

    The message names the request id (``req-...``); ``ptr.get(wait=SECONDS)`` waits for the decision.
    """

    @property
    def request_id(self) -> str | None:
        import re

        found = re.search(r"req-[0-9a-f]+", str(self))
        return found.group(0) if found else None


class RequestDeniedError(PermissionDeniedError):
    """The data owner denied the release request (the message carries the owner's words)."""


class WorkerStartError(VeilError, RuntimeError):
    """A worker process (``start_worker``, ``Cluster``, ``veil serve --auto``) exited or stayed silent instead of
    listening: a port in use, a bad flag. The first line names the worker and the cause (the worker's own
    error line); the lines after it are the worker's last output. Raised locally only: it never crosses the
    wire. A RuntimeError too, as the launcher raised before."""


class CommandLineError(VeilError, SystemExit):
    """Bad input to a ``veil`` command (a flag's value, a file it names): ``veil`` prints one line,
    ``PROG: error: MESSAGE``, and exits with status 2 (the README's promise; scripts tell bad input from a
    crash by it). A SystemExit, so a caller of the command's functions that does not catch it stops as it did
    when these were ``SystemExit(message)``; ``str()`` is the message. Raised locally only (never on the wire)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2  # the exit status, whoever lets it end the process (nothing else printed for an int)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


#: Errors a worker may report by name. Anything else is reported as RemoteExecutionError.
REMOTE_ERRORS: dict[str, type[VeilError]] = {
    cls.__name__: cls
    for cls in (
        VeilError,
        SerializationError,
        VersionMismatchError,
        OperationNotAllowedError,
        ObjectNotFoundError,
        PermissionDeniedError,
        WorkerMismatchError,
        WorkerNotFoundError,
        RemoteExecutionError,
        RevealError,
        ConnectionLostError,
        BudgetExceededError,
        ProtectedDataError,
        CommandTimeoutError,
        CommandCancelledError,
        ReviewPendingError,
        RequestDeniedError,
    )
}


def wire_name(cls: type[BaseException]) -> str:
    """The name an error class travels under (``cls.wire_name`` where two subsystems share a class name)."""
    return cls.__dict__.get("wire_name") or cls.__name__


def register_remote_error(cls: type[VeilError]) -> type[VeilError]:
    """Lets a subsystem (DP, SMPC, HE) add an error class that may cross the wire."""
    if not issubclass(cls, VeilError):
        raise TypeError(f"{cls!r} must derive from VeilError to cross the wire")
    name = wire_name(cls)
    known = REMOTE_ERRORS.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"two error classes travel as {name!r}: {known!r} and {cls!r} (give one a wire_name)")
    REMOTE_ERRORS[name] = cls
    return cls


def error_reply_fields(exc: BaseException) -> tuple[str, str]:
    """(wire name, message) of an error a worker reports; unregistered classes report as their nearest registered base."""
    for cls in type(exc).__mro__:
        name = wire_name(cls)
        if REMOTE_ERRORS.get(name) is cls:
            return name, _bounded(str(exc))
    return "RemoteExecutionError", _bounded(f"{type(exc).__name__}: {exc}")


def _bounded(message: str) -> str:
    # (only cut here: the receiving side escapes what it raises, so an honest worker's text stays as written)
    return message if len(message) <= MAX_REPLY_MESSAGE else message[:MAX_REPLY_MESSAGE] + "..."


def one_line(text: object, most: int = MAX_REPLY_MESSAGE) -> str:
    """``text`` as one line of at most ``most`` characters (then "..."), its unprintable characters escaped
    (``\\n``, ``\\x1b``, ``\\u202e``); other non-ASCII text (names, units) is kept as it is."""
    text = text if type(text) is str else str(text)
    cut = text[:most]
    if _UNPRINTABLE.search(cut):
        cut = _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], cut)
    return cut[:most] + ("..." if len(text) > most or len(cut) > most else "")


def escaped(text: object) -> str:
    """``text`` with its unprintable characters escaped as :func:`one_line` escapes them, never cut: what another
    side chose (a worker's tags, descriptions, ids) printed where it could fake a line or move the cursor."""
    text = text if type(text) is str else str(text)
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text) if _UNPRINTABLE.search(text) else text


def error_from_reply(name: str, message: str) -> VeilError:
    """Builds the local exception for an error reply (unknown names stay generic): the other side's text
    is raised as one bounded line (:func:`one_line`), whatever that side sent."""
    cls = REMOTE_ERRORS.get(name, RemoteExecutionError) if type(name) is str else RemoteExecutionError
    return cls(one_line(message))
