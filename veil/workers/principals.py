"""Who asks the reference monitor for an object, and why: principals and purposes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from veil.workers.store import SHARED_NS


class Purpose(str, Enum):
    """Why a message names an object (see :data:`PURPOSES`)."""

    COMPUTE = "compute"  # an allowlisted op reads it; the result stays on the worker
    REVEAL = "reveal"  # its value goes back to the requester (.get)
    MOVE = "move"  # it is copied/moved to another worker
    HAND_OFF = "hand_off"  # a stored pointer acts on a peer for the requester (remote_get)
    PROTOCOL_STEP = "protocol_step"  # a protocol's party step or opening uses it
    DP_RELEASE = "dp_release"  # a differentially private release reads it


@dataclass(frozen=True)
class PurposeRule:
    """What a purpose lets out of the worker, and whether allowed uses are audited."""

    releases_value: bool  # the value (not a function of it under a protocol) leaves the worker
    audit_allowed: bool
    action: str  # audit action name


#: the explicit table of purposes
PURPOSES: dict[Purpose, PurposeRule] = {
    Purpose.COMPUTE: PurposeRule(False, False, "compute"),
    Purpose.REVEAL: PurposeRule(True, True, "get"),
    Purpose.MOVE: PurposeRule(True, True, "move"),
    Purpose.HAND_OFF: PurposeRule(True, True, "remote_get"),
    Purpose.PROTOCOL_STEP: PurposeRule(False, False, "protocol_step"),
    Purpose.DP_RELEASE: PurposeRule(False, True, "dp_release"),
}


@dataclass(frozen=True)
class Principal:
    """Who is asking.

    Attributes:
        session: recorded as ``created_by`` of what it stores (session id, or the
            claimed sender on in-process workers).
        user: the identity ``allowed_users`` rules see (authenticated on network workers).
        namespace: where its objects live (the session id on network workers; the
            shared namespace in-process, where there are no sessions).
        roles: authenticated roles ("scientist", "peer", "admin"); empty in-process.
        isolated: a network session: sees only its namespace, protected owner data
            and hand-offs.
        account: a peer's requests only: the requester account at that peer the request is for
            (:mod:`veil.workers.accounts`); its hand-offs are charged to it until claimed.
    """

    session: str
    user: str
    namespace: str = SHARED_NS
    roles: frozenset = frozenset()
    isolated: bool = False
    account: str = ""

    def acting_as(self, user: str) -> "Principal":
        return self if user == self.user else replace(self, user=user)

    @property
    def is_peer(self) -> bool:
        return "peer" in self.roles

    @property
    def may_deal(self) -> bool:
        """Whether what it stores can be dealer material (a crypto provider: a peer, or in-process)."""
        return not self.isolated or self.is_peer
