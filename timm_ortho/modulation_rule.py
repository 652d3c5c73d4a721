"""The rule of the backward error modulation (Xie, Xiong & Pu, CVPR 2017, Sec. 3.3), as pure math.

During backward, the error ``e_l = dL/dy_l`` at the output ``y_l`` of every target layer (the
parametric layers of :func:`~timm_ortho.targets.find_targets`, the classifier left out by default) is
measured by its second moment and rescaled where consecutive layers' magnitudes mismatch:

    q_l   = ||e_l||^2                      ("total", default)  or  ||e_l||^2 / numel(e_l)  ("mean")
    r_l   = q_ref / q_l                    q_ref: the rescaled moment of the layer above
                                           (reference="previous", the paper) or of the top ("top")
    s_l^2 = r_l / clamp(r_l, A^-2, A^2)    ("clamp": back onto the edge of the band)
    s_l^2 = r_l  if r_l outside [A^-2, A^2] else 1      ("match": the paper's rule, to equality)
    s_l   = clamp(s_l, 1/max_scale, max_scale)           (optional)
    e_l  <- s_l * e_l,   q_ref <- s_l^2 * q_l  (reference="previous")

The first layer to fire in a backward (the top of the chain) only sets the reference. Because the
backward pass is linear in the error once the forward pass is fixed, rescaling ``e_l`` by ``s_l``
rescales every error below it by ``s_l`` too; on a plain chain the weight gradient of layer ``l``
gets the factor ``prod_{k <= l} s_k`` (``k`` counted from the top).

The scale is computed from log-norms (``log sqrt(q)``): ``log s = softshrink(log sqrt(r), log A)``
for "clamp" (``hardshrink`` for "match"), which is branch-free and exactly 0 inside the band, so
``s = exp(0) = 1`` exactly where nothing changes. A zero, infinite or NaN moment (or reference)
gives ``log r`` = +-inf or NaN, which is mapped to ``s = 1`` exactly, and such a moment never
becomes the reference. Logs also keep the statistic from overflowing float32 (``q`` can exceed
3e38 under a large loss scale while the norm does not). Ratios of moments do not change
when the loss is multiplied by ``c`` (every error scales by ``c``, every moment by ``c^2``).

The chain's reference travels down the backward as a *norm* (:func:`next_ref`), not a log: a norm
of 0 means "no reference yet", which is what a state that nothing has written yet holds (the top of
the chain reads zeros), and its log (-inf) is invalid like any zero moment.

This module is the math alone (:func:`scale_factor`, :func:`simulate_chain` and the per-layer
pieces the autograd Function of :mod:`timm_ortho.modulation` calls in backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from .defaults import DEFAULT_MODULATION_BAND, DEFAULT_MODULATION_MODE, DEFAULT_MODULATION_REFERENCE
from .ortho import compute_dtype

__all__ = [
    "DEFAULT_BAND",
    "DEFAULT_MODE",
    "DEFAULT_REFERENCE",
    "Mode",
    "ModulationStats",
    "Reference",
    "Statistic",
    "scale_factor",
    "simulate_chain",
]

Mode = Literal["clamp", "match"]
Statistic = Literal["total", "mean"]
Reference = Literal["previous", "top"]

_MODES = ("clamp", "match")

# The rule's defaults live with the method's others (timm_ortho.defaults, with the sweep that chose them).
DEFAULT_BAND = DEFAULT_MODULATION_BAND
DEFAULT_MODE: Mode = DEFAULT_MODULATION_MODE
DEFAULT_REFERENCE: Reference = DEFAULT_MODULATION_REFERENCE
STATISTICS = ("total", "mean")
_REFERENCES = ("previous", "top")


def check_rule(band: float, mode: str, max_scale: float | None) -> None:
    """Validate the rule's options with errors that say how to fix them."""
    if isinstance(band, bool) or not isinstance(band, (int, float)) or not band >= 1.0:
        raise ValueError(
            f"band must be a number >= 1 (the quasi-isometry constant A; ratios inside "
            f"[A^-2, A^2] are left alone), got {band!r}"
        )
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if max_scale is not None and (
        isinstance(max_scale, bool) or not isinstance(max_scale, (int, float)) or not max_scale >= 1.0
    ):
        raise ValueError(
            f"max_scale must be None or a number >= 1 (scales are bounded to [1/max_scale, max_scale]), "
            f"got {max_scale!r}"
        )


