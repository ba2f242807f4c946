"""What an opening may reveal: the monitor's rules for protocol steps whose outputs go to the requester.

An opening returns values computed from shares. When one of those values is protected for someone
else (a serving client's input, or dealt material bound to one), each output must be hidden by a
fresh uniform dealt field of its own shape and dtype, at the positions :data:`OPENING_MASKS` names
for the step; every dealt item the opening touches binds to that protection
(:mod:`veil.workers.dealt`). :class:`OpeningRules` is a part of
:class:`veil.workers.monitor.ReferenceMonitor`.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from veil.exceptions import PermissionDeniedError
from veil.messaging import messages as m
from veil.mpc.runtime import DEALT_LAYOUTS, OPENED_LAYOUTS
from veil.workers import dealt, oblivious, output_bounds, output_pieces
from veil.workers.principals import Principal, Purpose
from veil.workers.store import Entry, Kind

#: openable step -> argument positions that must hold fresh dealer masks when the opened
#: values include a share the requester may not reveal (serving: a client's input)
OPENING_MASKS: dict[str, tuple[int, ...]] = {"beaver_mask": (2, 3), "trunc_mask": (1,), "fss_mask": (1,),
                                              # several products in one round: lists of masks a, b
                                              "beaver_masks": (2, 3),
                                              # the bitwise comparison (veil/mpc/bit_comparison.py)
                                              "cmp_mask_values": (1,), "cmp_quad_open": (1,),
                                              "cmp_quad_open_values": (1, 3), "cmp_and_open": (1, 2, 3),
                                              # a product with a constant operand (veil/mpc/fixed_operand.py)
                                              "fixed_mask": (1,)}
#: the openable steps that open a constant operand's fixed mask (``w - b``) -> the argument position of
#: ``b``: each fixed mask opens once, in such a step, and is never referenced by any other opening (so
#: ``b`` never hides a second value: ``w' - b`` and ``w - b`` would give ``w' - w``); such a step has no
#: OPENING_MASKS entry, so it never opens a value protected for someone else
FIXED_OPENINGS: dict[str, int] = {"fixed_open": 1}


class OpeningRules:
    """Openings and dealt items, for the reference monitor (which provides ``resolve_args``, ``audit``,
    ``_refuse``, ``_check_release``, ``may_reveal``, ``_may_see``, ``_local`` and ``_taints``)."""

    def resolve_opening(self, principal: Principal, name: str, args: tuple, kwargs: dict,
                        peer_round: tuple | None = None) -> tuple[tuple, dict]:
        """Arguments of an openable protocol step (its outputs go back to the requester; ``peer_round``: the
        other parties and the ids the opened values will be stored under, for a peer opening's row).

        Openings open protocol shares: every referenced object must be a share or
        dealer material, or something the requester may reveal anyway. When a
        value is protected for someone else (a serving client's input, or dealt
        material bound to one), the step's mask positions must hold fresh uniform
        dealt fields, and every dealt item the opening touches is bound to that
        protection (:mod:`veil.workers.dealt`).
        """
        found: dict[int, Entry] = {}
        raw_args, raw_kwargs = args, kwargs
        args = self.resolve_args(principal, args, Purpose.PROTOCOL_STEP, found)
        kwargs = self.resolve_args(principal, kwargs, Purpose.PROTOCOL_STEP, found)
        ids = list(found)
        self._check_public(principal, name, raw_args, raw_kwargs, found, ids)
        protecting: list = []  # reveal_to of the values protected for someone else
        dealt_entries, released = [], []
        for oid, entry in found.items():
            if entry.kind == Kind.DEALER:
                dealt_entries.append(entry)
                if entry.reveal_to is not None and not self._may_see(principal, entry.reveal_to):
                    protecting.append(entry.reveal_to)
                if entry.provenance:  # made from owner data (a dealing's correction naming it): reviewed below
                    released.append((oid, entry))
                continue
            if entry.kind == Kind.SHARE:
                if not self.may_reveal(principal, entry):
                    protecting.append(entry.reveal_to if entry.reveal_to is not None else ())
                if entry.provenance:  # any step's result is a share: trunc_local(x, 1) of a reviewed x is x
                    released.append((oid, entry))
                continue
            self._check_release(principal, entry, oid, "open")  # owner data, client objects: as a .get()
            released.append((oid, entry))
        # the owner's review, all inputs at once and no approval used up yet: open_step uses them up once the
        # step ran (one input still pending, or a refused mask or a failed step, used another's approval up).
        # Shares and dealt material deriving from owner data are reviewed as client objects are (share_own's
        # pieces, client objects with the dataset's sources, always were): a "share" a local step or a torch op
        # made of a reviewed value, or dealt material holding one, is that value (red team:
        # test_redteam_review_budget_peer.py); only `review` sources make a difference (open data passes)
        self._local.opening_released = released
        if released and self.release_hook is not None:
            self.release_hook(principal, [oid for oid, _ in released], [e for _, e in released], "open", False)
        fixed = self._check_fixed(principal, name, found, ids)
        self._local.opened_masks = None
        if protecting:
            target = dealt.strictest(protecting, None)
            self._local.opened_masks = self._check_masks(principal, name, found, ids, target)
            dealt.bind_all(dealt_entries, target)
        elif dealt_entries:  # opened unmasked: the requester may know these items; they never mask a
            dealt.bind_all(dealt_entries, None)  # protected value (bound to the taint, r stayed a "fresh" mask)
        if fixed is not None:  # marked once every check passed (a refused opening consumes nothing)
            fixed.meta["fixed_opened"] = True
            # w - b is as large as b and of its dtype, as any masked output (open_step checks): a broadcast
            # or a float w would open b itself or differences of w, and consume b (red team)
            self._local.opened_masks = [fixed.obj]
        if peer_round is None:
            self.audit("open", principal, ids, "allowed", name)
        else:  # (one row for the round: what it opens, where the opened values are kept, with whom; the count
            peers, stored = peer_round  # first: the table keeps 500 characters of the text, and every id)
            self.audit("open", principal, ids + list(stored), "allowed",
                       f"{name}: {len(stored)} opened values stored as the row's last {len(stored)} ids "
                       f"{list(stored)}, a peer round with {sorted(peers)}")
        return args, kwargs

    def _check_public(self, principal: Principal, name: str, raw_args: tuple, raw_kwargs: dict,
                      found: dict[int, Entry], ids: list) -> None:
        """An opening's step may not read a value hidden from the requester (a share it may not reveal, dealt
        material) as one of its public parameters (a shift, a level, a flag, a seed: a Python value it branches
        on), as a command's may not (:func:`veil.workers.oblivious.protocol_refusal`, the same rule and text):
        refused before anything is reviewed, consumed or run, whatever the values. (Every openable step checks
        its public parameters' types today, so a hidden value there failed alike for all values, but only after
        the masks were consumed and the opening audited as allowed; the monitor's rule keeps a new step whose
        check is looser from reading a hidden value. Red team: test_redteam_session66_openings.py.)"""
        hidden = {oid for oid, entry in found.items() if self.hides(principal, entry)}
        if not hidden:
            return
        from veil.mpc.party import PARTY_FUNCTIONS, WIRE_PREFIX

        why = oblivious.protocol_refusal(WIRE_PREFIX + name, PARTY_FUNCTIONS.get(name), raw_args,
                                         raw_kwargs if type(raw_kwargs) is dict else {}, hidden)
        if why is not None:
            raise self._refuse(PermissionDeniedError(why), "open", principal, ids)

    def _check_fixed(self, principal: Principal, name: str, found: dict[int, Entry], ids: list) -> Entry | None:
        """A fixed mask opens once, in a :data:`FIXED_OPENINGS` step at its position, and nowhere else;
        the fixed mask this opening opens (the caller marks it opened), or None."""
        fixed = [e for e in found.values() if e.kind == Kind.DEALER and e.meta and e.meta.get("fixed")]
        pos = FIXED_OPENINGS.get(name)
        if pos is None and not fixed:
            return None
        error, entry = None, None
        if pos is None:
            error = f"{name} may not open a constant operand's fixed mask (it opens once, in fixed_open)"
        else:
            raw = self._local.opening_refs or ()
            value = raw[pos] if pos < len(raw) else None
            entry = found.get(value.id) if type(value) is m.ObjectRef else None
            if entry is None or not any(entry is e for e in fixed):
                error = f"{name} opens a dealt fixed mask at argument {pos}, and only there"
            elif len(fixed) > 1:
                error = f"{name} opens one fixed mask at a time"
            elif entry.meta.get("fixed_opened"):
                error = f"{name}: this fixed mask was already opened (it may hide one value only)"
        if error is not None:
            raise self._refuse(PermissionDeniedError(error), "open", principal, ids)
        return entry

    def _check_masks(self, principal: Principal, name: str, found: dict[int, Entry], ids: list,
                     target: tuple | None) -> list:
        """The mask tensors of an opening of protected values, in order (each checked, then marked used);
        ``target``: what the opened values are protected for (a mask bound wider would let what is computed
        with its item reach others)."""
        positions = OPENING_MASKS.get(name)
        raw = self._local.opening_refs or ()
        error = None
        masks: list[Entry] = []
        seen: set[int] = set()  # id() of the masks so far (sets and counts below: a request may name
        #                         thousands of masks beside millions of refs, checked in linear time)
        if positions is None:
            error = f"{name} may not open shares protected for another party"
        else:
            for pos in positions:
                value = raw[pos] if pos < len(raw) else None
                refs = list(m.object_refs(value))
                if not refs:
                    error = f"{name} needs dealt masks at argument {pos} to open shares protected for another party"
                    break
                if any(type(v) is not m.ObjectRef for v in m.arg_leaves(value)):
                    # fss_mask([x], [0, r]) zips x with the inline 0: every mask must be a dealt field
                    error = f"{name}: argument {pos} holds a value that is not dealt material; every mask must be " \
                            "a dealt field to open shares protected for another party"
                    break
                for r in refs:
                    entry = found.get(r.id)
                    why = dealt.mask_error(entry, target)
                    if why is None and id(entry) in seen:
                        why = "appears twice in one opening"
                    if why is not None:
                        error = f"{name}: the mask at argument {pos} {why}; it cannot open shares protected for " \
                                "another party"
                        break
                    masks.append(entry)
                    seen.add(id(entry))
                if error is not None:
                    break
        if error is None:
            # a mask named anywhere else in the same opening (an operand of the step, a keyword) would hide
            # what the step also computes from it: a mask that is also the step's state or operand cancels
            # against it (found for the comparison's result bit b ^ rho with rho := the last AND mask a,
            # which b contains as a & f1 for a public f1 the requester picks; red team)
            named = Counter(id(found.get(r.id)) for r in m.object_refs((raw, self._local.opening_kwrefs)))
            for entry in masks:
                if named[id(entry)] > 1:
                    error = f"{name}: a dealt mask is also an operand of the opening; it cannot open shares " \
                            "protected for another party"
                    break
        # a derived field opened (masked or not) beside a mask it is computed from, or after one was used,
        # tells about that mask: c1 = a & b1 opened as c1 + a gives bits of b1, which hid a protected value
        # in the same opening (or an earlier one; red team: test_redteam_quad.py)
        derived = [e for e in found.values() if e.kind == Kind.DEALER and e.meta and not e.meta.get("mask")
                   and not e.meta.get("fixed")]
        if error is None and any(source.meta.get("opened") or id(source) in seen
                                 for entry in derived for source in dealt.sources_of(entry)):
            error = f"{name}: a derived dealt field opens beside or after a mask it is computed from; it cannot " \
                    "open shares protected for another party"
        if error is not None:
            raise self._refuse(PermissionDeniedError(error), "open", principal, ids)
        for entry in masks:
            entry.meta["opened"] = True
        dealt.consume(derived)  # and its sources mask nothing after it
        return [e.obj for e in masks]

    def open_step(self, principal: Principal, name: str, args: tuple, kwargs: dict,
                  run: Callable[[str, tuple, dict], list], peer_round: tuple | None = None) -> list:
        """An OpenMessage: resolves the wire-level arguments (keeping the raw refs for the mask check),
        runs the step with ``run`` and returns its outputs, each as large as its mask when masks were
        required (a broadcast mask would hide only differences). ``peer_round``: see :meth:`resolve_opening`."""
        raw = args
        # a tensor per list entry (beaver_masks, fss_mask...): counted from the request's lists before anything is
        # resolved or made, and charged (a peer round's outputs are matched with its ids once the rules passed)
        pieces = output_pieces.check_pieces(name, args, kwargs, None)
        output_pieces.check_piece_room(self, principal, name, pieces, transient=True)
        self._local.opening_refs, self._local.opening_kwrefs = args, kwargs
        try:
            args, kwargs = self.resolve_opening(principal, name, args, kwargs, peer_round)
            released = self._local.opening_released  # (set by resolve_opening: what it opens of non-shares)
        finally:
            self._local.opening_refs = self._local.opening_kwrefs = None
            self._local.opening_released = ()
        masks, self._local.opened_masks = self._local.opened_masks, None
        output_bounds.check_view_room(self, principal, name, args, kwargs, transient=True)  # (views: their size)
        layout = OPENED_LAYOUTS.get(name)
        # a packed output (OPENED_LAYOUTS: the comparison's compacted AND-level words) holds one masked
        # bit group per mask entry: its size follows from the mask's (a broadcast mask has fewer entries)
        wanted = None if masks is None else [
            (layout(j, k, tuple(raw)) if layout is not None else None) or (tuple(k.shape), k.dtype)
            for j, k in enumerate(masks)]
        # (opening_layout: a runner writing outputs early; a value derived from owner data is under the owner's
        # review and dp-only marks, which the release_hook checks again once the step ran)
        self._local.opening_wanted = (wanted, any(entry.provenance for _, entry in released))
        try:
            outputs = run(name, args, kwargs)
        finally:
            self._local.opening_wanted = None
        if masks is not None:
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in outputs]
            if len(outputs) > len(masks) or any(s != w[0] for s, w in zip(shapes, wanted)):
                raise self._refuse(PermissionDeniedError(
                    f"{name}: every output must be hidden by a mask of its own shape"), "open", principal, [])
            # a float x * 2^80 + r is x: the mask hides only what is added to it mod 2^64, in its own dtype
            # (a packed output: masked by an int64 field's bits, in the layout's dtype)
            if any(t.dtype != w[1] for t, w in zip(outputs, wanted)) or \
                    (layout is not None and any(k.dtype != torch.int64 for k in masks)):
                raise self._refuse(PermissionDeniedError(
                    f"{name}: every output must have its mask's dtype (ring elements, added mod 2^64)"), "open",
                    principal, [])
        if released and self.release_hook is not None:  # the approvals of what it opens: used up now
            self.release_hook(principal, [oid for oid, _ in released], [e for _, e in released], "open", True)
        if any(t.is_floating_point() or t.is_complex() for t in outputs):  # (ring elements are int64)
            from veil.governance.canonical import canonical_floats

            # a float leaves as a get's would: canonical NaNs and zeros (veil/governance/canonical.py)
            outputs = [canonical_floats(t) for t in outputs]
        return outputs

    def opening_layout(self) -> tuple | None:
        """Inside :meth:`open_step`'s ``run``: ``(wanted, derived)``: the (shape, dtype) each output must have
        to be released, one per mask (``wanted`` None: the opening hides nothing protected, any outputs go),
        and whether it opens values derived from owner data (the owner's review and dp-only marks are checked
        again once the step ran: an approval used up, a policy tightened meanwhile); None outside
        an opening. A runner that writes outputs where a peer can read them before the step returns (a share
        slot) does so only for outputs of exactly these layouts, and never for values derived from owner data."""
        return getattr(self._local, "opening_wanted", None)

    def group_dealt(self, principal: Principal, op_name: str, args: tuple, entries: list) -> None:
        """Groups what a dealer's worker function just stored into items (which fields are uniform)."""
        if principal.may_deal and op_name in DEALT_LAYOUTS:
            dealt.group(entries, DEALT_LAYOUTS[op_name](tuple(args)))

    def bind_dealt(self, principal: Principal, entries: list) -> None:
        """A command uses dealt material: unbound items bind to the strictest restriction of the command's
        inputs and the session's taint (what it computes can be revealed no wider)."""
        reveal_to = dealt.strictest((e.reveal_to for e in entries), self._taints.get(principal.namespace))
        dealt.bind_all(entries, reveal_to)

    def spend_dealt(self, entries: list) -> None:
        """A command that used dealt material ran: the masks it computed with, directly or through a derived
        field, mask no opening after it (:func:`dealt.consume`; a refused command spends nothing)."""
        dealt.consume(entries)
