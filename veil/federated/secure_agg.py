"""Secure aggregation with dropout recovery: the coordinator learns only the sum.

The protocol of Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS), honest-but-curious version, with
the Shamir shares sent client to client (workers reach each other directly)
instead of encrypted through the server. Per round, with ``threshold`` t:

0. ``advertise``: each client draws an X25519 key pair and a self-mask seed
   b_u; it returns its public key.
1. ``share_keys``: the coordinator sends everyone the public keys of U1 (the
   clients that advertised). Each client Shamir-shares its private key and
   b_u (t of |U1|) and deposits one share of each with every peer. U2: the
   clients for which this stage succeeded.
2. ``masked_input``: each client of U2 returns
   ``y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} +-PRG(s_uv)`` in Z/2^64, with
   ``s_uv`` from X25519(sk_u, pk_v) (+ if u < v, - otherwise): uniformly random
   on its own. x_u is ``[w_u * update_u, w_u, w_u * mean loss_u]`` in fixed
   point, so weights and losses are aggregated the same way. U3: the clients
   whose y_u arrived.
3. ``unmask``: each client of U3 returns its shares of b_u for u in U3 and of
   sk_v for v in U2 \\ U3 (dropped after sharing). A client answers once per
   round and never for the same client in both lists, so the coordinator can
   never learn both masks of anyone. With t answers the coordinator removes
   the self-masks of U3 and the pair masks the dropped clients left behind.
   Before it, ``confirm``: every client of U3 confirms U3 once, and unmasks
   only the set it confirmed, with t of its members' tags (secagg_confirm.py).

Any t clients may die at any stage (at least t of U3 must answer); no
individual update ever leaves a client unmasked, and nothing in the recovery
path reads a client's state. Round state lives outside the object store (no
pointer reaches it) and is deleted after ``unmask`` or ``discard`` (the
coordinator discards it on every client that did not answer ``unmask``, the
round a success or not), when the session that advertised it ends, or
``ROUND_TTL_S`` after ``advertise``. A round is never resumed: a coordinator that
reconnects is a new session, the clients it reached again no longer hold the round
(answering a second session could give out a second unmask), and the round is
recovered from the others or fails saying so. Bounds on a client's work and memory: at
most ``MAX_SECAGG_CLIENTS`` clients per round (Shamir sharing costs n * t
steps per secret) and ``MAX_LIVE_ROUNDS`` live rounds per network session.

The coordinator takes a client's reply only in the protocol's form (int64
tensors of the round's shapes, bytes in range): a client answering otherwise
is left out like one that failed. A wrong but well-formed share fails the
round rather than giving a wrong sum: each reconstructed key must give the
public key its client advertised, and the recovered weight sum must equal the
survivors' weights (a wrong self-mask makes it random). Each client also
refuses a value so large that the sum of n of them could wrap Z/2^64.

Least privilege (the reference monitor's principal of each request): a round
belongs to the user who advertised it, the coordinator, and is kept under
(that user, tag). Only that user (a ``scientist`` or ``admin`` session on a
network worker) may run its later stages or discard it; only a peer worker
(or, in-process, the client worker itself) may deposit shares into it. Anyone
else is answered exactly as for a round that does not exist, and the refusal
is audited: another scientist cannot learn that a round exists, read a share,
inject one, or end someone else's round.

Security: honest-but-curious coordinator and clients, fewer than t colluding.
Against a lying coordinator, three checks of the malicious variant's kind hold
on the clients: t must be a majority of U1 (two disjoint groups of t, told
different dropouts, would hand over both masks of one client); a peer deposits
shares only under its own authenticated name (at most n senders); and each
client sends its public key with its deposit, so a masked input is refused when
the coordinator's key table names a key the client did not send (with its own
keys in the table the coordinator would know every pair mask). The consistency
round (Bonawitz et al. 2017, sec. 4.3) holds with pairwise MACs instead of
signatures (``secagg_confirm``): without it, survivor sets told differently to
each client unmasked one client's input. Each client also masks only with
survivors that shared under its own view of the round (n, t and U1, sent with
the deposit, peer to peer): told apart, they let forged tags unmask one client.
Round tags are ints in [0, 2^64). Per-client weights and the choice of
survivors remain the coordinator's.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from veil.exceptions import (ObjectNotFoundError, RemoteExecutionError, RequestDeniedError, ReviewPendingError,
                             register_remote_error)
from veil.federated import secagg_confirm, secagg_crypto as sc
from veil.federated.pooled import CLIENT_FAILURES, error_text
from veil.messaging.allowlist import ALLOWLIST, register_worker_function
from veil.messaging.messages import CommandMessage
from veil.mpc.encoding import decode, encode, make_encoding
from veil.shapes import numel
from veil.tensors import remote_ops
from veil.workers import owner_guard
from veil.workers.websocket_auth import SESSION_END_HANDLERS

ENCODING = make_encoding(24)
STAGES = ("advertise", "share_keys", "masked_input", "confirm", "unmask")
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


class SecureAggregationError(RemoteExecutionError):
    """Too few clients survived a secure-aggregation round to recover the sum."""


register_remote_error(SecureAggregationError)


# -- client side ----------------------------------------------------------------------------------

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
    return 3 * 8 * entries


def _masked_input(worker: Any, tag: int, survivors: list, state_tensors: list, weight: float,
                  losses: Optional[torch.Tensor] = None) -> torch.Tensor:
    state, survivors = _ready_to_mask(worker, tag, survivors, state_tensors, weight)
    loss = 0.0
    if isinstance(losses, torch.Tensor) and losses.numel():
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


# -- coordinator side -------------------------------------------------------------------------------

@dataclass
class ClientInput:
    """What one client contributes: pointers to its state (all on its worker), a weight, its losses."""

    location: Any
    state: list
    weight: float
    losses: Any = None  # pointer to the client's training losses, aggregated as weight * mean


@dataclass
class SecAggResult:
    survivors: list  # clients whose update is in the sum (U3)
    dropped: list
    total: list  # sum over survivors of weight * state, per state tensor
    weight_sum: float
    loss_sum: float  # sum over survivors of weight * mean loss

    def average(self) -> list:
        return [t / self.weight_sum for t in self.total]

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.weight_sum


def _call(name: str, args: tuple, location: Any) -> Any:
    return remote_ops.call(ALLOWLIST.by_name(name), args, {}, location=location)


def _fetch(result: Any) -> Any:
    if isinstance(result, (tuple, list)):
        return type(result)(r.get() for r in result)
    return result.get()


def _form(t: Any, shape: tuple, byte_values: bool = False) -> torch.Tensor:
    """``t`` if it is an int64 tensor of ``shape`` (entries 0-255 if ``byte_values``); else ValueError."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != shape \
            or (byte_values and bool(((t < 0) | (t > 255)).any())):
        raise ValueError("malformed secure-aggregation reply")
    return t