def log_scale(log_n: Tensor, log_ref: Tensor, band: float, mode: str, max_scale: float | None) -> Tensor:
    """``log s`` for a layer whose error has log-*norm* ``log_n`` under the reference log-norm ``log_ref``.

    Norms, not moments: ``log s = log sqrt(r)`` and the band edge is ``log A``, which saves the
    squaring and halving (every op here is a kernel launch per layer per backward). With
    ``x = log_ref - log_n = log sqrt(r)``:

    - ``"clamp"``: ``x - clamp(x, -log A, log A)`` is ``softshrink(x, log A)``;
    - ``"match"``: ``x`` where ``|x| > log A``, else 0, is ``hardshrink(x, log A)``.

    Both return exactly 0 inside the band. A zero, infinite or NaN norm or reference makes ``x``
    +-inf or NaN, which ``nan_to_num`` maps to ``log s = 0``, i.e. ``s = exp(0) = 1`` exactly.
    """
    x = log_ref - log_n
    # softshrink/hardshrink refuse an infinite threshold: band=inf (never rescale) uses the largest float.
    edge = min(math.log(band), torch.finfo(x.dtype).max)
    log_s = F.softshrink(x, edge) if mode == "clamp" else F.hardshrink(x, edge)
    log_s = torch.nan_to_num(log_s, nan=0.0, posinf=0.0, neginf=0.0)
    if max_scale is not None:
        log_s = log_s.clamp(-math.log(max_scale), math.log(max_scale))
    return log_s


def log_scale_host(log_n: float, log_ref: float, band: float, mode: str, max_scale: float | None) -> float:
    """:func:`log_scale` on Python floats, for an error that lives in host memory.

    A CPU tensor's value is read without any device to synchronize with, so there the rule costs a
    few Python operations instead of a dozen dispatched 0-d kernels, and an error whose factor is
    exactly 1 need not be multiplied at all. The same cases as :func:`log_scale`: 0 inside the band,
    0 for a non-finite ``x = log_ref - log_n`` (a zero, infinite or NaN norm or reference).
    """
    x = log_ref - log_n
    if not math.isfinite(x):
        return 0.0
    edge = math.log(band)
    log_s = x - min(max(x, -edge), edge) if mode == "clamp" else (x if abs(x) > edge else 0.0)
    if max_scale is not None:
        bound = math.log(max_scale)
        log_s = min(max(log_s, -bound), bound)
    return log_s


def next_ref_host(ref: float, log_ref: float, after: float, log_n: float, reference: str) -> float:
    """:func:`next_ref` on Python floats (see :func:`log_scale_host`)."""
    if reference == "previous":
        return after if math.isfinite(log_n) else ref
    return ref if math.isfinite(log_ref) else after


def host_log(value: float) -> float:
    """``log`` as torch computes it: -inf at 0, NaN below 0 and for NaN, +inf at +inf."""
    if value > 0:
        return math.log(value)
    return -math.inf if value == 0 else math.nan


def check_reference(reference: str) -> None:
    if reference not in _REFERENCES:
        raise ValueError(f"reference must be one of {_REFERENCES}, got {reference!r}")


def _finite(log_n: Tensor) -> Tensor:
    """``isfinite(log_n)`` as ``|log_n| < inf`` (False for +-inf and NaN).

    Two kernels: ``torch.isfinite`` is a composite that dispatches four (abs, ne, eq, mul), and this
    runs once per layer per backward.
    """
    return log_n.abs() < math.inf


