"""``veil demo --review``: a release request approved (and another denied), printed from both sides.

The data owner loads Boston Housing under the ``review`` policy. The data scientist
computes freely through pointers, but a result leaves only when the owner has seen
how it was computed (op graph from the dataset) and a preview of the value.
"""

from __future__ import annotations

import threading
import time

import torch

import veil as sy
from veil.datasets import load_boston
from veil.exceptions import RequestDeniedError, ReviewPendingError
from veil.governance.graphtext import render_graph


def _say(side: str, text: str) -> None:
    print(f"[{side:<9}] {text}", flush=True)


def _owner_desk(owner: sy.VirtualWorker, decisions: list[tuple[str, str]], done: threading.Event) -> None:
    """The owner's side: look at each pending request, then approve or deny it (in order)."""
    queue = owner.release_requests
    for verdict, message in decisions:
        while not queue.pending():
            time.sleep(0.05)
        req = queue.pending()[-1]
        _say("owner", f"new request {req.id} from {req.principal!r}: {req.shape} {req.dtype}, "
                      f"reason: {req.reason or '(none)'}")
        for line in render_graph(req.graph, req.root):
            _say("owner", f"  {line}")
        _say("owner", f"  preview (owner only): {queue.preview(req.id)}")
        if verdict == "approve":
            queue.approve(req.id)
            _say("owner", f"approved {req.id}")
        else:
            queue.deny(req.id, message)
            _say("owner", f"denied {req.id}: {message}")
    done.set()


def run_review_demo() -> int:
    hook = sy.TorchHook(torch)
    owner = sy.VirtualWorker(hook, id="hospital")
    x, y, _ = load_boston()
    owner.load(x, tags=("#boston", "#data"), description="Boston features", private=True, policy="review")
    owner.load(y, tags=("#boston", "#target"), description="MEDV (k$)", private=True, policy="review")
    _say("owner", "loaded Boston Housing under the 'review' policy: nothing derived leaves without my approval")

    done = threading.Event()
    desk = threading.Thread(target=_owner_desk, args=(owner, [
        ("approve", ""), ("deny", "row-level values stay in the hospital"),
    ], done), daemon=True)

    data = owner.search(["#boston", "#data"])[0]
    target = owner.search(["#boston", "#target"])[0]
    expensive = (target > 30).float()
    share = (data * expensive).sum(dim=0) / expensive.sum()
    _say("scientist", "computed the mean features of houses above 30 k$ through pointers")
    try:
        share.get()
    except ReviewPendingError as e:
        _say("scientist", f"get() -> ReviewPendingError: request {e.request_id} waits for the owner")
    share.request(reason="feature profile of expensive houses, for the paper")
    desk.start()  # the owner looks at the queue (in a real deployment: the console or `veil requests`)
    value = share.get(wait=60)
    _say("scientist", f"approved; received {list(value.shape)} values: "
                      f"{', '.join(f'{v:.2f}' for v in value[:5].tolist())}, ...")

    raw = data[:5].copy()
    try:
        raw.get(wait=60)
    except RequestDeniedError as e:
        _say("scientist", f"get() -> RequestDeniedError: {e}")
    done.wait(10)
    _say("scientist", "my requests: " + ", ".join(f"{r['id']} {r['state']}" for r in sy.requests(owner)))
    expected = (x * (y > 30).float()).sum(dim=0) / (y > 30).float().sum()
    return 0 if torch.allclose(value, expected) else 1
