"""The step bound: a layer-wise limit on the gradient relative to the weight, as a piece of its own.

For every weight ``W_l`` with gradient ``g_l``,

    g_l <- g_l * min(1, ratio_l * max(||W_l||_F, floor) / ||g_l||_F)

so that ``||g_l|| <= ratio_l * ||W_l||``: a layer-wise adaptive gradient clip. It bounds the relative
change of each filter bank per step, which is what matters for a weight followed by BatchNorm (the
forward pass does not see its scale), and it keeps the cubic orthonormality gradient in check when a
weight's scale has grown. The ``floor`` (``MIN_WEIGHT_NORM``) lets a zero-initialized weight move.

The norm held to the bound may instead be that of a running average of the gradients
(``reference``; :class:`~timm_ortho.OrthoModulated`'s ``bound_momentum``):

    a_l <- beta * a_l + (1 - beta) * g_l   (a_l = g_l at the first step)
    g_l <- g_l * min(1, ratio_l * max(||W_l||_F, floor) / ||a_l||_F)

A small batch's gradient carries sampling noise whose norm adds to the signal's; averaging over about
``1 / (1 - beta)`` steps removes most of it (by ``sqrt((1 - beta) / (1 + beta))`` for independent
noise), so the bound then limits the consistent part of the step, as the momentum update averages it.
Or the bound may hold the step rather than the gradient (``bound_reference_lr``, :func:`group_ratio`):
``lr * ||g_l|| <= lr_ref * ratio_l * ||W_l||`` at the group's current ``lr``, looser below ``lr_ref``.
Both are off by default. On ``plain_cnn110`` the average is about a quarter of one gradient's norm
from the first step on, so the averaged bound is about four times looser throughout: it helps at a
small lr and batch and fails at lr 0.1, where the default trains (docs/results.md, "Any timm model").

:class:`~timm_ortho.OrthoModulated` applies it inside ``step()`` (``max_grad_ratio``), after the
orthonormality term; :func:`bound_gradients_` does the same for any list of weights, with any
optimizer (call it after ``backward`` and, under a ``GradScaler``, after ``unscale_``), and
:func:`auto_max_grad_ratio` is the wrapper's ``"auto"`` choice for a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .chain import check_plain_chain
from .defaults import MIN_WEIGHT_NORM, max_grad_ratio_for

__all__ = ["GradientAverages", "auto_max_grad_ratio", "bound_factors", "bound_gradients_", "group_ratio"]


@torch.no_grad()
def bound_factors(
    weights: Sequence[Tensor],
    ratio: float | Sequence[float],
    grads: Sequence[Tensor] | None = None,
    reference: Sequence[Tensor] | None = None,
) -> Tensor:
    """The factor ``min(1, ratio_l * max(||W_l||, floor) / ||g_l||)`` of each weight, as one vector
    (``grads`` default to ``weights[l].grad``): what :func:`bound_gradients_` multiplies the
    gradients by, also for measuring how often the bound binds. With ``reference`` (one tensor per
    weight, e.g. a running average of its gradients) its norm takes the place of ``||g_l||``.

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
    if reference is not None and len(reference) != len(weights):
        raise ValueError(f"{len(reference)} reference tensors for {len(weights)} weights")
    if not weights:
        return torch.ones(0)
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    measured = grads if reference is None else reference
    g_norm = torch.stack(torch._foreach_norm(list(measured), dtype=dtype))
    w_norm = torch.stack(torch._foreach_norm(list(weights), dtype=dtype)).clamp_min(MIN_WEIGHT_NORM)
    if len(set(ratios)) == 1:  # the common case: a Python scalar, no host-to-device copy
        allowed = w_norm * ratios[0]
    else:
        allowed = torch.tensor(ratios, dtype=dtype).to(g_norm.device, non_blocking=True) * w_norm
    # A zero gradient divides into inf or a huge number, clamped to 1: left exactly as it is.
    return (allowed / g_norm.clamp_min(torch.finfo(dtype).tiny)).clamp(max=1.0)


