"""A cluster of network workers that holds a secret-shared model.

``Cluster(NetworkWorker("localhost:4000"), NetworkWorker("localhost:4001"),
NetworkWorker("localhost:4002"), auto_managed=True)``: with ``auto_managed``,
:meth:`Cluster.start` launches the ``veil worker`` processes itself, peered
with each other, with fresh tokens. Without it, the workers are already
running and the owner passes the tokens they were started with.

Roles: unless ``crypto_provider=`` names one more worker, the **last** worker
of the cluster is the crypto provider (it deals Beaver triples and masks
straight to the others) and the others are the share-holding parties — the
three-server set-up of TF Encrypted's Pond. Security is semi-honest with no
two workers colluding.

Tokens and roles (least privilege, enforced by every worker):

* the owner's token (``scientist`` role): opens and runs services, computes on shares;
* the clients' token (``client`` role): accepted by the parties only, and there
  it may only submit queries and fetch its own results (no commands, no
  worker functions, no other serving action; the crypto provider refuses it);
  every holder of it is one principal, sharing its session slots. Clients that do
  not trust each other get a token each instead (:meth:`Cluster.issue_client_token`,
  ``save(path, client=NAME)``): principal ``client/NAME``, made from the cluster's
  client secret (``veil worker --client-issuer``), with its own few slots;
* peer tokens (``peer`` role), one per link (from worker, to worker), derived from
  the cluster's peer secret: a worker knows only the tokens of its own links, so
  a party cannot present the crypto provider's token to another party (with one
  token per worker, every party that accepts the provider held the provider's
  token); only the crypto provider is a peer of the parties, and a peer may
  only hand objects off (deal material), never read or name other objects.

The cluster file written by :meth:`Cluster.save` holds addresses and the
*client* token only, for handing to clients, and the owner of each service
(:attr:`Cluster.owner_user`, else as :attr:`Cluster.owners` records it): a client pins it
from its first query (``@OWNER/NAME``), so another user who opened the same
name first on every party gets none of its queries.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from veil.serving.errors import ServingError, WorkerUnavailableError, quoted

OWNER_USER = "model-owner"
CLIENT_USER = "client"
#: largest cluster file :meth:`Cluster.load` reads (one is a few hundred bytes, a few more per service)
MAX_FILE_BYTES = 1 << 20


@dataclass
class NetworkWorker:
    """Where one cluster worker listens: ``"host:port"`` (and optionally its id)."""

    address: str
    id: Optional[str] = None

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0] or "127.0.0.1"

    @property
    def port(self) -> int:
        port = self.address.rpartition(":")[2]
        if not port.isdigit():
            raise ValueError(f"worker address must be HOST:PORT, got {self.address!r}")
        return int(port)


#: connections one principal may hold on a cluster's worker (see worker_args): three quarters of ``veil
#: worker``'s 64, so the clients (one shared token) cannot lock the model owner out, nor the owner them
SERVING_SESSIONS_PER_PRINCIPAL = 48


class Cluster:
    """Network workers that jointly hold a model.

    Args:
        *workers: Parties first; the last one is the crypto provider unless
            ``crypto_provider`` is given.
        crypto_provider: A separate dealer worker (then every positional worker is a party).
        auto_managed: :meth:`start` launches the worker processes (loopback).
        owner_token: The model owner's token (generated when auto-managed).
        client_token: Clients' token (generated when auto-managed).
        client_secret: What per-client tokens are made from (:meth:`issue_client_token`; generated when
            auto-managed; parties started elsewhere take it as ``--client-issuer client=SECRET``).
        peer_token: Worker-to-worker token (generated when auto-managed).
        peer_openings: The parties also peer with each other and Beaver openings go party to party
            (:mod:`veil.workers.peer_openings`); :meth:`connect` enables them on its connections.
        owner_user: The user the parties know the owner's token as (``--token-user``; :meth:`start` gives it):
            the owner clients pin a service name to when :attr:`owners` does not name one. None: unknown
            (clients then need ``owner=`` or ``@OWNER/NAME``).

    Auto-managed workers run with ``--sched batch`` (:mod:`veil.workers.scheduling`): they share this
    machine's cores with the process that drives them and must not preempt it in the middle of a round.
    """

    def __init__(self, *workers: NetworkWorker, crypto_provider: Optional[NetworkWorker] = None,
                 auto_managed: bool = False, owner_token: Optional[str] = None,
                 client_token: Optional[str] = None, peer_token: Optional[str] = None,
                 peer_openings: bool = False, client_secret: Optional[str] = None,
                 owner_user: Optional[str] = OWNER_USER) -> None:
        everyone = [*workers, *([crypto_provider] if crypto_provider else [])]
        if len(everyone) < 3:
            raise ValueError("a cluster needs at least two parties and a crypto provider (three workers)")
        for i, w in enumerate(everyone):
            w.id = w.id or (f"server{i}" if w is not everyone[-1] else "crypto_provider")
        if len({w.id for w in everyone}) != len(everyone):
            raise ValueError("cluster workers need distinct ids")
        self.parties: list[NetworkWorker] = everyone[:-1]
        self.crypto_provider: NetworkWorker = everyone[-1]
        self.auto_managed = auto_managed
        new = secrets.token_urlsafe
        self.owner_token = owner_token or (new(24) if auto_managed else None)
        self.client_token = client_token or (new(24) if auto_managed else None)
        self.peer_token = peer_token or (new(24) if auto_managed else None)
        self.client_secret = client_secret or (new(32) if auto_managed else None)
        self.peer_openings = peer_openings
        if owner_user is not None and (not isinstance(owner_user, str) or not owner_user):
            raise ValueError("owner_user is a user name (a non-empty string) or None")
        self.owner_user = owner_user
        #: service name -> the user the parties answered its ``open`` as (ModelService records it; save writes it)
        self.owners: dict[str, str] = {}
        self.ping_interval = 30.0  # auto-managed workers' keepalive (seconds); clients answer pings while idle
        self._processes: list[Any] = []
        self._connections: dict[str, Any] = {}
        self.services: list[Any] = []  # ModelServices shared on this cluster (stopped by stop())

    @property
    def workers(self) -> list[NetworkWorker]:
        return [*self.parties, self.crypto_provider]

    # ------------------------------------------------------------ processes

    def peer_token_of(self, w: NetworkWorker, to: NetworkWorker) -> str:
        """The token worker ``w`` presents to peer ``to``: one per link, so the receiving worker, which must
        know it, cannot pose as ``w`` to a third worker."""
        digest = hashlib.sha256(f"veil-peer:{w.id}:{to.id}:{self.peer_token}".encode()).digest()
        return digest.hex()[:43]

    def worker_args(self, w: NetworkWorker) -> list[str]:
        """``veil worker`` arguments for ``w`` (tokens, roles, peers); used by :meth:`start`."""
        args = ["--host", w.host, f"--token={self.owner_token}", "--token-user", self.owner_user or OWNER_USER,
                f"--ping-interval={self.ping_interval}",
                # a serving worker's principals are the model owner (one connection per shared model) and its
                # clients (one shared token): a larger share of the 64 slots each than a data worker gives
                f"--max-sessions-per-principal={SERVING_SESSIONS_PER_PRINCIPAL}"]
        if self.auto_managed:  # on this machine, beside the process that drives the rounds (veil.workers.scheduling)
            args += ["--sched", "batch"]
        cp = self.crypto_provider
        if w is cp:  # deals to every party; clients and peers have nothing to do here
            for party in self.parties:
                args += ["--peer", f"{party.id}={party.address}",
                         f"--peer-token={party.id}={self.peer_token_of(cp, party)}"]
        else:  # clients submit and fetch here; only the crypto provider hands material off
            args += [f"--client={CLIENT_USER}={self.client_token}",
                     f"--accept-peer={cp.id}={self.peer_token_of(cp, w)}"]
            if self.client_secret:  # per-client tokens (issue_client_token): principal client/NAME each
                args.append(f"--client-issuer={CLIENT_USER}={self.client_secret}")
            for other in self.parties if self.peer_openings else ():  # opening shares party to party
                if other is not w:
                    args += ["--peer", f"{other.id}={other.address}",
                             f"--peer-token={other.id}={self.peer_token_of(w, other)}",
                             f"--accept-peer={other.id}={self.peer_token_of(other, w)}"]
        return args

    def start(self) -> "Cluster":
        """Launches the worker processes (auto-managed clusters only); returns self."""
        if not self.auto_managed:
            return self
        from concurrent.futures import ThreadPoolExecutor

        from veil.workers.websocket_launcher import start_worker

        # In parallel: each process spends seconds importing torch before it listens (start_worker passes
        # its arguments, tokens among them, in a private @FILE, never on the command line).
        with ThreadPoolExecutor(len(self.workers)) as pool:
            futures = [pool.submit(start_worker, w.id, self.worker_args(w), port=w.port, ready_timeout=180)
                       for w in self.workers]
        errors = []
        for f in futures:
            try:
                self._processes.append(f.result())
            except Exception as e:  # keep the ones that did start so stop() ends them
                errors.append(e)
        if errors:
            self.stop()
            raise errors[0]
        return self

    def stop(self) -> None:
        """Stops the services shared on it (waiting, bounded, for their clients' last fetches),
        closes connections and stops the processes this cluster started."""
        services, self.services = self.services, []
        for service in services:
            try:
                service.stop()
            except Exception:  # the processes still go down
                pass
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()
        for proc in self._processes:  # all signalled first: each takes a second or more to exit (its
            proc.terminate()            # connections, the interpreter's teardown), so they exit together
        for proc in self._processes:
            proc.stop()
        self._processes.clear()

    def process(self, worker_id: str) -> Any:
        """The :class:`~veil.workers.websocket_launcher.WorkerProcess` of an auto-managed worker."""
        return next(p for p in self._processes if p.id == worker_id)

    # ------------------------------------------------------------ connections

    def connect(self, hook: Any, token: str, workers: Optional[list[NetworkWorker]] = None,
                timeout: float = 120.0) -> list[Any]:
        """Client connections (``WebsocketClientWorker``) to ``workers`` (default: all)."""
        from veil.workers.websocket_client import WebsocketClientWorker

        if not token:
            raise ServingError("connecting to the cluster needs a token")
        out = []
        for w in workers if workers is not None else self.workers:
            try:
                out.append(WebsocketClientWorker(hook, id=w.id, host=w.host, port=w.port, token=token,
                                                 timeout=timeout))
            except OSError as e:
                raise WorkerUnavailableError(f"cannot reach cluster worker {w.id!r} at {w.address}: {e}") from e
        if self.peer_openings:
            from veil.tensors.mpc_glue.runtime import enable_peer_openings

            enable_peer_openings(*(c for c, w in zip(out, workers or self.workers) if w in self.parties))
        return out

    # ------------------------------------------------------------ hand-off to clients

    def issue_client_token(self, name: str) -> str:
        """A token for client ``name`` alone: principal ``client/NAME`` at the parties, allowed wherever
        the client user is, with its own session slots (the shared :attr:`client_token` is one principal for
        all its holders: one of them could hold every client slot). Issuing needs no restart; the owner
        revokes one client with ``worker.revoke("client/NAME")``.

        Raises:
            ServingError: The cluster has no client secret (not auto-managed and none given).
        """
        from veil.workers.client_tokens import issue

        if not self.client_secret:
            raise ServingError("this cluster has no client secret: pass Cluster(..., client_secret=...), the "
                               "secret its parties were started with (--client-issuer client=SECRET)")
        try:
            return issue(self.client_secret, CLIENT_USER, name)
        except ValueError as e:
            raise ServingError(str(e)) from None

    def owner_of(self, name: str) -> Optional[str]:
        """The user whose service ``name`` clients of this cluster query: as recorded, else :attr:`owner_user`."""
        return self.owners.get(name) or self.owner_user

    def describe(self, include_client_token: bool = True, client: Optional[str] = None) -> dict:
        """Addresses, service owners (and a client token) a client needs; never the owner's token nor the
        client secret. With ``client``, the token is that client's own (:meth:`issue_client_token`)."""
        # only the services whose owner is not owner_user: every client's file listed all the owner's service
        # names, which the parties tell no client (an unknown name and one it may not query answer alike)
        desc = {"parties": [[w.id, w.address] for w in self.parties],
                "crypto_provider": [self.crypto_provider.id, self.crypto_provider.address],
                "owner": self.owner_user,
                "services": {name: user for name, user in self.owners.items() if user != self.owner_user}}
        if include_client_token:
            desc["client_token"] = self.issue_client_token(client) if client is not None else self.client_token
        return desc

    def save(self, path: str | os.PathLike, client: Optional[str] = None) -> Path:
        """Writes the cluster file for clients (owner-only permissions: it holds a token): with ``client``,
        for that client alone (its own token, :meth:`issue_client_token`), else with the shared one. It names
        :attr:`owner_user`, and each shared service whose owner is another user (:attr:`owners`; save after
        ``model.share``): no other service's name."""
        path = Path(path)
        # mkstemp: a fresh name opened O_EXCL (never a planted file or symlink), mode 0o600; fchmod again in
        # case the umask or platform widened it. os.replace then swaps it in: clients never read half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.describe(client=client), indent=2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, client_token: Optional[str] = None) -> "Cluster":
        """A client's view of a cluster from :meth:`save`'s file (the token may come separately).

        Raises:
            ServingError: The file cannot be read or is not a cluster file (naming the file).
        """
        path = Path(path)
        try:
            desc = json.loads(_read_small_file(path))
            if not isinstance(desc, dict):
                raise TypeError("not a JSON object")
            pairs = [*desc["parties"], desc["crypto_provider"]]
            if not (isinstance(desc["parties"], list)
                    and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, str) for v in p) for p in pairs)):
                raise TypeError("parties and crypto_provider must be [id, \"host:port\"] pairs")
            token = client_token or desc.get("client_token")
            if token is not None and not isinstance(token, str):
                raise TypeError("client_token must be a string")
            owner = desc.get("owner", OWNER_USER)  # (a file from before owners were written: Cluster's default)
            owners = desc.get("services", {})
            if not (owner is None or (isinstance(owner, str) and owner)) or not isinstance(owners, dict) or not all(
                    isinstance(v, str) and v for v in owners.values()):
                raise TypeError("owner and each service's owner must be user names (non-empty strings)")
            parties = [NetworkWorker(addr, id=wid) for wid, addr in desc["parties"]]
            cp_id, cp_addr = desc["crypto_provider"]
            cluster = cls(*parties, crypto_provider=NetworkWorker(cp_addr, id=cp_id), client_token=token,
                          owner_user=owner)
            cluster.owners = dict(owners)
            for w in cluster.workers:
                w.port  # noqa: B018 - "HOST:PORT" checked here, not at the first connection
            return cluster
        except OSError as e:
            raise ServingError(f"cannot read cluster file {path}: {quoted(e.strerror or e)}") from e
        # JSONDecodeError is a ValueError; Cluster's own checks too; RecursionError: JSON nested past Python's depth
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # (the file's text, quoted bounded)
            raise ServingError(f"{path} is not a veil cluster file (Cluster.save): {type(e).__name__}: "
                               f"{quoted(e)}") from None


def _read_small_file(path: Path) -> str:
    """The text of ``path``, a regular file of at most :data:`MAX_FILE_BYTES`: a FIFO (whose open waits for a
    writer: O_NONBLOCK), a device (``/dev/zero`` never ends) or a huge file is refused before it is read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # (before fdopen: it refuses a directory, fd left open)
        os.close(fd)
        raise OSError("not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    return data.decode()  # (a UnicodeDecodeError is a ValueError)
