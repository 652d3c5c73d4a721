"""The one path of the backward error modulation: an autograd Function per target, and its state.

:class:`Modulate` is what :class:`~timm_ortho.modulation.ErrorModulation`'s forward hook puts on each
target's output, in eager mode and under ``torch.compile`` alike. Forward is an identity on the output
that threads a small *token* from each target to the next. Backward, the token's gradient is the
chain's *state*: one row ``[norm, ref, log s]`` per target call (*slot*, in forward order) and a last
row that nothing writes. Each layer reads the reference norm the layer above it left in the row above
its own (the top reads 0: no reference), measures its error, applies the rule of
:mod:`timm_ortho.modulation_rule` (:func:`step`), writes its row and rescales its error. What leaves
the bottom is the record of that backward (:class:`Record`); :func:`stats` turns it into
:class:`~timm_ortho.modulation_rule.ModulationStats`.

In eager mode the backward may also run Python (:class:`EagerLink`): it passes errors through once the
hooks are removed, publishes the record at the bottom, and splices a reentrant checkpoint's recomputed
layers into the chain (:class:`Splice`). Where every output of an eager chain lives in host memory,
the state is a list of Python floats instead (:func:`_backward_host`: the same rule, the token's
gradient then only orders the layers), since reading a CPU tensor synchronizes with nothing and a
dozen 0-d tensor ops per layer would cost more than the rule. Under ``torch.compile`` none of that
exists: the backward is tensor arithmetic that AOT autograd traces and inductor fuses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .modulation_rule import (
    ModulationStats,
    Statistic,
    host_log,
    log_scale,
    log_scale_host,
    next_ref,
    next_ref_host,
)

__all__ = [
    "LOG_S",
    "NORM",
    "REF",
    "ROW",
    "Chain",
    "EagerLink",
    "Modulate",
    "Record",
    "Rule",
    "Splice",
    "stats",
    "step",
]


# The state: one row per slot (a target call, in forward order), then one row above the top that
# nothing writes, so that the top reads ref = 0 ("no reference", log 0 = -inf is invalid).
NORM, REF, LOG_S = 0, 1, 2
ROW = 3


@dataclass(frozen=True)
class Rule:
    """The rule's constants for one forward (hashable: dynamo takes them for constants of the graph)."""

    band: float
    mode: str
    max_scale: float | None
    reference: str
    statistic: str
    modulate: bool


@dataclass(eq=False)
class Chain:
    """What the Functions of one eager chain share in Python (a compiled forward has none)."""

    names: list[str]
    """One per slot, in forward order."""
    modulate: bool
    reserved: dict[str, list[int]] = field(default_factory=dict)
    """Slots kept in forward for targets a reentrant checkpoint will recompute in backward."""
    host: bool = True
    """Every output of the chain lives in host memory: its backward keeps the state in Python."""
    rows: list[float] | None = None
    """That state (laid out as the state tensor) once its backward began: Python floats."""

    def free_slot(self, name: str, filled: set[int]) -> int | None:
        return next((s for s in self.reserved.get(name, ()) if s not in filled), None)

    def keep(self, filled: set[int]) -> tuple[int, ...] | None:
        """Slots to report: all but reserved ones no recompute filled (a no_grad block, not a checkpoint)."""
        unfilled = {s for slots in self.reserved.values() for s in slots} - filled
        return tuple(i for i in range(len(self.names)) if i not in unfilled) if unfilled else None


