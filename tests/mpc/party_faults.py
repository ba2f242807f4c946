"""Faults injected into in-process parties, shared by the SMPC runtime tests."""

from veil.exceptions import ConnectionLostError
from veil.messaging.serde import deserialize
from veil.mpc.party import OpenMessage


def is_open(data: bytes) -> bool:
    """Whether a serialized request is an opening."""
    return type(deserialize(data)[0]) is OpenMessage


def lose_first_opening(monkeypatch, worker) -> None:
    """``worker``'s connection is lost at the first opening it receives (only that one)."""
    real = worker._recv_msg
    fail = {"open": True}

    def flaky(data):
        if fail["open"] and is_open(data):
            fail["open"] = False
            raise ConnectionLostError(f"connection to worker {worker.id!r} was lost: test")
        return real(data)

    monkeypatch.setattr(worker, "_recv_msg", flaky)
