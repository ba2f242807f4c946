"""The owner's notice that a dataset holds more records than its hidden count's bound (``max_records``).

Past the bound a DP release reads only the first ``max_records`` records (:mod:`veil.dp.padding`; a refusal
told any scientist n > N), silently to the owner: the rest of her data never reaches an answer. When she
sets a dataset's policy, a log line says so, and the console's dataset page shows it beside the policy. Only
the owner's views say it (the count is hers); nothing here reaches a scientist's reply.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch

from veil.dp.worker_owner import _SETTINGS

logger = logging.getLogger(__name__)


def past_bound_note(worker: Any, obj: Any) -> Optional[str]:
    """What the owner should read of ``obj`` (one of her datasets) past her bound; None when it is within it,
    or its count is not hidden (no DP settings, no hide_count, no bound)."""
    settings = _SETTINGS.get(worker)
    if settings is None or not settings.hide_count or settings.max_records is None:
        return None
    if not isinstance(obj, torch.Tensor) or obj.is_nested or obj.dim() == 0:
        return None
    count, bound = int(obj.shape[0]), settings.max_records
    if count <= bound:
        return None
    return (f"{count} records past the hidden count's bound max_records={bound}: DP releases read only its "
            f"first {bound} records (raise --dp-max-records / enable_dp(max_records=...) to cover them)")


def warn_past_bound(worker: Any, ids: Iterable[int], policy: str) -> list[str]:
    """Logs (warning) each dataset of ``ids`` past the bound, after its policy was set; the notes."""
    from veil.governance.policy import owner_sources  # (governance imports veil.dp: at call time)

    entries = dict(owner_sources(worker))
    notes = []
    for oid in ids:
        entry = entries.get(oid)
        note = None if entry is None else past_bound_note(worker, entry.obj)
        if note is not None:
            logger.warning("policy %s on dataset %s of worker %s: %s", policy, " ".join(entry.tags) or oid,
                           worker.id, note)
            notes.append(note)
    return notes