def _unmask_form(reply: Any, survivors: int, dropped: int) -> tuple:
    if not isinstance(reply, (tuple, list)) or len(reply) != 2:
        raise ValueError("malformed secure-aggregation reply")
    return (_form(reply[0], (survivors, sc.SHARE_BYTES), True), _form(reply[1], (dropped, sc.SHARE_BYTES), True))


def secure_aggregate(inputs: dict[str, ClientInput], tag: int, threshold: Optional[int] = None,
                     before_stage: Optional[Callable[[str], None]] = None, review_wait: float = 0.0,
                     round_seconds: Optional[float] = 3600.0) -> SecAggResult:
    """Runs one secure-aggregation round; clients failing at any stage are dropped.

    A client whose state derives from data under its owner's ``review`` policy
    contributes only once the owner approved that exact state (its masked input
    is a release: the coordinator learns the sum). Such a client is not dropped:
    the round waits up to ``review_wait`` seconds for the approvals, then is
    discarded and the review error raised (re-run it with the same states once
    approved).

    Args:
        inputs: worker id -> that client's contribution.
        tag: a fresh, unguessable round identifier.
        threshold: t, the clients needed to recover (default: a majority, at least 2).
        before_stage: called with each stage's name before it runs (tests kill clients there).
        review_wait: seconds to wait for owners' approvals of review-policy updates.
        round_seconds: past this many seconds from the round's start, clients not yet asked at a stage before
            ``unmask`` are left out of it like clients that failed (stalling clients hold a round no longer;
            one request still waits up to its transport's timeout). None: no limit.

    Raises:
        SecureAggregationError: fewer than t clients survived, or their shares were inconsistent (a key not its
            public key, a weight sum not the survivors'); nothing was recovered.
        ReviewPendingError, RequestDeniedError: an owner has not approved (or denied) its client's update.
    """
    sc.check_round_tag(tag)
    ids = list(inputs)
    n = len(ids)
    t = threshold if threshold is not None else max(2, n // 2 + 1)
    if not 2 <= t <= n <= MAX_SECAGG_CLIENTS:
        raise SecureAggregationError(f"secure aggregation needs 2 <= threshold <= clients <= {MAX_SECAGG_CLIENTS}, "
                                     f"got t={t}, n={n}")
    shapes = [tuple(p.shape) for p in inputs[ids[0]].state]
    length = sum(int(torch.Size(s).numel()) for s in shapes) + 2
    hook = before_stage or (lambda stage: None)
    if round_seconds is not None and not (isinstance(round_seconds, (int, float)) and 0 < round_seconds < math.inf):
        raise ValueError("round_seconds must be a positive number of seconds (or None)")
    round_end = None if round_seconds is None else time.monotonic() + round_seconds

    def stage(name: str, members: list, args_for: Callable[[str], tuple],
              form: Optional[Callable[[Any], Any]]) -> dict:
        """Each member's reply in the ``form`` the protocol expects (None: no reply); a member failing, or
        answering in another form, is left out."""
        hook(name)
        out, review, gone, late = {}, [], 0, 0
        deadline = time.monotonic() + review_wait
        for wid in members:
            if round_end is not None and name not in ("confirm", "unmask") and time.monotonic() > round_end:
                late += 1  # (confirm and unmask ask every client whose masked input came: the recovery needs them)
                continue
            while True:
                try:
                    r = _call(f"veil.secagg.{name}", args_for(wid), inputs[wid].location)
                    reply = _fetch(r) if form is not None else None
                except ReviewPendingError as e:  # the owner has not approved this update yet
                    if time.monotonic() < deadline:
                        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                        continue
                    review.append(e)
                except RequestDeniedError as e:
                    review.append(e)
                except CLIENT_FAILURES as e:
                    gone += NO_ROUND in str(e) or isinstance(e, ObjectNotFoundError)  # (a session's objects go with it)
                else:
                    try:
                        out[wid] = form(reply) if form is not None else None
                    except ValueError:
                        pass  # another shape or dtype (a hostile or mismatched client): left out like a failure
                break
        if review:  # (each client's text cut: a client's error text is its to size)
            raise type(review[0])(f"secure aggregation round {tag} needs the data owners' approval: "
                                  + "; ".join(error_text(e) for e in review))
        if len(out) < t:  # (a round is not resumed: a client ends it with the session that advertised it)
            why = (f" ({gone} clients no longer hold the round or its inputs: a client ends a round, as the "
                   "session's objects, when the coordinator's connection closes, so after a reconnect start a new "
                   "round)") if gone else ""
            why += f" ({late} not asked: the round ran past round_seconds={round_seconds:g})" if late else ""
            raise SecureAggregationError(f"secure aggregation round {tag}: {len(out)} clients finished {name}, {t} "
                                         f"needed; nothing recovered{why}")
        return out

    answers: dict = {}
    try:
        publics = stage("advertise", ids, lambda w: (tag, n, t), lambda r: sc.tensor_bytes(_form(r, (32,), True)))
        u1 = list(publics)
        table = torch.stack([sc.bytes_tensor(publics[w]) for w in u1])
        u2 = list(stage("share_keys", u1, lambda w: (tag, u1, table), None))
        masked = stage("masked_input", u2, lambda w: (tag, u2, inputs[w].state, float(inputs[w].weight),
                                                      inputs[w].losses), lambda r: _form(r, (length,)))
        u3 = list(masked)
        gone = [v for v in u2 if v not in masked]
        confirmed = stage("confirm", u3, lambda w: (tag, u3),
                          lambda r: _form(r, (len(u3), secagg_confirm.TAG_BYTES), True))
        answers = stage("unmask", u3, lambda w: (tag, u3, gone, secagg_confirm.for_client(confirmed, u3, w)),
                        lambda r: _unmask_form(r, len(u3), len(gone)))
    finally:  # every client that did not answer unmask still holds the round (its keys, seed, peers' shares)
        _discard_all({w: inputs[w] for w in ids if w not in answers}, tag)
    total = _recover(masked, answers, u1, u3, gone, publics, t, length, tag)
    flat = decode(total, ENCODING, dtype=torch.float64)
    weight_sum = float(flat[-2])
    if not math.isclose(weight_sum, sum(float(inputs[w].weight) for w in u3), rel_tol=1e-9,
                        abs_tol=len(u3) * ENCODING.resolution):  # a wrong share or a wrapped sum: never a model
        raise SecureAggregationError(f"secure aggregation round {tag}: the recovered sum is inconsistent with the "
                                     "survivors' weights; nothing recovered")
    out, offset = [], 0
    for shape, p in zip(shapes, inputs[ids[0]].state):
        k = int(torch.Size(shape).numel())
        out.append(flat[offset:offset + k].reshape(shape).to(p.dtype))
        offset += k
    return SecAggResult(u3, [w for w in ids if w not in masked], out, weight_sum, float(flat[-1]))


def _recover(masked: dict, answers: dict, u1: list, u3: list, gone: list, publics: dict, t: int, length: int,
             tag: int) -> torch.Tensor:
    """Sum of the masked inputs minus the self-masks of U3 and the pair masks left by the dropped."""
    responders = list(answers)[:t]
    x_of = {w: u1.index(w) + 1 for w in u1}

    def secret(row: int, which: int) -> bytes:
        try:
            return sc.reconstruct({x_of[r]: sc.from_tensor(answers[r][which][row:row + 1])[0] for r in responders})
        except OverflowError:  # shares of no 32-byte secret: an answer was wrong
            raise SecureAggregationError(f"secure aggregation round {tag}: the clients' shares are inconsistent; "
                                         "nothing recovered") from None

    total = torch.zeros(length, dtype=torch.int64)
    for y in masked.values():
        total = total + y
    for i, _u in enumerate(u3):
        total = total - sc.expand(secret(i, 0), length)
    for j, v in enumerate(gone):
        sk_v = secret(j, 1)
        if sc.public_of(sk_v) != publics[v]:
            raise SecureAggregationError(f"secure aggregation round {tag}: the shares of a dropped client's key "
                                         "do not give its public key; nothing recovered")
        for u in u3:
            pair = sc.expand(sc.pair_seed(sk_v, publics[u], tag), length)
            total = total - pair if u < v else total + pair  # u's mask held +pair when u < v
    return total


def _discard_all(inputs: dict, tag: int) -> None:
    for ci in inputs.values():
        try:
            _call("veil.secagg.discard", (tag,), ci.location)
        except CLIENT_FAILURES:
            pass


def secure_sum(state_pointers: dict[str, list], weights: dict[str, float], tag: int,
               threshold: Optional[int] = None) -> list[torch.Tensor]:
    """Sum over clients of weight * state, seen by the caller only as a total (see :func:`secure_aggregate`)."""
    inputs = {w: ClientInput(ptrs[0].location, ptrs, weights[w]) for w, ptrs in state_pointers.items()}
    return secure_aggregate(inputs, tag, threshold).total


def discard_round(state_pointers: dict[str, list], tag: int) -> None:
    """Drops a failed round's state on the clients that are still reachable."""
    _discard_all({w: ClientInput(p[0].location, p, 0.0) for w, p in state_pointers.items()}, tag)


__all__ = ["ClientInput", "SecAggResult", "SecureAggregationError", "STAGES", "discard_round", "secure_aggregate",
           "secure_sum"]
