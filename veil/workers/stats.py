"""Counts what crosses the wire, so benchmarks can report rounds and bytes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TransportStats:
    messages: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def record(self, sent: int, received: int) -> None:
        self.messages += 1
        self.bytes_sent += sent
        self.bytes_received += received

    def reset(self) -> None:
        self.messages = self.bytes_sent = self.bytes_received = 0

    def snapshot(self) -> dict[str, int]:
        return {"messages": self.messages, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}
