"""Taint fuzzer engine: random requests of every kind against a worker holding sentinel data.

The owner's worker holds private tensors and a DP-only dataset whose values are
*sentinels* (distinctive numbers). The fuzzer sends random requests: every
message type of ``MESSAGE_TYPES`` (replies excepted) and every allowlisted op and
worker function, with references to owner objects in every argument position
(positional, keyword, nested in lists / tuples / dicts), as different principals
(scientist, serving client, peer). Each reply's raw bytes are scanned for the
sentinels' bytes and their decimal renderings. A hit is a *leak* unless it came
through a sanctioned release (an allowed ``.get()``: the ``allowed`` tensor's
values are not sentinels; DP releases are noisy, so they never match exactly).

Leaks are attributed to a *hole* (see :func:`classify`) so that tests can hold
the line on holes already closed while the ones being fixed elsewhere are
tracked as expected failures. Used by tests/security/test_taint_fuzzer.py and
bench/bench_taint_fuzzer.py.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize

#: owner tensors and their sentinel values (float64/int64: 8-byte patterns that do not occur by chance)
PRIVATE_F64 = torch.tensor([86753091.0, 31415926.5, 27182818.25, 16180339.75, 14142135.5, 17320508.25],
                           dtype=torch.float64)
PRIVATE_I64 = torch.tensor([73160912345, 55512349876, 98765432101], dtype=torch.int64)
#: DP-only dataset: float32 like a CSV dataset (4-byte patterns, chosen with 7 significant digits)
DP_DATA = torch.tensor([[5550123.0, 6660457.0], [7770891.0, 8881237.0], [9990563.0, 4440789.0]],
                       dtype=torch.float32)
DP_TARGET = torch.tensor([[3330147.0], [2220369.0], [1110581.0]], dtype=torch.float32)
#: a tensor the scientist may .get(): the sanctioned release (not scanned)
ALLOWED = torch.tensor([11.5, 22.5, 33.5], dtype=torch.float64)

SECRET_TENSORS = {"private_f64": PRIVATE_F64, "private_i64": PRIVATE_I64, "dp_data": DP_DATA,
                  "dp_target": DP_TARGET}
PRINCIPALS = ("scientist", "client", "peer")
REQUEST_TYPES = sorted((t for t in m.MESSAGE_TYPES.values() if t.TYPE < 100), key=lambda t: t.TYPE)


def _sentinel_decimals() -> tuple[str, ...]:
    return tuple(str(int(v)) for t in SECRET_TENSORS.values() for v in t.reshape(-1).tolist())


_SENTINEL_DECIMALS = _sentinel_decimals()


def sentinel_patterns() -> dict[bytes, str]:
    """Byte strings whose presence in a reply means a sentinel left the worker -> owner tensor name."""
    out: dict[bytes, str] = {}
    for name, t in SECRET_TENSORS.items():
        for v in t.reshape(-1).tolist():
            out[struct.pack("<d", float(v))] = name
            if t.dtype == torch.int64:
                out[struct.pack("<q", int(v))] = name
            if t.dtype == torch.float32:
                out[struct.pack("<f", float(v))] = name
            out[str(int(v)).encode()] = name  # decimal text (error messages, reprs)
            out[f"{float(v):.4e}".encode()] = name  # torch's scientific print style
    return out


@dataclass
class Leak:
    principal: str
    request: str  # message type (and op / step name)
    tensor: str
    hole: str
    detail: str = ""


@dataclass
class FuzzReport:
    messages: int = 0
    leaks: list = field(default_factory=list)
    replies: Counter = field(default_factory=Counter)

    def by_hole(self) -> Counter:
        return Counter(leak.hole for leak in self.leaks)


class Target:
    """A worker under test: ``send(principal, request) -> reply bytes`` and the owner's view."""

    owner_ids: dict[str, int]  # owner tensor name -> id
    peer_name: str = "bob"

    def send(self, principal: str, msg: Any) -> bytes:
        return self.send_bytes(principal, serialize(msg, sender=principal))

    def send_bytes(self, principal: str, data: bytes) -> bytes:
        raise NotImplementedError

    def owner_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Generator:
    """Random requests with owner references everywhere."""

    def __init__(self, rng: random.Random, target: Target) -> None:
        self.rng, self.target = rng, target
        self.own: dict[str, list[int]] = {p: [] for p in PRINCIPALS}
        self.ops = ALLOWLIST.names()
        from veil.mpc.party import OPENABLE
        from veil.serving.protocol import ACTIONS

        self.openable, self.actions = sorted(OPENABLE), sorted(ACTIONS)

    def new_id(self) -> int:
        while True:  # an id whose decimal digits contain a sentinel's would be a false alarm in error texts
            oid = self.rng.getrandbits(63) | 1
            text = str(oid)
            if not any(d in text for d in _SENTINEL_DECIMALS):
                return oid

    def some_id(self, principal: str) -> int:
        r = self.rng.random()
        if r < 0.6 or not self.own[principal]:
            return self.rng.choice(list(self.target.owner_ids.values()))
        if r < 0.95:
            return self.rng.choice(self.own[principal])
        return self.new_id()

    def value(self, principal: str, depth: int = 0) -> Any:
        r = self.rng.random()
        if r < 0.45:
            return m.ObjectRef(self.some_id(principal))
        if r < 0.55:
            return self.rng.choice([0, 1, 2, -1, 8, 10_000, 1.0, 0.5, True, False, None])
        if r < 0.6:
            return torch.randn(self.rng.choice([(3,), (2, 3), (3, 2), (6,)]))
        if r < 0.65:
            return self.rng.choice(["scientist", "hospital", "client", "peer", "bob", "alice", "#dpset", "sum"])
        if r < 0.7:
            return slice(0, self.rng.randrange(1, 4))
        if depth >= 2:
            return m.ObjectRef(self.some_id(principal))
        n = self.rng.randrange(1, 4)
        kind = self.rng.randrange(3)
        if kind == 0:
            return [self.value(principal, depth + 1) for _ in range(n)]
        if kind == 1:
            return tuple(self.value(principal, depth + 1) for _ in range(n))
        keys = ["weight", "input", "other", "out", "running_mean", "x", "data", "value"]
        return {self.rng.choice(keys): self.value(principal, depth + 1) for _ in range(n)}

    def kwargs(self, principal: str) -> dict:
        keys = ["out", "weight", "running_mean", "running_var", "input", "other", "dim", "training", "max_norm",
                "inplace", "bias", "target", "source", "index", "src", "mask", "value", "user"]
        return {self.rng.choice(keys): self.value(principal) for _ in range(self.rng.randrange(0, 3))}

    #: ops that hand back their input's values (the shortest ways to copy owner data)
    COPYING_OPS = ("torch.clone", "Tensor.clone", "veil.copy", "Tensor.detach", "Tensor.contiguous", "torch.add",
                   "Tensor.double", "Tensor.float", "Tensor.__getitem__", "Tensor.data.__get__", "torch.flatten")

    def request(self, principal: str) -> Any:
        rng, v = self.rng, self.value
        r = rng.random()  # commands and gets are where values move: weight them up
        tp = m.CommandMessage if r < 0.35 else m.GetObjectsMessage if r < 0.5 else rng.choice(REQUEST_TYPES)
        name = tp.__name__
        if name == "CommandMessage":
            op = rng.choice(self.COPYING_OPS) if rng.random() < 0.3 else rng.choice(self.ops)
            if rng.random() < 0.5:  # well-formed: one reference (plus a scalar), so that ops succeed
                args = [m.ObjectRef(self.some_id(principal))] + ([rng.choice([0, 1, 2.0])] if rng.random() < 0.5 else [])
            else:
                args = [v(principal) for _ in range(rng.randrange(0, 5))]
            ids = rng.choice([None, [], [self.new_id()], [self.new_id(), self.new_id()]])
            if ids:
                self.own[principal].extend(ids)
            return m.CommandMessage(op, args, self.kwargs(principal), ids, rng.random() < 0.5)
        if name == "ObjectMessage":
            oid = self.new_id()
            self.own[principal].append(oid)
            return m.ObjectMessage([m.StoredObject(oid, torch.randn(3), ("#fuzz",), "", None)])
        ids = [self.some_id(principal) for _ in range(rng.randrange(1, 3))]
        if self.own[principal] and rng.random() < 0.5:
            ids = [rng.choice(self.own[principal])]
        user = rng.choice([None, "scientist", "hospital", "client", "peer"])
        if name == "GetObjectsMessage":
            return m.GetObjectsMessage(ids, rng.random() < 0.5, user)
        if name == "DeleteMessage":
            return m.DeleteMessage(ids)
        if name == "SearchMessage":
            return m.SearchMessage(rng.choice([[], ["#private"], ["#dpset"], ["#data"], ["#allowed"]]))
        if name == "MoveMessage":
            return m.MoveMessage(ids, rng.choice([self.target.peer_name, "nowhere"]),
                                 [self.new_id() for _ in ids], user)
        if name == "RemoteGetMessage":
            return m.RemoteGetMessage(ids[0])
        if name == "ListObjectsMessage":
            return m.ListObjectsMessage()
        if name == "OpenMessage":
            if rng.random() < 0.5:  # protocol steps take shares: hand them owner data
                args = tuple(m.ObjectRef(self.some_id(principal)) if rng.random() < 0.5 else 0
                             for _ in range(rng.randrange(1, 5)))
            else:
                args = tuple(v(principal) for _ in range(rng.randrange(0, 4)))
            return tp(rng.choice(self.openable), args, self.kwargs(principal) if rng.random() < 0.3 else {})
        if name == "ServingMessage":
            return tp(rng.choice(self.actions), rng.choice(["svc", "", "x" * 8]),
                      [v(principal) for _ in range(rng.randrange(0, 3))])
        if name == "AdminObjectsMessage":
            return tp(rng.choice([None, ids]))
        if name == "AdminLoadMessage":
            return tp(torch.randn(2), ["#fuzz"], "", rng.random() < 0.5, None)
        # a message type added later: every field gets a random value
        return tp(*[v(principal) for _ in m.FIELD_NAMES[tp]])