@torch.no_grad()
def bound_gradients_(
    weights: Sequence[Tensor],
    ratio: float | Sequence[float],
    grads: Sequence[Tensor] | None = None,
    reference: Sequence[Tensor] | None = None,
) -> None:
    """Scale each ``grads[l]`` (default: ``weights[l].grad``) in place to ``||g_l|| <= ratio_l ||W_l||``
    (``||reference[l]|| <= ...`` where given), by :func:`bound_factors`. A non-finite gradient stays
    non-finite (a ``GradScaler`` never lets such a step through)."""
    if grads is None:
        grads = [w.grad for w in weights]
    factor = bound_factors(weights, ratio, grads, reference)
    if not weights:
        return
    torch._foreach_mul_(list(grads), [f.to(g.dtype) for f, g in zip(factor.unbind(), grads, strict=True)])


def group_ratio(group: dict[str, Any]) -> float | None:
    """The bound's ratio in a param group: ``max_grad_ratio`` (None: no bound), times ``lr_ref / lr``
    where ``bound_reference_lr`` is set, so that the step ``lr * ||g_l||`` is held to ``lr_ref *
    max_grad_ratio * ||W_l||`` whatever the lr; a group at ``lr = 0`` takes no step and is not bounded.
    Reads the lr on the host (a tensor lr is copied there) only where ``bound_reference_lr`` is set."""
    ratio, reference = group["max_grad_ratio"], group.get("bound_reference_lr")
    if ratio is None or reference is None:
        return ratio
    lr = float(group["lr"])
    return ratio * reference / lr if lr > 0 else None


class GradientAverages:
    """The running averages ``a_l <- beta * a_l + (1 - beta) * g_l`` (``a_l = g_l`` at the first
    step) that the bound measures with ``bound_momentum``, by target index.

    Kept apart from the base optimizer's per-parameter state, which optimizers initialize when they
    find it empty. Stored in float32 at least: an average of half-precision gradients in their own
    dtype loses the small changes ``(1 - beta) * g_l``.
    """

    def __init__(self) -> None:
        self.averages: dict[int, Tensor] = {}

    @torch.no_grad()
    def update(
        self, indices: Sequence[int], grads: Sequence[Tensor], betas: Sequence[float | None]
    ) -> list[Tensor] | None:
        """Average ``grads[k]`` into target ``indices[k]``'s average where ``betas[k]`` is set (one
        foreach lerp per distinct beta, no host sync); the tensors whose norms the bound measures
        (the average, or the gradient itself where ``betas[k]`` is None), or None if none is averaged."""
        if all(beta is None for beta in betas):
            return None
        reference = list(grads)
        pending: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        for k, (i, beta) in enumerate(zip(indices, betas, strict=True)):
            if beta is None:
                continue
            grad, average = grads[k], self.averages.get(i)
            if average is None:  # the first step: a_l = g_l
                dtype = torch.promote_types(grad.dtype, torch.float32)
                self.averages[i] = average = grad.detach().to(dtype, copy=True)
            else:
                averages, news = pending.setdefault(beta, ([], []))
                averages.append(average)
                news.append(grad.to(average.dtype))
            reference[k] = average
        for beta, (averages, news) in pending.items():
            torch._foreach_lerp_(averages, news, 1.0 - beta)
        return reference

    def state_dict(self) -> dict[int, Tensor]:
        return dict(self.averages)

    @staticmethod
    def check_loadable(saved: dict[int, Tensor], params: Sequence[Tensor]) -> None:
        """Every saved average belongs to a target of the same shape (checked before anything loads)."""
        fits = lambda i, a: 0 <= i < len(params) and a.shape == params[i].shape  # noqa: E731
        wrong = [int(i) for i, a in saved.items() if not fits(int(i), a)]
        if wrong:
            raise ValueError(
                f"this optimizer state has step-bound averages for target indices {sorted(wrong)} that this "
                f"wrapper's {len(params)} targets do not match in number or shape: it was saved for another "
                "model or target selection"
            )

    def load_state_dict(self, saved: dict[int, Tensor], params: Sequence[Tensor]) -> None:
        self.averages = {int(i): a.to(params[int(i)].device) for i, a in saved.items()}


def auto_max_grad_ratio(model: nn.Module, num_layers: int) -> float | None:
    """``max_grad_ratio="auto"`` for ``model`` with ``num_layers`` bounded layers: ``1/L`` on a
    plain chain (:func:`~timm_ortho.chain.check_plain_chain`), ``None`` (no bound) otherwise."""
    return max_grad_ratio_for(num_layers) if check_plain_chain(model).plain else None
