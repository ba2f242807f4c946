"""The console's datasets (and sessions) pages count in one pass over the store (session 45: a pass per dataset
or per session made a page view O(datasets x objects)); the counts are those of the direct definition."""

from __future__ import annotations

import torch

import veil as sy
from veil.governance.console import views
from veil.governance.provenance import sources_of


def test_dataset_counts_match_their_definition(hook):
    w = sy.VirtualWorker(hook, id="console-views-counts")
    a = w.load(torch.ones(4, 3), tags=("#a",), policy="review")
    b = w.load(torch.ones(2, 3), tags=("#b",), policy="review")
    (pa,), (pb,) = w.search(["#a"]), w.search(["#b"])
    kept = [pa * 2, pa.sum(0) + pb.sum(0), pb.sum(0), pa.sum(0) * 3]  # derived from a, a and b, b, a
    rows = {r["id"]: r["derived"] for r in views.datasets(w)}
    for oid in rows:
        naive = sum(1 for _, x in w.monitor.owner_entries() if not x.protected and oid in sources_of(0, x))
        assert rows[oid] == naive
    ids = sorted(rows)
    assert len(ids) == 2 and sum(rows.values()) >= 5 and all(v > 0 for v in rows.values())
    assert len(kept) == 4 and a is not None and b is not None
