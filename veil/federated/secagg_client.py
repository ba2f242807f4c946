"""Secure aggregation, the client's side: its round state and the worker functions the coordinator calls.

Each client (a worker holding a data owner's model update) runs the stages of :mod:`veil.federated.secure_agg`
(the protocol, its security argument and its coordinator are described there): ``advertise`` draws its round
keys, ``share_keys`` Shamir-shares them to its peers (``deposit`` on each), ``masked_input`` returns its
masked update, ``confirm`` and ``unmask`` answer the consistency check and the recovery once, ``discard`` drops
the round. Round state lives on the worker outside the object store, keyed by (coordinating user, tag), and
goes with the session that advertised it or ``ROUND_TTL_S`` after ``advertise``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from veil.exceptions import RemoteExecutionError
from veil.federated import secagg_confirm, secagg_crypto as sc
from veil.federated.pooled import CLIENT_FAILURES
from veil.messaging.allowlist import register_worker_function
from veil.messaging.messages import CommandMessage
from veil.mpc.encoding import encode, make_encoding
from veil.shapes import numel
from veil.workers import output_bounds, owner_guard
from veil.workers.websocket_auth import SESSION_END_HANDLERS

ENCODING = make_encoding(24)
#: clients of one round: each shares two secrets in n * t Shamir steps (t > n / 2), and the coordinator's
#: recovery is quadratic too; a round is run on a sample of the clients, not on all of a large pool
MAX_SECAGG_CLIENTS = 1000
#: rounds one network session may hold on a worker at once (its coordinator runs one at a time): round state
#: (keys, seeds, every peer's shares) is outside the object store and its quota
MAX_LIVE_ROUNDS = 8
#: seconds after ``advertise`` when a round nobody finished is dropped (its coordinator has gone)
ROUND_TTL_S = 3600.0
#: how a client answers for a round it does not hold (or may not show): the coordinator reads it as "gone"
NO_ROUND = "no secure-aggregation round"


@dataclass
class _Round:
    threshold: int
    n: int
    private: bytes
    public: bytes
    self_seed: bytes
    ids: list = field(default_factory=list)  # U1, in share order (x = index + 1)
    publics: dict = field(default_factory=dict)
    held: dict = field(default_factory=dict)  # peer id -> (share of its sk, share of its b)
    deposited_keys: dict = field(default_factory=dict)  # peer id -> the public key it sent with its shares
    views: dict = field(default_factory=dict)  # peer id -> the view it shared under (secagg_confirm.view_digest)
    masked_with: Optional[list] = None  # U2, once the masked input was sent
    confirmed: Optional[list] = None  # U3, sorted, once this client confirmed it (secagg_confirm)
    coordinator: str = ""  # the user who advertised the round (owns it)
    session: str = ""  # the namespace (network session) that advertised it: it ends with that session
    started: float = field(default_factory=time.monotonic)


def _rounds(worker: Any) -> dict:
    return worker.__dict__.setdefault("_secagg_rounds", {})


_COORDINATOR_ROLES = frozenset({"scientist", "admin"})


def _principal(worker: Any) -> Any:
    monitor = getattr(worker, "monitor", None)
    principal = monitor.current_principal() if monitor is not None else None
    if principal is None:
        raise RemoteExecutionError(f"worker {worker.id!r}: secure aggregation runs only inside a request")
    return principal


def _refuse(worker: Any, principal: Any, what: str, detail: str) -> RemoteExecutionError:
    """The answer for a round this principal may not touch: the same as for no round at all."""
    worker.monitor.audit("secagg", principal, [], "refused", f"{what}: {detail}")
    return RemoteExecutionError(f"{NO_ROUND} {what} on worker {worker.id!r}")


def _coordinator(worker: Any) -> str:
    """The requesting user, who must be allowed to coordinate rounds (scientist / admin, or in-process)."""
    principal = _principal(worker)
    if principal.isolated and not principal.roles & _COORDINATOR_ROLES:
        raise _refuse(worker, principal, "(any)", f"roles {sorted(principal.roles)} may not coordinate")
    return principal.user


def _round(worker: Any, tag: Any) -> _Round:
    """The requesting user's own round ``tag`` (another user's round is invisible)."""
    user = _coordinator(worker)
    state = _rounds(worker).get((user, tag)) if type(tag) is int else None
    if state is None:
        principal = _principal(worker)
        if type(tag) is int and any(key[1] == tag for key in _rounds(worker)):
            raise _refuse(worker, principal, _tag_text(tag), f"user {user!r} is not the coordinator of this round")
        raise RemoteExecutionError(f"{NO_ROUND} {_tag_text(tag)} on worker {worker.id!r}")
    return state


def _tag_text(tag: Any) -> str:
    """A round tag as errors and audit rows name it: an int, or only what it is not (a requester's tag may be any
    argument, a stored tensor too: never printed)."""
    return repr(tag) if type(tag) is int else f"(not an int: {type(tag).__name__})"


def _id_list(ids: Any, name: str) -> list:
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        raise RemoteExecutionError(f"{name} must be a list of distinct worker ids")
    return ids


def _expire(rounds: dict) -> None:
    now = time.monotonic()
    for key in [key for key, state in rounds.items() if now - state.started > ROUND_TTL_S]:
        del rounds[key]


def _advertise(worker: Any, tag: int, n: int, threshold: int) -> torch.Tensor:
    user = _coordinator(worker)
    rounds = _rounds(worker)
    _expire(rounds)
    try:
        sc.check_round_tag(tag)
    except ValueError as e:
        raise RemoteExecutionError(str(e)) from None
    if (user, tag) in rounds:
        raise RemoteExecutionError(f"secure-aggregation round {_tag_text(tag)} is not fresh on worker {worker.id!r}")
    if type(n) is not int or type(threshold) is not int or not 2 <= threshold <= n <= MAX_SECAGG_CLIENTS:
        raise RemoteExecutionError(f"need 2 <= threshold <= n <= {MAX_SECAGG_CLIENTS}, got threshold={threshold!r}, "
                                   f"n={n!r}")
    principal = _principal(worker)
    if principal.isolated and sum(state.session == principal.namespace for state in rounds.values()) \
            >= MAX_LIVE_ROUNDS:  # (in process, the caller is the worker's own process: no sessions, no quota)
        raise RemoteExecutionError(f"secure aggregation: this session already holds {MAX_LIVE_ROUNDS} live rounds "
                                   f"on worker {worker.id!r} (discard one first)")
    key = sc.new_private_key()
    public = sc.public_bytes(key)
    rounds[(user, tag)] = _Round(threshold, n, sc.private_bytes(key), public, secrets.token_bytes(32),
                                 coordinator=user, session=principal.namespace)
    return sc.bytes_tensor(public)


def _share_keys(worker: Any, tag: int, ids: list, publics: torch.Tensor) -> None:
    state = _round(worker, tag)
    ids = _id_list(ids, "ids")
    if state.ids or worker.id not in ids or not state.threshold <= len(ids) <= min(state.n, MAX_SECAGG_CLIENTS):
        raise RemoteExecutionError("share_keys: a fresh round needs this worker in at least threshold ids")
    if 2 * state.threshold <= len(ids):  # two disjoint sets of t clients would let a coordinator that tells
        # them different dropouts collect both a client's self-mask seed and its key (Bonawitz et al. 2017)
        raise RemoteExecutionError(f"share_keys: the threshold {state.threshold} must be a majority of the "
                                   f"{len(ids)} clients")
    if not isinstance(publics, torch.Tensor) or publics.shape != (len(ids), 32):
        raise RemoteExecutionError("share_keys: one 32-byte public key per id")
    state.publics = {i: sc.tensor_bytes(row) for i, row in zip(ids, publics)}
    if state.publics[worker.id] != state.public:
        raise RemoteExecutionError("share_keys: this worker's public key was not forwarded faithfully")
    state.ids = list(ids)
    view = state.views[worker.id] = secagg_confirm.view_digest(tag, state.n, state.threshold, state.ids)
    sk_shares = sc.share(state.private, len(ids), state.threshold)
    b_shares = sc.share(state.self_seed, len(ids), state.threshold)
    for peer_id, sk_s, b_s in zip(ids, sk_shares, b_shares):
        shares = (sc.to_tensor([sk_s]), sc.to_tensor([b_s]))
        if peer_id == worker.id:
            state.held[peer_id] = shares
            continue
        try:
            peer = worker.resolve_worker(peer_id)
            worker.send_msg(CommandMessage("veil.secagg.deposit", (tag, state.coordinator, worker.id, *shares,
                                                                   sc.bytes_tensor(state.public), sc.bytes_tensor(view)),
                                           {}, [], False), peer)
        except CLIENT_FAILURES:
            pass  # that peer is gone: it will lack shares and drop out at masked_input


def _deposit(worker: Any, tag: int, coordinator: str, sender: str, sk_share: torch.Tensor,
             b_share: torch.Tensor, public: Optional[torch.Tensor] = None, view: Optional[torch.Tensor] = None) -> None:
    principal = _principal(worker)
    state = _rounds(worker).get((coordinator, tag)) if type(tag) is int and isinstance(coordinator, str) else None
    if principal.isolated and not principal.is_peer:  # a scientist session: only peer workers hand over shares
        raise _refuse(worker, principal, _tag_text(tag), "deposit from a non-peer session")
    if principal.isolated and sender != principal.user:  # a peer deposits as itself only (its link proved who)
        raise _refuse(worker, principal, _tag_text(tag),
                      f"deposit by peer {principal.user!r} in the name of {sender!r}")
    if state is None:
        raise RemoteExecutionError(f"{NO_ROUND} {_tag_text(tag)} on worker {worker.id!r}")
    if not isinstance(sender, str) or sender in state.held or (state.ids and sender not in state.ids) \
            or len(state.held) >= state.n:
        raise RemoteExecutionError("deposit: unknown or repeated sender for this round")
    try:
        key = sc.tensor_bytes(public) if isinstance(public, torch.Tensor) else None
    except ValueError:
        key = None
    if key is None:
        raise RemoteExecutionError("deposit: the sender's 32-byte public key expected")
    if not all(isinstance(s, torch.Tensor) and s.shape == (1, sc.SHARE_BYTES) for s in (sk_share, b_share)):
        # one share of each secret (more rows would be held uncharged, and shift this client's unmask rows)
        raise RemoteExecutionError("deposit: one share row of each secret expected")
    sc.from_tensor(sk_share), sc.from_tensor(b_share)  # validates the format
    try:  # (none, or another, refuses masking with this sender: secagg_confirm.check_views)
        told = sc.tensor_bytes(view) if isinstance(view, torch.Tensor) else None
    except ValueError:
        told = None
    state.held[sender] = (sk_share.clone(), b_share.clone())
    state.deposited_keys[sender] = key
    state.views[sender] = told


def _mask(state: _Round, me: str, others: list, n: int, tag: int) -> torch.Tensor:
    total = sc.expand(state.self_seed, n)
    for v in others:
        pair = sc.expand(sc.pair_seed(state.private, state.publics[v], tag), n)
        total = total + pair if me < v else total - pair  # int64 wraps: Z/2^64
    return total


def _ready_to_mask(worker: Any, tag: int, survivors: list, state_tensors: Any, weight: Any,
                   losses: Any = None) -> tuple:
    """``(round state, survivor ids)`` once a masked input may run: every check of ``masked_input`` that reads no
    value of its state tensors (the owner's approval of reviewed ones is used up only after these passed)."""
    state = _round(worker, tag)
    survivors = _id_list(survivors, "survivors")
    if state.masked_with is not None or worker.id not in survivors or not set(survivors) <= set(state.ids) \
            or len(survivors) < state.threshold or not all(v in state.held for v in survivors):
        raise RemoteExecutionError("masked_input: refused (sent before, or shares missing from a survivor)")
    if type(weight) not in (int, float) or type(state_tensors) not in (list, tuple) \
            or not all(isinstance(t, torch.Tensor) for t in state_tensors):
        raise RemoteExecutionError("masked_input: state tensors and a numeric weight expected")
    if any(state.deposited_keys.get(v) != state.publics[v] for v in survivors if v != worker.id):
        # the coordinator's table must carry the keys the clients sent themselves: with its own keys in
        # the table it would know every pair mask of this client, and so its input
        raise RemoteExecutionError("masked_input: refused (a public key in the coordinator's table is not the "
                                   "one its client deposited)")
    secagg_confirm.check_views(state, worker.id, survivors)  # one view of (n, t, U1) among everyone masked with
    return state, survivors


def _masked_input_bytes(tag: Any, survivors: Any, state_tensors: Any, *args: Any, **kwargs: Any) -> int:
    """What a masked input makes, from its state's shapes: its float64 copy, the encoded values and the masked
    result, 8 bytes an entry each (a bool state of Q bytes made ~24 Q before its result met the quota)."""
    if type(state_tensors) not in (list, tuple):
        return 0
    entries = sum(numel(t.shape) for t in state_tensors if isinstance(t, torch.Tensor)) + 2
    losses = args[1] if len(args) > 1 else kwargs.get("losses")
    return 3 * 8 * entries + (8 * numel(losses.shape) if isinstance(losses, torch.Tensor) else 0)  # (losses' copy)


def _masked_input(worker: Any, tag: int, survivors: list, state_tensors: list, weight: float,
                  losses: Optional[torch.Tensor] = None) -> torch.Tensor:
    state, survivors = _ready_to_mask(worker, tag, survivors, state_tensors, weight)
    # (its float64 copies, encoding and mask: 8 bytes an entry each, three times)
    output_bounds.check_named_again(worker, "veil.secagg.masked_input", state_tensors, 3 * 8)
    loss = 0.0
    if isinstance(losses, torch.Tensor) and losses.numel():
        # (its float64 copy for the mean: an expanded view of one element was copied whole)
        output_bounds.check_named_again(worker, "veil.secagg.masked_input", [losses], 8)
        loss = float(losses.detach().to(torch.float64).mean())
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in state_tensors]) * float(weight)
    x = torch.cat([flat, torch.tensor([float(weight), float(weight) * loss], dtype=torch.float64)])
    encoded = encode(x, ENCODING)
    if bool((encoded.abs() >= (1 << 63) // len(survivors)).any()):  # n of them sum below 2^63: no wrap
        raise RemoteExecutionError(f"masked_input: refused (a weighted value is past the range a sum over "
                                   f"{len(survivors)} clients allows)")
    state.masked_with = list(survivors)
    return encoded + _mask(state, worker.id, [v for v in survivors if v != worker.id], encoded.numel(), tag)


def _confirm(worker: Any, tag: int, survivors: list) -> torch.Tensor:
    return secagg_confirm.confirm(_round(worker, tag), worker.id, tag, _id_list(survivors, "survivors"))


def _unmask(worker: Any, tag: int, survivors: list, dropped: list, confirmations: Any = None) -> tuple:
    state = _round(worker, tag)
    survivors, dropped = _id_list(survivors, "survivors"), _id_list(dropped, "dropped")
    masked = state.masked_with
    if masked is None or worker.id not in survivors or set(survivors) & set(dropped) \
            or set(survivors) | set(dropped) != set(masked) or len(survivors) < state.threshold:
        raise RemoteExecutionError("unmask: refused (inconsistent survivor and dropout sets)")
    secagg_confirm.check(state, worker.id, tag, survivors, confirmations)  # the one U3 t clients confirmed
    del _rounds(worker)[(state.coordinator, tag)]  # answered once: nothing of this round remains to be asked for
    b_rows = [state.held[u][1] for u in survivors]
    sk_rows = [state.held[v][0] for v in dropped]
    empty = torch.zeros(0, sc.SHARE_BYTES, dtype=torch.int64)
    return (torch.cat(b_rows) if b_rows else empty, torch.cat(sk_rows) if sk_rows else empty)


def _discard(worker: Any, tag: int) -> None:
    user = _coordinator(worker)
    if type(tag) is int and _rounds(worker).pop((user, tag), None) is None \
            and any(key[1] == tag for key in _rounds(worker)):
        # someone else's round: left alone, audited, answered like a missing one (discard is silent)
        worker.monitor.audit("secagg", _principal(worker), [], "refused",
                             f"discard {_tag_text(tag)}: not the coordinator")


register_worker_function("veil.secagg.advertise", _advertise)
register_worker_function("veil.secagg.share_keys", _share_keys, shapes="none")
register_worker_function("veil.secagg.deposit", _deposit, shapes="none")
register_worker_function("veil.secagg.masked_input", _masked_input)
# the coordinator recovers the sum of the masked inputs: on review-policy data each input waits for the owner
owner_guard.REVIEWED_INPUTS.add("veil.secagg.masked_input")
owner_guard.REVIEWED_INPUT_CHECKS["veil.secagg.masked_input"] = _ready_to_mask
owner_guard.REVIEWED_INPUT_BYTES["veil.secagg.masked_input"] = _masked_input_bytes
register_worker_function("veil.secagg.confirm", _confirm)
register_worker_function("veil.secagg.unmask", _unmask)
register_worker_function("veil.secagg.discard", _discard, shapes="none")


def _end_session(worker: Any, session_id: str) -> None:
    """A closed connection: the rounds it advertised go (a coordinator that reconnects runs a new round)."""
    rounds = worker.__dict__.get("_secagg_rounds")
    if rounds:
        for key in [key for key, state in rounds.items() if state.session == session_id]:
            del rounds[key]


SESSION_END_HANDLERS.append(_end_session)
