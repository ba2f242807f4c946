"""Data governance: per-dataset policies, provenance, and review-before-release (issue #16).

- :mod:`.state` / :mod:`.policy`: ``open`` / ``review`` / ``dp-only`` per owner dataset.
- :mod:`.provenance`: which datasets an object derives from, and its op graph.
- :mod:`.requests`: the review queue, persisted in the owner's database.
- :mod:`.release`: :func:`decide`, the one release decision the handlers call.
- :mod:`.wire`: the messages (scientist: file/list; owner: decide, change policy).
- :mod:`.console`: the owner's web console; :mod:`.cli`: ``veil requests ...``.
- :mod:`.revocation`: revoking a user's tokens at run time (:mod:`.users_wire`, :mod:`.users_cli`: ``veil users ...``).
"""

from veil.governance import wire  # noqa: F401  (registers the governance messages on every worker)
from veil.governance import users_wire  # noqa: F401  (registers the owner's revoke/list-users message)
from veil.governance.client import request, requests
from veil.governance.policy import set_policy
from veil.governance.release import Allow, Denied, Pending, decide
from veil.governance.requests import ReleaseRequest, ReviewQueue
from veil.governance.state import POLICIES

__all__ = ["POLICIES", "Allow", "Denied", "Pending", "ReleaseRequest", "ReviewQueue", "decide", "request",
           "requests", "set_policy"]
