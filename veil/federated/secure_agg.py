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
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from veil.exceptions import (ObjectNotFoundError, RemoteExecutionError, RequestDeniedError, ReviewPendingError,
                             register_remote_error)
from veil.federated import secagg_confirm, secagg_crypto as sc
# the client's side (its worker functions register on import); its limits, named above, are this module's too
from veil.federated.secagg_client import ENCODING, MAX_LIVE_ROUNDS, MAX_SECAGG_CLIENTS, NO_ROUND, ROUND_TTL_S
from veil.federated.pooled import CLIENT_FAILURES, error_text
from veil.messaging.allowlist import ALLOWLIST
from veil.mpc.encoding import decode
from veil.tensors import remote_ops

STAGES = ("advertise", "share_keys", "masked_input", "confirm", "unmask")


class SecureAggregationError(RemoteExecutionError):
    """Too few clients survived a secure-aggregation round to recover the sum."""


register_remote_error(SecureAggregationError)


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


__all__ = ["ClientInput", "MAX_LIVE_ROUNDS", "MAX_SECAGG_CLIENTS", "NO_ROUND", "ROUND_TTL_S", "SecAggResult",
           "SecureAggregationError", "STAGES", "discard_round", "secure_aggregate", "secure_sum"]
