"""The modulation's traced path: the per-layer rule as an autograd identity that dynamo compiles.

Under ``torch.compile`` the eager hooks of :mod:`timm_ortho.modulation` (a tensor hook registered on
each target's output, Python-side chain state) would break the graph. :class:`TracedModulation`
carries the chain's state with the gradients instead; :class:`TracedRecord` is what one compiled
backward leaves. The rule itself is :mod:`timm_ortho.modulation_rule`'s, as in eager mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .modulation_rule import log_scale, next_log_ref

__all__ = ["HAS_REF", "HEAD", "REF", "Rule", "TracedModulation", "TracedRecord"]


@dataclass(frozen=True, eq=False)
class TracedRecord:
    """What a compiled backward left in the token sink (see :class:`TracedModulation`)."""

    record: Tensor
    names: list[str]
    """Module names in forward order (slot order)."""
    modulated: bool


# Layout of the chain token's gradient (and of the sink's record): the reference log-norm, a flag
# "a layer above has fired", then one log-norm per slot, then one log-scale per slot.
REF, HAS_REF, HEAD = 0, 1, 2


@dataclass(frozen=True)
class Rule:
    """The constants of the rule, passed to the traced identity (hashable, so dynamo treats them as
    constants of the graph)."""

    band: float
    mode: str
    max_scale: float | None
    reference: str
    statistic: str
    modulate: bool
    slots: int


class TracedModulation(torch.autograd.Function):
    """The per-layer hook as an autograd identity that dynamo traces into the compiled graph.

    Under ``torch.compile`` a tensor hook on an intermediate output and the Python-side chain state
    of the eager path both break the graph. Here the state travels with the gradients instead:
    every target's forward threads a small *token* through the layers, ``(y, t_in) -> (y, t_out)``.
    In backward, the gradient that reaches ``t_out`` from the layer above carries the chain's state,
    ``[log_ref, has_ref, log_n per slot, log_s per slot]``; this layer measures its error, applies
    the same rule as the eager hook (:func:`log_scale`, :func:`next_log_ref`), rescales the
    error and passes the state down as the gradient of ``t_in``. The top of the chain gets a zero
    gradient (``has_ref = 0``: no reference, ``s = 1``). Below the bottom layer the token is the
    module's *sink*, a leaf whose gradient is the whole record of the backward; a
    post-accumulate-grad hook publishes it. Everything in backward is tensor arithmetic without
    branches on values, so inductor fuses it.

    The token also orders the hooks: layer ``l``'s backward needs the token gradient of the layer
    above it in forward order, as the eager hooks' firing order is on one device.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, token: Tensor, slot: int, rule: Rule) -> tuple[Tensor, Tensor]:
        ctx.slot, ctx.rule = slot, rule
        # A copy, which inductor fuses into the consumers of y. Returning y itself would make it a
        # view, which the in-place activation that often follows a conv (ReLU(inplace=True))
        # refuses to modify; declaring y dirty (ctx.mark_dirty) avoids that but, when dynamo
        # compiles the conv as a frame of its own (after a graph break), its backward then
        # received a zero error and its rescaling was lost (tested).
        return y.clone(), token.view_as(token)

    @staticmethod
    def backward(ctx: Any, g: Tensor, state: Tensor) -> tuple[Tensor, Tensor, None, None]:
        rule, slot = ctx.rule, ctx.slot
        with torch.no_grad():  # the factor is a constant of the backward, also under create_graph
            norm = torch.linalg.vector_norm(g, dtype=state.dtype)
            if rule.statistic == "mean":
                # numel ** -0.5, not math.log(numel): with dynamic shapes numel is symbolic.
                norm = norm * g.numel() ** -0.5
            log_n = norm.log()
            out = state.clone()
            out[HEAD + slot] = log_n
            if rule.modulate:
                log_ref = torch.where(state[HAS_REF] > 0, state[REF], math.nan)
                log_s = log_scale(log_n, log_ref, rule.band, rule.mode, rule.max_scale)
                after = log_n + log_s if rule.reference == "previous" else log_n
                out[REF] = next_log_ref(after, log_ref, rule.reference)
                out[HAS_REF] = 1.0
                out[HEAD + rule.slots + slot] = log_s
                scale = log_s.exp()
        if rule.modulate:
            g = g * scale
        return g, out, None, None