class Splice:
    """The Python that eager Functions run in backward, shared by all chains of one ``ErrorModulation``.

    A reentrant checkpoint (``use_reentrant=True``) runs its segment under no_grad in forward and
    again, with grad, in a nested backward: after the layer above the segment and before the one
    below it. The recomputed layers form a chain of their own (its bottom's token needs no grad);
    its top (whose token nothing uses: None) continues from the state the layer above left *in
    flight*, and the first layer run after its bottom continues from the segment's state instead of
    its own token's (which skipped the segment). Backward on one device runs one layer at a time, so
    "in flight" is simply the last state an eager layer handed down.
    """

    def __init__(self, publish: Callable[[Tensor, Chain, set[int]], None]) -> None:
        self._publish = publish
        self.removed = False
        """The hooks were removed: graphs already built pass their errors through untouched."""
        self.side: object | None = None
        """The chain that target calls outside a root forward are building (the hooks' business)."""
        self.flight: Tensor | None = None
        self.spliced = False
        """``flight`` left a recomputed segment: it supersedes the next layer's own state."""
        self.filled: set[int] = set()
        """Reserved slots a recompute has written since the chain last ended."""
        self.rows: list[float] | None = None
        """``flight`` of a chain whose state is kept on the host."""

    def reset(self) -> None:
        self.side, self.flight, self.rows, self.spliced = None, None, None, False
        self.filled.clear()

    def resume(self, state: Tensor | None, splice: bool) -> Tensor | None:
        self.side = None  # a backward runs: the next call outside a root forward starts a new chain
        if self.spliced:
            self.spliced = False
            return self.flight
        return self.flight if state is None and splice else state

    def emitted(self, out: Tensor | list[float], link: EagerLink, bottom: bool, slot: int) -> None:
        """A layer handed its state down: ``out`` is the state tensor, or the rows of a chain whose
        state is kept on the host (see :func:`_backward_host`)."""
        on_host = isinstance(out, list)
        if bottom and link.chain is not None:  # the lowest layer run so far in an eager chain: publish
            self._publish(link.seed.new_tensor(out) if on_host else out, link.chain, self.filled)
        if bottom and slot == 0:  # nothing below: the chain ends
            self.reset()
        else:  # the next layer down, or a segment below still to be recomputed
            if on_host:
                self.rows = out
            else:
                self.flight = out
            self.spliced = bottom and link.splice


@dataclass(frozen=True, eq=False)
class EagerLink:
    """What an eager Function's backward may do in Python; under ``torch.compile`` it has none."""

    owner: Splice
    chain: Chain | None
    """None for a part of a compiled forward that dynamo runs eagerly (its record leaves by the sink)."""
    seed: Tensor
    """Zeros of the state's shape: the state at the top of a chain."""
    splice: bool = False
    """A layer recomputed by a reentrant checkpoint, in a nested backward of its own."""


@dataclass(frozen=True, eq=False)
class Record:
    """One published state: rows in forward order (see ``ROW``)."""

    state: Tensor
    names: list[str]
    modulated: bool
    keep: tuple[int, ...] | None = None
    counted: bool = False
    """A sink's gradient: the sum over the compiled passes that ended in one backward; the bottom's
    row holds 1 per pass in its (unused) reference column."""