def next_ref(ref: Tensor, log_ref: Tensor, after: Tensor, log_n: Tensor, reference: str) -> Tensor:
    """The reference *norm* for the next layer down, from this layer's norm ``n`` (``log_n``).

    ``"previous"`` (the paper's consecutive rule): ``after = n * s``, this layer's rescaled norm,
    while ``n`` is valid, else the reference ``ref`` is kept. ``"top"``: ``after = n``; the first
    valid norm of the chain is kept, so ``ref`` while ``log_ref`` is valid, else ``n``. Either way a
    zero or non-finite norm never becomes the reference (its log is +-inf or NaN), and a reference of
    0 stands for "none yet" (``log 0 = -inf``, invalid). In logs this is
    ``log ref' = log n + log s`` (``"previous"``); ``log s`` is always finite, so ``log n`` decides.
    Norms instead of logs save the ``exp`` that would turn the log back into what the next layer
    reads (three kernels here, once per layer per backward).
    """
    if reference == "previous":
        return torch.where(_finite(log_n), after, ref)
    return torch.where(_finite(log_ref), ref, after)


def _as_float(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t.to(compute_dtype(t.dtype))


def scale_factor(
    q: Tensor | float,
    ref: Tensor | float,
    band: float = DEFAULT_BAND,
    mode: Mode = DEFAULT_MODE,
    max_scale: float | None = None,
) -> Tensor:
    """The factor ``s`` that rescales an error of second moment ``q`` under reference moment ``ref``.

    With ``r = ref / q`` and ``A = band``:

    - ``A^-2 <= r <= A^2``: ``s = 1`` exactly;
    - outside, ``"clamp"``: ``s^2 = r / clamp(r, A^-2, A^2)`` (the ratio lands on the band's edge),
      ``"match"``: ``s^2 = r`` (the moments become equal);
    - ``max_scale``: ``s`` is then bounded to ``[1/max_scale, max_scale]``;
    - ``q`` or ``ref`` zero, negative, infinite or NaN: ``s = 1`` exactly.

    Elementwise over broadcastable ``q`` and ``ref``; computed in float32 (float64 inputs stay
    float64), no host-device synchronization.
    """
    check_rule(band, mode, max_scale)
    q, ref = _as_float(q), _as_float(ref)
    dtype = torch.promote_types(q.dtype, ref.dtype)
    log_s = log_scale(0.5 * q.to(dtype).log(), 0.5 * ref.to(dtype).log(), band, mode, max_scale)
    return log_s.exp()


def simulate_chain(
    q_unmodulated: Tensor,
    band: float = DEFAULT_BAND,
    mode: Mode = DEFAULT_MODE,
    max_scale: float | None = None,
    reference: Reference = DEFAULT_REFERENCE,
) -> tuple[Tensor, Tensor]:
    """What the modulation does on a chain whose *unmodulated* error moments are ``q_unmodulated``.

    ``q_unmodulated[..., l]`` is the second moment at layer ``l`` (``0`` = top, the first to fire in
    backward) that the backward pass would give without any modulation. Rescaling layer ``k``'s
    error by ``s_k`` rescales every error below it, so layer ``l`` receives the moment
    ``q_l * prod_{k<l} s_k^2``; its own factor ``s_l`` follows from :func:`scale_factor` against the
    reference, the rescaled moment of the nearest valid layer above (none for the top layer, which
    therefore keeps ``s = 1``). Zero and non-finite moments get ``s = 1`` and never become the
    reference.

    With ``reference="top"`` the reference stays the moment of the first valid layer instead.

    Returns ``(scales, q_after)`` of the shape of ``q_unmodulated`` (leading dimensions are
    independent chains): ``q_after[..., l] = q_l * prod_{k<=l} s_k^2``, the moment that reaches
    layer ``l``'s weight after its own rescaling.
    """
    check_rule(band, mode, max_scale)
    check_reference(reference)
    q = _as_float(q_unmodulated)
    if q.dim() == 0:
        raise ValueError("q_unmodulated must have a last dimension indexing the layers, got a 0-d tensor")
    log_n = 0.5 * q.log()  # log-norms, as in backward
    ref = torch.zeros_like(log_n[..., 0])  # the reference norm; 0: none yet (the top)
    log_cum = torch.zeros_like(ref)  # log prod_{k<l} s_k: what the layers above did
    scales, q_after = [], []
    for layer in range(q.shape[-1]):
        log_arrived = log_n[..., layer] + log_cum
        log_ref = ref.log()
        log_s = log_scale(log_arrived, log_ref, band, mode, max_scale)
        log_after = log_arrived + log_s
        after = (log_after if reference == "previous" else log_arrived).exp()
        ref = next_ref(ref, log_ref, after, log_arrived, reference)
        log_cum = log_cum + log_s
        scales.append(log_s.exp())
        q_after.append((2.0 * log_after).exp())
    return torch.stack(scales, dim=-1), torch.stack(q_after, dim=-1)


# -- statistics ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ModulationStats:
    """Statistics of one backward through the chain, top of the chain first.

    All tensors are 1-D, on the device where the errors were, float32 (float64 when the errors
    were float64), and built without a host-device synchronization.
    """

    names: list[str]
    """Target module names in firing order (the top of the chain first)."""
    q_before: Tensor
    """Second moment of the error as it reached each layer (after the rescaling of the layers
    above), before the layer's own rescaling."""
    q_after: Tensor
    """Second moment after the layer's own rescaling, ``q_before * scale^2``: the error the layer's
    weight gradient is computed from."""
    scale: Tensor
    """The factor ``s`` each layer's error was multiplied by (exactly 1 where nothing changed)."""
    modulated: bool = True
    """False when the error was only measured (``measure_only`` or schedule off): ``scale`` is 1."""
    statistic: Statistic = "total"

    def __len__(self) -> int:
        return len(self.names)

    def cumulative_scale(self) -> Tensor:
        """``prod_{k<=l} s_k``: on a plain chain, the factor layer ``l``'s weight gradient received."""
        return torch.cumprod(self.scale, dim=0)

    def unmodulated(self) -> Tensor:
        """``q_before / prod_{k<l} s_k^2``: the moments the same forward pass gives without modulation.

        Exact on a plain chain (backward is linear in the error). With shortcuts an error is a sum of
        paths that were rescaled differently, so this is only the view along the firing order.
        """
        log_s2 = 2.0 * self.scale.log()
        log_above = torch.cumsum(log_s2, dim=0) - log_s2
        return (self.q_before.log() - log_above).exp()

    def bottom_top_ratio(self, which: Literal["after", "before", "unmodulated"] = "after") -> Tensor:
        """The paper's Fig. 3 quantity: second moment at the bottom layer over the top layer (0-d).

        ``which="after"`` (default) uses :attr:`q_after`, the moments the bottom and top weight
        gradients are actually computed from (the same as ``"before"`` at the top, whose scale is 1).
        ``"unmodulated"`` gives the ratio the same forward pass has without modulation. With
        modulation off, all three agree.
        """
        q = self.moments(which)
        if q.numel() == 0:
            raise ValueError("no layer fired in this backward: the chain is empty")
        return q[-1] / q[0]

    def log10_moments(self, which: Literal["after", "before", "unmodulated"] = "after") -> Tensor:
        """``log10`` of the per-layer moments, convenient for plots and tables."""
        return self.moments(which).log10()

    def moments(self, which: Literal["after", "before", "unmodulated"] = "after") -> Tensor:
        """Per-layer moments: ``"after"`` (:attr:`q_after`), ``"before"`` (:attr:`q_before`) or
        ``"unmodulated"`` (:meth:`unmodulated`)."""
        if which == "after":
            return self.q_after
        if which == "before":
            return self.q_before
        if which == "unmodulated":
            return self.unmodulated()
        raise ValueError(f"which must be 'after', 'before' or 'unmodulated', got {which!r}")

    def as_dict(self) -> dict[str, float]:
        """Scalars for a logger. This *does* synchronize with the device: call it when logging."""
        scale = self.scale.double()
        values = {
            "bottom_top_ratio": self.bottom_top_ratio("after"),
            "bottom_top_ratio_unmodulated": self.bottom_top_ratio("unmodulated"),
            "max_abs_log2_scale": scale.log2().abs().max(),
            "layers_rescaled": (scale != 1).sum().to(scale.dtype),
            "total_scale": scale.prod(),
        }
        return {k: float(v) for k, v in values.items()}
