"""The client's side: share an input, collect output shares, reconstruct locally.

The client encodes its input in the service's fixed-point encoding, splits
it into one additive share per party (uniformly random ring elements that
sum to the encoded input) and submits share *i* to party *i* only. It then
polls every party for its output share; only the client ever holds all of
them, so only it learns the prediction. A missing, failed or unreachable
party makes the query raise — a partial set of shares is never decoded.
A request has at most the service's ``max_rows`` rows (the owner's setting): a larger
input is refused before anything is sent; split it into several queries.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch

from veil.exceptions import ConnectionLostError
from veil.ids import new_id
from veil.mpc.encoding import decode, encode, make_encoding
from veil.mpc.sharing import split
from veil.serving import names, protocol
from veil.serving.cluster import Cluster
from veil.serving.errors import ServingError, WorkerUnavailableError
from veil.serving.inputs import as_shape, as_tensor
from veil.serving.party_replies import checked_info, checked_share
from veil.serving.service import DEFAULT_SERVICE
from veil.workers.registry import HookContext

#: seconds between result polls: the first, and the most (growing by 1.5x)
POLL_START, POLL_MAX = 0.001, 0.02
#: where a client finds the client token when neither the cluster nor the call names one
CLIENT_TOKEN_ENV = "VEIL_CLIENT_TOKEN"
#: submitted requests whose row count a client remembers until their result (each output share is checked
#: against it: party_replies.checked_share); past it the oldest are forgotten (then checked party against party)
MAX_REMEMBERED_ROWS = 4096


class ModelClient:
    """Queries a model served on a cluster.

    Args:
        hook: A hook context for the connections (default: a private one).
        timeout: Seconds a query may wait for its result.
    """

    def __init__(self, hook: Any = None, timeout: float = 120.0) -> None:
        # Its own registry by default: the client's connections must not replace the workers an
        # owner in the same process (a notebook, a test) resolves its pointers with.
        self.hook = hook or HookContext()
        self.timeout = timeout
        self.parties: list[Any] = []
        self.service = DEFAULT_SERVICE
        self.info: dict = {}
        self._rows: dict[int, int] = {}  # request id -> rows submitted (its output shares have as many)

    def connect_to_model(self, batch_input_shape: tuple, batch_output_shape: tuple,
                         cluster: Cluster | str | os.PathLike, token: Optional[str] = None,
                         name: str = DEFAULT_SERVICE, owner: Optional[str] = None) -> "ModelClient":
        """Connects to the cluster's parties and checks the model's shapes.

        Args:
            batch_input_shape: The input shape the client will send (batch first;
                a tuple, ``torch.Size``, numpy array or R vector such as ``c(1, 28, 28, 1)``).
            batch_output_shape: The output shape it expects.
            cluster: A :class:`Cluster` or the path of a cluster file (``Cluster.save``).
            token: The client token (default: the one in the cluster / file, else
                ``$VEIL_CLIENT_TOKEN``).
            name: The service name (``@OWNER/NAME`` names its owner too).
            owner: The model owner's user (default: the one the cluster / file names for ``name``, else its
                ``owner_user``). Every query goes to that user's service ``name`` only, from the first: another
                user who opened ``name`` too (first, to catch queries) gets none.

        Raises:
            ServingError: Shapes differ from the served model's, no such service, or no owner is known.
            WorkerUnavailableError: A party cannot be reached.
        """
        batch_input_shape = as_shape(batch_input_shape, "input_shape")
        batch_output_shape = as_shape(batch_output_shape, "output_shape")
        if not isinstance(cluster, Cluster):
            if not isinstance(cluster, (str, os.PathLike)):
                raise ServingError(f"cluster must be a Cluster or a cluster file's path, not {type(cluster).__name__}")
            cluster = Cluster.load(cluster, client_token=token)  # ServingError naming a malformed file
        plain = isinstance(name, str) and not name.startswith(names.QUALIFIED)
        service = names.qualified(name, owner or (cluster.owner_of(name) if plain else None))  # before any query
        token = token or cluster.client_token or os.environ.get(CLIENT_TOKEN_ENV)
        if not token:
            raise ServingError("no client token: pass token=..., use the owner's cluster file, "
                               f"or set {CLIENT_TOKEN_ENV}")
        self.close()
        self.parties = cluster.connect(self.hook, token, cluster.parties, timeout=self.timeout)
        self.service = service  # (pinned before the first query: names.qualified)
        infos = [checked_info(w.id, self._call(w, "info"), names.owner_of(service)) for w in self.parties]
        if any(i != infos[0] for i in infos):
            raise ServingError("the cluster's parties describe the service differently")
        self.info = infos[0]
        if list(batch_input_shape[1:]) != self.info["input_shape"][1:]:
            raise ServingError(f"the model takes inputs of shape {self.info['input_shape']}, "
                               f"not {list(batch_input_shape)}")
        if list(batch_output_shape[1:]) != self.info["output_shape"][1:]:
            raise ServingError(f"the model returns outputs of shape {self.info['output_shape']}, "
                               f"not {list(batch_output_shape)}")
        if [w.id for w in self.parties] != self.info["parties"]:
            raise ServingError("the cluster file lists other parties than the service")
        self._check_rows(batch_input_shape[0])
        return self

    def _check_rows(self, rows: int) -> None:
        limit = self.info.get("max_rows")
        if limit is not None and rows > limit:
            raise ServingError(f"the model takes at most {limit} rows per query (the owner's max_rows), "
                               f"not {rows}: split the input into several queries")

    def query_model(self, x: Any) -> torch.Tensor:
        """The model's output for ``x`` (batch first); nobody else sees ``x`` or the result.

        ``x`` may be a torch tensor, a numpy array or an R array (see
        :mod:`veil.serving.inputs` for the layout).

        Raises:
            RequestFailedError: The cluster could not compute it.
            ServiceClosedError: The owner stopped serving.
            WorkerUnavailableError: A party cannot be reached.
            TimeoutError: No result within ``timeout`` seconds.
        """
        return self.result(self.submit(x))

    def submit(self, x: Any) -> int:
        """Sends the shares of ``x``; returns the request id for :meth:`result` (pipelining)."""
        if not self.parties:
            raise ServingError("call connect_to_model first")
        x = as_tensor(x)
        if x.dim() == len(self.info["input_shape"]) - 1:
            x = x.unsqueeze(0)
        if list(x.shape[1:]) != self.info["input_shape"][1:]:
            raise ServingError(f"input shape {list(x.shape)} does not fit the model's {self.info['input_shape']} "
                               f"(from R: reticulate::array_reshape(x, c({', '.join(map(str, self.info['input_shape']))})))")
        self._check_rows(x.shape[0])
        encoding = make_encoding(self.info["precision_fractional"], self.info["base"])
        shares = split(encode(x.detach().float(), encoding), len(self.parties))
        rid = new_id()
        self._call_all("submit", [[rid, share] for share in shares])  # share i to party i only, one round
        if len(self._rows) >= MAX_REMEMBERED_ROWS:
            del self._rows[next(iter(self._rows))]
        self._rows[rid] = int(x.shape[0])
        return rid

    def result(self, rid: int) -> torch.Tensor:
        """Waits for request ``rid``'s output shares and reconstructs the output.

        Each fetch waits on its party (up to ``protocol.MAX_WAIT``) until the owner responds there,
        so the result comes back as soon as it exists, without polling; parties that predate waiting
        fetches answer at once, and the loop then polls with a growing delay."""
        encoding = make_encoding(self.info["precision_fractional"], self.info["base"])
        rows = self._rows.pop(rid, None)  # (unknown for a request of another connection: parties compared only)
        got: dict[str, torch.Tensor] = {}
        deadline, delay = time.monotonic() + self.timeout, POLL_START
        while len(got) < len(self.parties):
            missing = [w for w in self.parties if w.id not in got]
            wait = max(0.0, min(protocol.MAX_WAIT, deadline - time.monotonic()))
            started = time.monotonic()
            for w, reply in zip(missing, self._call_all("fetch", [[rid, wait]] * len(missing), missing)):  # one round
                if reply:
                    got[w.id] = checked_share(w.id, reply, self.info["output_shape"], got, rows)
            if len(got) == len(self.parties):
                break
            if time.monotonic() > deadline:
                if rows is not None:  # (the caller may ask again)
                    self._rows[rid] = rows
                raise TimeoutError(f"no result within {self.timeout:.0f} s (is the model being served?)")
            if got or time.monotonic() - started >= wait / 2:
                continue  # the parties waited (or some answered): ask again at once
            time.sleep(delay)  # answered at once without a result: a party that does not wait
            delay = min(delay * 1.5, POLL_MAX)
        total = sum(got.values(), torch.zeros_like(next(iter(got.values()))))  # int64 wraps mod 2^64
        return decode(total, encoding)

    def close(self) -> None:
        for w in self.parties:
            w.close()
        self.parties = []
        self._rows.clear()  # (its requests went with the connections)

    def _call_all(self, action: str, per_party_args: list, parties: Optional[list] = None) -> list:
        """``action`` on every party (or ``parties``) at once; one reply list per party."""
        parties = self.parties if parties is None else parties
        try:
            return protocol.call_all(self.hook.local_worker, parties, action, self.service, per_party_args)
        except (ConnectionLostError, OSError) as e:
            raise WorkerUnavailableError(f"a cluster worker is unreachable: the query failed "
                                         f"and no result was produced ({e})") from e

    def _call(self, worker: Any, action: str, *args: Any) -> list:
        try:
            return protocol.call(self.hook.local_worker, worker, action, self.service, *args)
        except (ConnectionLostError, OSError) as e:
            raise WorkerUnavailableError(f"cluster worker {worker.id!r} is unreachable: the query failed "
                                         f"and no result was produced") from e