class Modulate(torch.autograd.Function):
    """One target's error modulation: an identity on its output that threads the chain's token."""

    @staticmethod
    def forward(
        ctx: Any, y: Tensor, token: Tensor, slot: int, rule: Rule, bottom: bool, link: EagerLink | None
    ) -> tuple[Tensor, Tensor]:
        ctx.slot, ctx.rule, ctx.bottom, ctx.link = slot, rule, bottom, link
        ctx.set_materialize_grads(False)  # eager: the top's unused token arrives as None, not zeros
        if link is not None and link.chain is not None and not link.splice and y.device.type != "cpu":
            link.chain.host = False  # one layer on a device: the whole chain's state is a tensor
        if torch.compiler.is_compiling() or y._base is not None:
            # Compiling: a pointwise copy that inductor fuses into y's consumers. Declaring y dirty
            # instead lost the rescaling where dynamo compiled the conv as a frame of its own (after a
            # graph break) and AOT autograd then gave it a zero error (tested). A view is copied too:
            # declared dirty, autograd would rebase the history of its base.
            return y.clone(), token.view_as(token)
        # Eager: y itself, declared modified in place. Its history now ends in this Function, no
        # byte of it is copied, and an in-place activation after the conv (timm's ReLU(inplace=True))
        # may still modify it (a returned input that is not dirty would be a view, which it may not).
        ctx.mark_dirty(y)
        return y, token.view_as(token)

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, state: Tensor | None) -> tuple[Tensor | None, ...]:
        """One step of the chain for this layer; see :func:`step` for the math.

        Ops dispatched per layer (``tests/test_modulation.py::test_ops_per_hook`` counts them, eager,
        with the one ``view`` of the forward): a measuring pass (``measure_only``, schedule off) 2:
        ``vector_norm``, ``select_scatter``. A modulating pass 14 with ``reference="top"``:
        ``vector_norm``; ``log`` of the norm; ``select`` and ``log`` of the reference; ``sub``,
        ``hardshrink``/``softshrink``, ``nan_to_num`` (the rule); ``exp`` (the factor); ``abs``,
        ``lt``, ``where`` (the next reference); ``stack``, ``slice_scatter`` (the row); ``mul`` (the
        error). 15 with ``"previous"`` (+ ``mul``, the rescaled norm). ``statistic="mean"`` adds a
        ``mul``, ``max_scale`` a ``clamp``. The top runs the same ops (it reads ref = 0: ``s = 1``
        exactly). No value is read on the host. Under ``torch.compile`` inductor fuses all this. A chain
        in host memory runs :func:`_backward_host` instead: the same rule on Python floats, 3 ops
        per layer (the norm) and the multiply only where ``s != 1``.
        """
        link: EagerLink | None = ctx.link
        if link is not None:  # eager: Python runs here
            if link.owner.removed:  # removed after this forward: the error passes untouched
                return g, None, None, None, None, None
            chain = link.chain
            if chain is not None and chain.host and runs_on_host(g):
                return _backward_host(ctx, g, state, link, chain)
            state = link.owner.resume(state, link.splice)
            if state is None:
                state = link.seed
        assert state is not None  # compiled: AOT autograd materializes the top's zeros
        out, scale = step(g, state, ctx.slot, ctx.rule)
        sinked = ctx.bottom and (link is None or link.chain is None)
        if sinked:  # nobody reads the bottom's reference: it counts the passes summed in the sink
            out = out.select_scatter(out.new_ones(()), 0, ROW * ctx.slot + REF)
        if link is not None:
            link.owner.emitted(out, link, ctx.bottom, ctx.slot)
        if g is not None and scale is not None:
            # g * 1.0 is exact (also for inf, nan and -0.0): layers inside the band stay bit-identical.
            if scale.device != g.device:
                scale = scale.to(g.device, non_blocking=True)
            g = g * scale
        return g, (out if not ctx.bottom or sinked else None), None, None, None, None


def step(g: Tensor | None, state: Tensor, slot: int, rule: Rule) -> tuple[Tensor, Tensor | None]:
    """This layer's row of the state and the factor ``s`` of its error (None when only measuring).

    With ``n = ||e||`` (times ``numel ** -0.5`` for ``statistic="mean"``) and ``ref`` the norm the layer
    above left in this layer's upper row: ``log s = log_scale(log n, log ref)``, ``s = exp(log s)``,
    the next reference ``next_ref(ref, n * s or n)``, and the row ``[n, ref', log s]``. Everything is
    0-d tensor arithmetic under ``no_grad`` (the factor is a constant of the backward, also under
    ``create_graph=True``), without a branch on a value; the norm is one fused reduction in float32
    (float64 stays float64), exact under autocast, without a ``g * g`` temporary.
    """
    with torch.no_grad():
        if g is None:  # only the token reached this layer: its output does not lead to the loss
            norm = state.new_zeros(())
        else:
            norm = torch.linalg.vector_norm(g, dtype=state.dtype)
            if norm.device != state.device:  # model parallel: the chain's state stays on one device
                norm = norm.to(state.device, non_blocking=True)
            if rule.statistic == "mean":
                norm = norm * g.numel() ** -0.5  # not math.log(numel): numel may be symbolic
        at = ROW * slot
        if not rule.modulate:
            return state.select_scatter(norm, 0, at + NORM), None
        log_n = norm.log()
        ref = state[at + ROW + REF]
        log_ref = ref.log()
        log_s = log_scale(log_n, log_ref, rule.band, rule.mode, rule.max_scale)
        scale = log_s.exp()
        after = norm * scale if rule.reference == "previous" else norm
        row = torch.stack([norm, next_ref(ref, log_ref, after, log_n, rule.reference), log_s])
        return state.slice_scatter(row, 0, at, at + ROW), scale