def _label(msg: Any) -> str:
    op = getattr(msg, "op", None) or getattr(msg, "name", None) or getattr(msg, "action", None)
    return f"{type(msg).__name__}({op})" if isinstance(op, str) else type(msg).__name__


def _mentions_owner_directly(msg: Any, owner_ids: set[int]) -> bool:
    from veil.tensors.tree import leaves

    fields = [getattr(msg, f) for f in m.FIELD_NAMES[type(msg)]]
    refs = {r.id for r in leaves(fields, m.ObjectRef)}
    ints = {i for i in leaves(fields, int) if type(i) is int}
    return bool((refs | ints) & owner_ids)


def classify(msg: Any, reply: Any, owner_ids: set[int], secret_ids: set[int]) -> str:
    """Which hole a leak went through (names the fix that closes it)."""
    name = type(msg).__name__
    direct = _mentions_owner_directly(msg, owner_ids)
    if name in ("OpenMessage", "RemoteGetMessage", "MoveMessage", "ServingMessage") and not direct:
        # the message names only the requester's own objects (derived from owner data): as a .get() of them
        return f"derived-reveal: a value computed from owner data left through {name} (as its .get() would)"
    if name == "OpenMessage":
        return "mpc-open: OpenMessage resolves owner ids without the owner's checks"
    if name in ("RemoteGetMessage", "MoveMessage"):
        return "peer-deputy: remote get / move act with the worker's own rights"
    if name == "ServingMessage":
        return "serving: serving actions reveal shares"
    if name == "GetObjectsMessage":
        if set(msg.ids) & secret_ids:
            return "direct-get: a private owner tensor was returned by .get()"
        return "derived-reveal: results computed from owner data are revealable by whoever created them (reveal_to)"
    if type(reply).__name__ == "ErrorReply":
        if _mentions_owner_directly(msg, owner_ids):
            return "error-text: an error on owner data quoted its values"
        return "derived-error: an error on data derived from owner data quoted its values (taint)"
    return f"other: {name}"


