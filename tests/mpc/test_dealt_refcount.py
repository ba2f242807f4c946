"""Used dealt material is freed by reference counting, not left for the cyclic GC.

Each dealt field's entry refers to its item and the item to its fields; when both were strong the
triple's tensors stayed alive until a GC pass (hundreds of MB per network party under mul 1e6)."""

from __future__ import annotations

import gc
import weakref

import torch

from veil.workers.dealt import UNBOUND, group, item_of
from veil.workers.store import Entry, Kind


def _triple() -> list[Entry]:
    entries = [Entry(torch.arange(1000, dtype=torch.int64) + i, kind=Kind.DEALER) for i in range(3)]
    group(entries, [(0, True), (0, True), (0, False)])  # a, b uniform; c derived
    return entries


def test_dropped_dealt_entries_free_their_tensors_without_gc():
    gc.disable()
    try:
        entries = _triple()
        refs = [weakref.ref(e.obj) for e in entries]
        del entries
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_binding_still_reaches_the_live_fields():
    entries = _triple()
    item = item_of(entries[0])
    assert item is item_of(entries[2]) and item.bound is UNBOUND
    del entries[1]  # one field's entry is gone (deleted from the store): it can no longer be used
    assert len(item.entries) == 2
    item.bind(("alice",))
    assert [e.reveal_to for e in entries] == [("alice",), ("alice",)]
    assert item_of(entries[1]) is item  # the entries still name their item
