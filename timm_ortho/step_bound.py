"""The step bound: a layer-wise limit on the gradient relative to the weight, as a piece of its own.

For every weight ``W_l`` with gradient ``g_l``,

    g_l <- g_l * min(1, ratio_l * max(||W_l||_F, floor) / ||g_l||_F)

so that ``||g_l|| <= ratio_l * ||W_l||``: a layer-wise adaptive gradient clip. It bounds the relative
change of each filter bank per step, which is what matters for a weight followed by BatchNorm (the
forward pass does not see its scale), and it keeps the cubic orthonormality gradient in check when a
weight's scale has grown. The ``floor`` (``MIN_WEIGHT_NORM``) lets a zero-initialized weight move.

:class:`~timm_ortho.OrthoModulated` applies it inside ``step()`` (``max_grad_ratio``), after the
orthonormality term; :func:`bound_gradients_` does the same for any list of weights, with any
optimizer (call it after ``backward`` and, under a ``GradScaler``, after ``unscale_``), and
:func:`auto_max_grad_ratio` is the wrapper's ``"auto"`` choice for a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .chain import check_plain_chain
from .defaults import MIN_WEIGHT_NORM, max_grad_ratio_for

__all__ = ["auto_max_grad_ratio", "bound_factors", "bound_gradients_"]


@torch.no_grad()
def bound_factors(
    weights: Sequence[Tensor], ratio: float | Sequence[float], grads: Sequence[Tensor] | None = None
) -> Tensor:
    """The factor ``min(1, ratio_l * max(||W_l||, floor) / ||g_l||)`` of each weight, as one vector
    (``grads`` default to ``weights[l].grad``): what :func:`bound_gradients_` multiplies the
    gradients by, also for measuring how often the bound binds.

    Two foreach norms and one vector expression for all weights: no host-device synchronization,
    whatever their number. A zero gradient gets factor 1; a non-finite one a non-finite or zero
    factor. Norms are accumulated in float32 (float64 for float64 weights): a half-precision
    gradient's norm can overflow its own dtype.
    """
    if grads is None:
        grads = [w.grad for w in weights]
    if len(grads) != len(weights) or any(g is None for g in grads):
        raise ValueError("the step bound needs one gradient per weight (a weight without .grad was given)")
    ratios = [ratio] * len(weights) if isinstance(ratio, (int, float)) else list(ratio)
    if len(ratios) != len(weights):
        raise ValueError(f"{len(ratios)} ratios for {len(weights)} weights")
    if not weights:
        return torch.ones(0)
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    g_norm = torch.stack(torch._foreach_norm(list(grads), dtype=dtype))
    w_norm = torch.stack(torch._foreach_norm(list(weights), dtype=dtype)).clamp_min(MIN_WEIGHT_NORM)
    if len(set(ratios)) == 1:  # the common case: a Python scalar, no host-to-device copy
        allowed = w_norm * ratios[0]
    else:
        allowed = torch.tensor(ratios, dtype=dtype).to(g_norm.device, non_blocking=True) * w_norm
    # A zero gradient divides into inf or a huge number, clamped to 1: left exactly as it is.
    return (allowed / g_norm.clamp_min(torch.finfo(dtype).tiny)).clamp(max=1.0)


@torch.no_grad()
def bound_gradients_(
    weights: Sequence[Tensor], ratio: float | Sequence[float], grads: Sequence[Tensor] | None = None
) -> None:
    """Scale each ``grads[l]`` (default: ``weights[l].grad``) in place to ``||g_l|| <= ratio_l ||W_l||``,
    by :func:`bound_factors`. A non-finite gradient stays non-finite (a ``GradScaler`` never lets
    such a step through)."""
    if grads is None:
        grads = [w.grad for w in weights]
    factor = bound_factors(weights, ratio, grads)
    if not weights:
        return
    torch._foreach_mul_(list(grads), [f.to(g.dtype) for f, g in zip(factor.unbind(), grads, strict=True)])


def auto_max_grad_ratio(model: nn.Module, num_layers: int) -> float | None:
    """``max_grad_ratio="auto"`` for ``model`` with ``num_layers`` bounded layers: ``min(0.01, 1/L)``
    on a plain chain (:func:`~timm_ortho.chain.check_plain_chain`), ``None`` (no bound) otherwise."""
    return max_grad_ratio_for(num_layers) if check_plain_chain(model).plain else None