#: holes the resources branch closes: the fuzzer must never find these
CLOSED_HOLES = ("direct-get", "error-text")
#: not leaks under the default ``open`` dataset policy (README threat model): results a client computed
#: from owner data, and errors on them, are the client's (``review`` / ``dp-only`` data guard them)
OPEN_POLICY_RELEASES = ("derived-reveal", "derived-error")


def run_fuzz(target: Target, n_messages: int, seed: int, on_step: Callable[[int], None] | None = None,
             principals: tuple = PRINCIPALS) -> FuzzReport:
    rng = random.Random(seed)
    gen = Generator(rng, target)
    patterns = sentinel_patterns()
    scan = _scanner(patterns)
    owner_ids = set(target.owner_ids.values())
    secret_ids = {target.owner_ids[n] for n in SECRET_TENSORS}
    # the owner's object ids as refusals quote them: the worker drew them at random, and one holding a sentinel's
    # decimal text (CI at 9a9b167: "...1110581..." in dp_target's own id) is no leak of its value
    id_texts = sentinel_like_ids(owner_ids)
    report = FuzzReport()
    for i in range(n_messages):
        principal = rng.choice(principals)
        msg = gen.request(principal)
        try:
            data = serialize(msg, sender=principal)
        except Exception:
            continue  # the generator made something the wire cannot carry: not a request
        raw = target.send_bytes(principal, data)
        report.messages += 1
        try:
            reply = deserialize(raw)[0]
        except Exception:
            reply = None
        report.replies[type(reply).__name__] += 1
        hit = scan(without_ids(raw, id_texts))  # every reply, every byte: one pass over all sentinel patterns
        if hit is not None:
            hole = classify(msg, reply, owner_ids, secret_ids)
            report.leaks.append(Leak(principal, _label(msg), patterns[hit.group(0)], hole,
                                     getattr(reply, "message", "")[:200] if reply is not None else ""))
        if on_step is not None:
            on_step(i)
    return report


