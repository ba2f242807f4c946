"""One communicator: rounds and bytes per party, from openings and transport.

``with communicate(parties, provider_worker) as comm: ...`` counts, for the
block:

* ``rounds``: opening rounds (sequential message exchanges between parties),
* ``opened_bytes[p]``: bytes party ``p`` sent to the others in openings (its
  shares of every opened entry, 8 bytes per ring element per other party),
* ``sent[p]`` / ``received[p]``: bytes party ``p``'s worker sent / received
  on the transport (commands, relayed openings, dealt material), when the
  parties are workers with counters in this process,
* ``dealer_sent``: bytes the crypto provider's worker sent (dealt material).

Openings are counted where they happen (:mod:`veil.mpc.opening`), transport
bytes by each worker's own counter (``worker.stats``), so the two cannot
drift apart; benchmarks report this one object (``as_dict``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from veil.mpc.opening import count_openings


@dataclass
class Communication:
    rounds: int = 0
    opened_bytes: dict = field(default_factory=dict)
    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)
    dealer_sent: Optional[int] = None

    def as_dict(self) -> dict:
        """Plain numbers for tables: rounds and the per-party maxima."""
        def top(d: dict) -> Optional[int]:
            return max(d.values()) if d else None

        return {"rounds": self.rounds, "opened_bytes_per_party": top(self.opened_bytes),
                "sent_per_party": top(self.sent), "received_per_party": top(self.received),
                "dealer_sent": self.dealer_sent}


def _stats(worker: Any) -> Optional[dict]:
    stats = getattr(worker, "stats", None)
    return stats.snapshot() if stats is not None and hasattr(stats, "snapshot") else None


@contextlib.contextmanager
def communicate(parties: Sequence[Any] = (), provider_worker: Any = None) -> Iterator[Communication]:
    """Counts rounds and bytes per party inside the block (see the module docstring)."""
    comm = Communication()
    before = {getattr(p, "id", p): _stats(p) for p in parties}
    dealer_before = _stats(provider_worker) if provider_worker is not None else None
    with count_openings() as openings:
        yield comm
    comm.rounds = openings.rounds
    comm.opened_bytes = dict(openings.bytes_by_party)
    for p in parties:
        pid, now = getattr(p, "id", p), _stats(p)
        if before[pid] is not None and now is not None:
            comm.sent[pid] = now["bytes_sent"] - before[pid]["bytes_sent"]
            comm.received[pid] = now["bytes_received"] - before[pid]["bytes_received"]
    if dealer_before is not None:
        comm.dealer_sent = _stats(provider_worker)["bytes_sent"] - dealer_before["bytes_sent"]