def runs_on_host(g: Tensor | None) -> bool:
    """The error lives in host memory (or is None) and no graph is being traced: an eager chain whose
    outputs are all on the CPU then keeps its state in Python (:func:`_backward_host`)."""
    return (g is None or g.device.type == "cpu") and not torch.compiler.is_compiling()


def _backward_host(
    ctx: Any, g: Tensor | None, state: Tensor | None, link: EagerLink, chain: Chain
) -> tuple[Tensor | None, ...]:
    """:meth:`Modulate.backward` for a chain in host memory: :func:`step`'s rule on Python floats
    (:func:`~timm_ortho.modulation_rule.log_scale_host`), the state a list of them (``chain.rows``).

    Reading a CPU tensor synchronizes with no device, so the state need not travel as a tensor: the
    token's gradient only orders the layers (passed on as it came, or the zeros of ``seed``), and a
    layer reads the row above its own in the list. The top of a backward (no gradient on its token)
    starts a list of zeros, as the tensor path starts from ``seed``. A reentrant checkpoint's
    recomputed layers, and the layer just below them, continue the list in flight (:class:`Splice`).
    Per layer the only ops dispatched are the error's norm (``view``, ``dot``, one read) and its
    multiply, only where ``s != 1``; the record is one tensor, made at the bottom.
    """
    rule, slot, owner = ctx.rule, ctx.slot, link.owner
    owner.side = None  # a backward runs: the next call outside a root forward starts a new chain
    spliced, owner.spliced = owner.spliced, False  # a recomputed segment ended just above this layer
    if link.splice or spliced:
        rows = owner.rows
        if rows is None:
            rows = [0.0] * link.seed.numel()
        if not link.splice:  # below the segment: the chain goes on from the segment's rows
            chain.rows = rows
    elif state is None or chain.rows is None:
        rows = chain.rows = [0.0] * link.seed.numel()
    else:
        rows = chain.rows
    norm = 0.0
    if g is not None:  # (detached: under create_graph=True the norm is a constant too)
        norm = _host_norm(g.detach() if g.requires_grad else g, link.seed.dtype)
        if rule.statistic == "mean":
            norm *= g.numel() ** -0.5
    at = ROW * slot
    scale = 1.0
    if rule.modulate:
        ref = rows[at + ROW + REF]
        log_n, log_ref = host_log(norm), host_log(ref)
        log_s = log_scale_host(log_n, log_ref, rule.band, rule.mode, rule.max_scale)
        scale = math.exp(log_s)
        after = norm * scale if rule.reference == "previous" else norm
        rows[at : at + ROW] = norm, next_ref_host(ref, log_ref, after, log_n, rule.reference), log_s
    else:
        rows[at + NORM] = norm
    owner.emitted(rows, link, ctx.bottom, slot)
    if g is not None and scale != 1.0:  # inside the band the error is passed on untouched
        g = g * scale
    token = None if ctx.bottom else (state if state is not None else link.seed)
    return g, token, None, None, None, None


def _host_norm(g: Tensor, dtype: torch.dtype) -> float:
    if g.dtype in (torch.float32, torch.float64) and g.is_contiguous():
        flat = g.view(-1)
        squared = float(torch.dot(flat, flat))
        if math.isfinite(squared):
            return math.sqrt(squared)
    return float(torch.linalg.vector_norm(g, dtype=dtype))


def stats(record: Record, statistic: Statistic) -> ModulationStats:
    """The statistics of a record, top of the chain first, in a number of ops that does not grow with
    the depth (and without a host-device synchronization)."""
    names = record.names
    rows = record.state.view(-1, ROW)[: len(names)]
    if record.keep is not None:
        index = torch.tensor(record.keep).to(rows.device, non_blocking=True)
        rows, names = rows.index_select(0, index), [names[i] for i in record.keep]
    norm, log_s = rows[:, NORM].flip(0), rows[:, LOG_S].flip(0)
    if record.counted:  # several compiled passes ended in one backward: their mean
        passes = record.state[REF]
        norm, log_s = norm / passes, log_s / passes
    scale = log_s.exp()
    q_before = norm.square()
    return ModulationStats(
        names=names[::-1],
        q_before=q_before,
        q_after=q_before * scale.square(),
        scale=scale,
        modulated=record.modulated,
        statistic=statistic,
    )