def sentinel_like_ids(ids: set[int]) -> list[bytes]:
    """The decimal text of those ``ids`` that holds a sentinel's decimal text."""
    return [str(i).encode() for i in ids if any(d in str(i) for d in _SENTINEL_DECIMALS)]


def without_ids(raw: Any, id_texts: list[bytes]) -> Any:
    """``raw`` with every one of ``id_texts`` blanked out (as is when there is none: the usual case)."""
    if not id_texts:
        return raw
    raw = bytes(raw)
    for text in id_texts:
        raw = raw.replace(text, b"#" * len(text))
    return raw


def _scanner(patterns: dict[bytes, str]) -> Callable[[bytes], Any]:
    """One compiled alternation of every sentinel pattern (longest first): ``scan(raw)`` -> match or None."""
    import re

    return re.compile(b"|".join(re.escape(p) for p in sorted(patterns, key=len, reverse=True)), re.DOTALL).search


def bit_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Names of owner tensors that changed (or vanished), comparing raw bytes."""
    changed = []
    for name, t in before.items():
        u = after.get(name)
        if u is None or u.dtype != t.dtype or u.shape != t.shape or \
                not torch.equal(t.contiguous().view(torch.uint8), u.contiguous().view(torch.uint8)):
            changed.append(name)
    return changed


# ------------------------------------------------------------------ targets


class VirtualTarget(Target):
    """An in-process VirtualWorker; principals are envelope senders (as in-process workers trust them)."""

    def __init__(self, hook: Any, policy: str | None = None) -> None:
        """``policy="review"``: the private tensors are under the owner's review policy, so values
        *derived* from them may not leave either (under the default ``open`` policy they may)."""
        import veil as sy

        self.worker = sy.VirtualWorker(hook, id="fuzz-alice-" + hex(random.getrandbits(24)))
        self.peer = sy.VirtualWorker(hook, id="fuzz-bob-" + hex(random.getrandbits(24)))
        self.peer_name = self.peer.id
        w = self.worker
        self.owner_ids = {
            "private_f64": w.load(PRIVATE_F64.clone(), tags=("#private",), private=True, policy=policy),
            "private_i64": w.load(PRIVATE_I64.clone(), tags=("#private",), private=True, policy=policy),
            "dp_data": w.load(DP_DATA.clone(), tags=("#dpset", "#data"), private=True),
            "dp_target": w.load(DP_TARGET.clone(), tags=("#dpset", "#target"), private=True),
            "allowed": w.load(ALLOWED.clone(), tags=("#allowed",), allowed_users=("scientist",)),
        }
        w.enable_dp(["dpset"], max_grad_norm=1.0, noise_multiplier=1.0, budgets={"scientist": (1.0, 1e-5)})

    def send_bytes(self, principal: str, data: bytes) -> bytes:
        return self.worker._recv_msg(data)

    def owner_tensors(self) -> dict[str, torch.Tensor]:
        objects = self.worker._objects
        return {name: objects[oid].detach().clone() for name, oid in self.owner_ids.items() if oid in objects}

    def serves(self) -> bool:
        reply = deserialize(self.send("someone-new", m.CommandMessage("torch.ones", [2], {}, None)))[0]
        return type(reply) is m.ResultReply


class NetworkTarget(Target):
    """A real ``veil worker`` process; principals are tokens (scientist, serving client, peer)."""

    TOKENS = {"scientist": "fuzz-scientist-token", "client": "fuzz-client-token", "peer": "fuzz-peer-token",
              "admin": "fuzz-admin-token"}

    def __init__(self, tmp_dir: Any) -> None:
        from pathlib import Path

        from veil.workers.websocket_launcher import start_worker

        csv = Path(tmp_dir) / "dpset.csv"
        rows = ["a,b,y"] + [f"{a:.1f},{b:.1f},{y:.1f}" for (a, b), (y,) in zip(DP_DATA.tolist(), DP_TARGET.tolist())]
        csv.write_text("\n".join(rows) + "\n")
        t = self.TOKENS
        self.process = start_worker("alice", [
            "--token", t["scientist"], "--user", f"client={t['client']}", "--accept-peer", f"bob={t['peer']}",
            "--admin-token", t["admin"], "--dataset", f"dpset={csv}:target=y", "--dp-clip", "1.0",
            "--dp-noise", "1.0", "--budget", "scientist=1.0,1e-5", "--max-command-seconds", "2",
        ])
        self.conns: dict[str, Any] = {}
        self.reconnects = 0
        from veil.workers.websocket_admin import AdminLoadMessage

        self.owner_ids = {}
        for name, value, allowed in (("private_f64", PRIVATE_F64, []), ("private_i64", PRIVATE_I64, []),
                                     ("allowed", ALLOWED, ["scientist"])):
            reply = deserialize(self.send("admin", AdminLoadMessage(value, ["#private" if not allowed else "#allowed"],
                                                                    "", True, allowed)))[0]
            self.owner_ids[name] = reply.objects[0]
        found = deserialize(self.send("admin", m.SearchMessage(["#dpset"])))[0].descriptors
        for d in found:
            self.owner_ids["dp_data" if "#data" in d.tags else "dp_target"] = d.id

    def _conn(self, principal: str) -> Any:
        from veil.workers.websocket_auth import handshake_headers
        from veil.workers.websocket_transport import BlockingConnection

        conn = self.conns.get(principal)
        if conn is None:
            conn = self.conns[principal] = BlockingConnection(
                f"ws://127.0.0.1:{self.process.port}", handshake_headers(self.TOKENS[principal]))
        return conn

    def send_bytes(self, principal: str, data: bytes) -> bytes:
        conn = self._conn(principal)
        try:
            conn.send(data)
            return conn.recv(60)
        except Exception:  # the server closed this connection: record it, continue on a new one
            self.reconnects += 1
            self.conns.pop(principal, None)
            try:
                conn.close()
            except Exception:
                pass
            return serialize(m.ErrorReply("ConnectionLostError", "connection closed"))

    def owner_tensors(self) -> dict[str, torch.Tensor]:
        from veil.workers.websocket_admin import AdminObjectsMessage

        names = list(self.owner_ids)
        reply = deserialize(self.send("admin", AdminObjectsMessage([self.owner_ids[n] for n in names])))[0]
        return {n: t.detach().clone() for n, t in zip(names, reply.objects)}

    def serves(self) -> bool:
        reply = deserialize(self.send("scientist", m.CommandMessage("torch.ones", [2], {}, None)))[0]
        return self.process.alive() and type(reply) is m.ResultReply

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.close()
            except Exception:
                pass
        self.process.kill()
