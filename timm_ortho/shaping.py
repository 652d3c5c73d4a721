"""Activations shaped for depth: the leaky-ReLU slope that keeps a deep plain chain trainable.

A Conv-BN-ReLU chain of ~100 layers is, at initialization, a map that sends any two different inputs
to almost the same direction (its correlation map is nearly degenerate), so the error explodes toward
the bottom and small changes there scramble the output. Tailored Activation Transformation (TAT;
Zhang, Botev & Martens, ICLR 2022, building on Deep Kernel Shaping, Martens et al. 2021) fixes the
*network's* kernel instead of the layer's: it picks the leaky-ReLU slope ``alpha`` from the depth so
that the whole chain stays a controlled distance from linear.

The math (normalized leaky ReLU ``phi(x) = sqrt(2 / (1 + alpha^2)) * LReLU_alpha(x)``, inputs of unit
second moment): two inputs of correlation ``c`` come out with correlation

    C_alpha(c) = c + (1 - alpha)^2 / (pi * (1 + alpha^2)) * (sqrt(1 - c^2) - c * arccos(c))

(``alpha = 1`` is linear, ``C(c) = c``; ``alpha = 0`` is ReLU's arc-cosine kernel). A chain of ``L``
activations composes it, ``C_net = C_alpha o ... o C_alpha`` (``L`` times), and TAT's criterion is

    C_net(0) = eta            (eta = 0.9, TAT's recommended value)

i.e. two orthogonal inputs must not come out more correlated than ``eta``. ``C_net(0)`` falls
monotonically from ``C_{ReLU}^L(0)`` (close to 1 for a deep chain) to 0 as ``alpha`` goes from 0 to 1,
so the slope is found by bisection. For the CIFAR plain nets (``L`` = layers - 1 activations) this
gives ``alpha`` = 0.16 (20 layers), 0.40 (44), 0.59 (110) and 0.86 (1202).

Two approximations, stated: the kernel is that of a fully connected chain (a conv with orthonormal
filter banks preserves it per location), and the BatchNorm between conv and activation only
renormalizes the scale, which the normalized activation already assumes. The output scale
``sqrt(2 / (1 + alpha^2))`` is left out of the module: the BatchNorm that follows every conv makes the
forward pass invariant to it.
"""

from __future__ import annotations

import functools
import math

from torch import nn

__all__ = ["TAT_ETA", "leaky_relu_cmap", "network_c0", "tat_leaky_relu", "tat_leaky_relu_slope"]

TAT_ETA = 0.9
"""TAT's target for the network's correlation map at 0, ``C_net(0)``."""


def leaky_relu_cmap(c: float, alpha: float) -> float:
    """``C_alpha(c)``: output correlation of the normalized leaky ReLU for input correlation ``c``."""
    c = min(1.0, max(-1.0, c))
    return c + (1.0 - alpha) ** 2 / (math.pi * (1.0 + alpha**2)) * (
        math.sqrt(max(0.0, 1.0 - c * c)) - c * math.acos(c)
    )


def network_c0(alpha: float, num_activations: int) -> float:
    """``C_net(0)``: the correlation map of ``num_activations`` composed activations, at ``c = 0``."""
    c = 0.0
    for _ in range(num_activations):
        c = leaky_relu_cmap(c, alpha)
    return c


@functools.lru_cache(maxsize=256)
def tat_leaky_relu_slope(num_activations: int, eta: float = TAT_ETA) -> float:
    """The negative slope ``alpha`` for which ``num_activations`` leaky ReLUs give ``C_net(0) = eta``.

    A chain too shallow to reach ``eta`` even with ReLU (``C_ReLU^L(0) < eta``) gets ``alpha = 0``:
    it is then less nonlinear than the target already, and the paper's ReLU is the closest choice.
    """
    if isinstance(num_activations, bool) or not isinstance(num_activations, int) or num_activations < 1:
        raise ValueError(f"num_activations must be a positive int, got {num_activations!r}")
    if not 0.0 < eta < 1.0:
        raise ValueError(f"eta must be in (0, 1) (TAT recommends {TAT_ETA}), got {eta!r}")
    if network_c0(0.0, num_activations) <= eta:
        return 0.0
    lo, hi = 0.0, 1.0  # C_net(0) decreases in alpha: C_net(0; lo) > eta >= C_net(0; hi) = 0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if network_c0(mid, num_activations) > eta:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def tat_leaky_relu(num_activations: int, eta: float = TAT_ETA) -> type[nn.Module]:
    """An activation class (timm's ``act_layer`` convention: called with no argument) whose modules
    are ``LeakyReLU(tat_leaky_relu_slope(num_activations, eta))``."""
    return functools.partial(nn.LeakyReLU, tat_leaky_relu_slope(num_activations, eta))  # type: ignore[return-value]
