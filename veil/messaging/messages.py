"""Typed messages exchanged between workers.

Each message is a frozen-free dataclass with a unique ``TYPE`` code and a fixed
field order; ``serde`` turns it into a msgpack array ``[version, type, sender,
piggybacked_deletes, *fields]``. Adding a message type = adding a dataclass here
and listing it in ``MESSAGE_TYPES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterator


@dataclass(slots=True)  # one per pointer argument of every command: no per-instance dict
class ObjectRef:
    """Names an object in the receiving worker's store (inside command arguments)."""

    id: int


def arg_leaves(value: Any) -> Iterator[Any]:
    """The non-container values of a message argument (lists, tuples and dict values are walked)."""
    tp = type(value)
    if tp is list or tp is tuple:
        for v in value:
            yield from arg_leaves(v)
    elif tp is dict:
        for v in value.values():
            yield from arg_leaves(v)
    else:
        yield value


def object_refs(value: Any) -> Iterator[ObjectRef]:
    """The ObjectRefs among a message argument's leaves."""
    return (v for v in arg_leaves(value) if type(v) is ObjectRef)


@dataclass
class Descriptor:
    """What a caller needs to build a pointer: id, shape, dtype, requires_grad, tags."""

    id: int
    shape: tuple
    dtype: str
    requires_grad: bool = False
    tags: tuple = ()
    description: str = ""


@dataclass
class StoredObject:
    """One object to store on the receiver, with the data owner's metadata."""

    id: int
    obj: Any
    tags: tuple = ()
    description: str = ""
    allowed_users: tuple | None = None  # None: no restriction on .get()


# ---------------------------------------------------------------- requests


@dataclass
class CommandMessage:
    """Run one allowlisted operation on stored objects.

    ``return_ids`` gives the ids under which the (flattened) tensor results are
    stored: ``0`` marks a result that aliases an input (in-place ops). ``None``
    asks the worker to choose ids and describe the results in its reply (used
    when the caller cannot infer shapes locally).
    """

    TYPE: ClassVar[int] = 1
    op: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    return_ids: list | None = None
    grad_enabled: bool = True

    def __post_init__(self) -> None:
        if type(self.args) is list:  # arrives as an array (see serde.serialize)
            self.args = tuple(self.args)


@dataclass
class ObjectMessage:
    """Store objects (``.send``)."""

    TYPE: ClassVar[int] = 2
    objects: list = field(default_factory=list)  # list[StoredObject]


@dataclass
class GetObjectsMessage:
    """Return objects (``.get``); ``delete`` removes them afterwards when allowed."""

    TYPE: ClassVar[int] = 3
    ids: list = field(default_factory=list)
    delete: bool = True
    user: str | None = None  # identity asked for by the caller (virtual workers only)


@dataclass
class DeleteMessage:
    """Free objects (pointer garbage collection)."""

    TYPE: ClassVar[int] = 4
    ids: list = field(default_factory=list)


@dataclass
class SearchMessage:
    """Find objects whose tags contain every query term."""

    TYPE: ClassVar[int] = 5
    query: list = field(default_factory=list)
    after: int | None = None  # the page after this object (veil/workers/listing.py); None: the first


@dataclass
class MoveMessage:
    """Send stored objects straight to another worker (``.move``)."""

    TYPE: ClassVar[int] = 6
    ids: list = field(default_factory=list)
    destination: str = ""
    new_ids: list = field(default_factory=list)
    user: str | None = None


@dataclass
class RemoteGetMessage:
    """Replace a stored pointer by the value it points to (``.remote_get``)."""

    TYPE: ClassVar[int] = 7
    id: int = 0


@dataclass
class ListObjectsMessage:
    """Describe the objects the sender stored on the worker, one bounded page at a time."""

    TYPE: ClassVar[int] = 8
    after: int | None = None  # the page after this object (veil/workers/listing.py); None: the first


@dataclass
class SkeletonCommand:
    """A small synchronous command in short form (network workers; ``veil/workers/skeletons.py``).

    ``define`` (first use on a connection): ``[op, args, kwargs, grad_enabled]`` of a CommandMessage
    whose pointer arguments are ``ObjectRef(slot)`` placeholders, kept by the server for this
    connection under number ``skeleton``. Every use sends only the ids that fill the slots and the
    result ids; the server expands it back into the CommandMessage fields and runs those exactly as a
    CommandMessage (roles, the reference monitor, audit).
    """

    TYPE: ClassVar[int] = 9
    skeleton: int = 0
    ids: list = field(default_factory=list)
    return_ids: list = field(default_factory=list)
    define: list | None = None


# ----------------------------------------------------------------- replies


@dataclass
class OkReply:
    TYPE: ClassVar[int] = 100


@dataclass
class ErrorReply:
    """An error while handling a request: registered error name + message."""

    TYPE: ClassVar[int] = 101
    error: str = "VeilError"
    message: str = ""


@dataclass
class ObjectsReply:
    TYPE: ClassVar[int] = 102
    objects: list = field(default_factory=list)


@dataclass
class ResultReply:
    """Results of a command whose ids the worker chose: a tree of Descriptors."""

    TYPE: ClassVar[int] = 103
    result: Any = None


@dataclass
class DescriptorsReply:
    TYPE: ClassVar[int] = 104
    descriptors: list = field(default_factory=list)
    next_after: int | None = None  # more to list: ask again with after=next_after; None: complete


MESSAGE_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        CommandMessage,
        ObjectMessage,
        GetObjectsMessage,
        DeleteMessage,
        SearchMessage,
        MoveMessage,
        RemoteGetMessage,
        ListObjectsMessage,
        SkeletonCommand,
        OkReply,
        ErrorReply,
        ObjectsReply,
        ResultReply,
        DescriptorsReply,
    )
}

#: field names in wire order, computed once (dataclasses.fields is slow per call)
FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in MESSAGE_TYPES.values()
}


def register_message(cls: type) -> type:
    """Adds a message type from an extension (plans, SMPC, DP); codes must be unique."""
    if cls.TYPE in MESSAGE_TYPES and MESSAGE_TYPES[cls.TYPE] is not cls:
        raise ValueError(f"message type code {cls.TYPE} already used by {MESSAGE_TYPES[cls.TYPE]}")
    MESSAGE_TYPES[cls.TYPE] = cls
    FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return cls
