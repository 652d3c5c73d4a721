"""Every default of the method, in one place, with the measurement that chose it.

The optimizer wrapper, the factory, the initializers and the training application import these
names; none of them writes a default value of its own. ``docs/results.md`` has the runs quoted here.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "DEFAULT_FORM",
    "DEFAULT_INIT",
    "DEFAULT_MAX_GRAD_RATIO",
    "DEFAULT_MODULATION",
    "DEFAULT_MODULATION_BAND",
    "DEFAULT_MODULATION_MODE",
    "DEFAULT_MODULATION_REFERENCE",
    "DEFAULT_ORTHO_DECAY",
    "INIT_SCHEMES",
    "MIN_WEIGHT_NORM",
    "MODULATION_PRESETS",
    "InitScheme",
    "max_grad_ratio_for",
]

# -- the orthonormality term -----------------------------------------------------------------------
DEFAULT_ORTHO_DECAY = 1e-5
"""``lambda`` of ``R = lambda/2 * sum ||Wg Wg^T - I||_F^2``. Chosen by the first sweep of plain_cnn44
(the term alone on the ReLU chain); that sweep rerun with the lr grid prefers 1e-4 there, but on the
default recipe (plain_cnn110, ``reproduce.py defaults``) 1e-4 is no better (docs/results.md)."""

DEFAULT_FORM: Literal["auto"] = "auto"
"""Coupled or decoupled by the base optimizer's kind of update (see :mod:`timm_ortho.forms`)."""

# -- the step bound --------------------------------------------------------------------------------
DEFAULT_MAX_GRAD_RATIO: Literal["auto"] = "auto"
"""``||grad_l|| <= ratio * ||W_l||`` per target layer on a plain chain (:mod:`timm_ortho.chain`), with
``ratio`` from the depth, :func:`max_grad_ratio_for` the number of target layers; no bound on other
models. Measured (``scripts/reproduce.py depth | defaults | models``, docs/results.md): the bound lets
a deep plain chain train at the larger lr of the grid (plain_cnn110 at lr 0.1: 0.98 with 0.01, 0.88
without; at lr 0.02 it trains either way), and it slows every residual, inverted-residual and
attention model tried, which need no help with the error's magnitude."""


def max_grad_ratio_for(num_layers: int) -> float:
    """The default step bound for ``L = num_layers`` target layers: ``1 / L``.

    Each layer may change by ``ratio`` of its norm per step; when the ``L`` changes align, the
    network's function moves by up to about ``ratio * L``, so ``ratio <= 1 / L`` keeps that at most 1
    whatever the depth. Measured at lr 0.1 (``scripts/reproduce.py bounds``, ``defaults`` and ``deep``,
    digits, 300 steps, batch 64, seed 0), the largest bound that still trains falls with depth about as
    ``3 / L``: above 0.3 at 20 layers, about 0.1 at 44, 0.02-0.05 at 110 (0.005-0.02 train the shaped
    chain to 97-98 %, 0.05 reaches 82 %, 0.1 54 %, no bound 88 %), and at 1202 layers 0.01 stays at
    chance (0.11), 0.003 reaches 0.24, 0.001 0.47, ``1/L`` = 0.00083 0.505 and 0.0003 0.24. So ``1/L``
    stays a few times inside that edge at every depth (``r * L`` at the edge: 6 or more at 20 layers,
    about 4 at 44, 2-5 at 110, 1-4 at 1202).

    The former rule, ``min(0.01, 1/L)``, held chains under 100 layers to 0.01, 30 or more times inside
    the edge at 20 layers, which slowed their first steps (plain_cnn20 overfitting one batch at lr
    0.1: loss 0.76 after 12 steps against 0.09 with ``1/L`` and 0.15 for SGD with weight decay, 3 seeds;
    ``scripts/first_steps.py``). Against it at 20 and 44 layers (``reproduce.py bounds``, the lr grid
    0.02 / 0.1): ``1/L`` is 0.6 to 0.8 points higher at 20 layers (digits 5 seeds and the synthetic set
    3 seeds at batch 64; 1,500 steps of batch 32, 3 seeds), 0.3 lower at 300 steps of batch 32 (inside
    the spread), and within 0.3 points at 44 layers; at lr 0.02 it is the better of the two in every
    case. From 100 layers on the two rules are the same (the 110- and 1202-layer records are
    unchanged).

    Chosen at batch 64. At batch 32 the gradients are larger and this bound still scales down nearly
    every layer at the end of a 300-step run; there ``plain_cnn110`` trails its residual twin by 1.6
    points; at lr 0.02 a looser bound (0.02, or this one on the gradients' running average,
    ``bound_momentum=0.9``) ties it, and every bound measured that is looser at lr 0.1 fails there,
    where this one trains (``scripts/plain110_ablation.py``, ``scripts/bound_probe.py``;
    docs/results.md, "Any timm model"). With small batches, train at lr 0.02 with
    ``bound_momentum=0.9``.
    """
    return 1.0 / max(1, num_layers)


MIN_WEIGHT_NORM = 1e-3
"""Floor of ``||W_l||`` in the step bound, as in adaptive gradient clipping: a zero-initialized layer
would otherwise be allowed no step at all."""

# -- the error modulation --------------------------------------------------------------------------
DEFAULT_MODULATION: Literal["auto"] = "auto"
"""The ``"top"`` rule on a plain chain (:mod:`timm_ortho.chain`), off on other models (one INFO line
says so). On the paper's ReLU chain without the step bound it is what trains (plain_cnn44: 69 %
held-out against 39 % for the term alone); on the shaped, bounded chain it adds nothing measurable and
does not hurt (docs/results.md). On a model with shortcuts there is no single chain of layers whose
errors a quasi-isometry relates."""

DEFAULT_MODULATION_BAND = 2.0
"""Quasi-isometry constant ``A``: a ratio of second moments outside ``[A^-2, A^2]`` is modulated."""

DEFAULT_MODULATION_MODE: Literal["clamp", "match"] = "match"
DEFAULT_MODULATION_REFERENCE: Literal["previous", "top"] = "top"
"""Mode and reference of the sweep on plain_cnn44 (synthetic set, two seeds): comparing every layer
with the top of the chain and matching it once the band is left is within the seed spread of the
lowest training loss (clamping against the top at ``A = 1.25``); the consecutive rule with ``A = 2``
never fires on a slow drift."""

MODULATION_PRESETS: dict[str, dict[str, object]] = {
    "top": dict(
        reference=DEFAULT_MODULATION_REFERENCE, mode=DEFAULT_MODULATION_MODE, band=DEFAULT_MODULATION_BAND
    ),
    "paper": dict(reference="previous", mode="match", band=DEFAULT_MODULATION_BAND),
}
"""Named rules for ``modulation=``. ``"top"`` (also ``True``; the library's rule): every layer's error
is compared with the top of the chain's and matched to it once their ratio leaves the band.
``"paper"``: the paper's consecutive rule, each layer compared with the (rescaled) layer above it and
matched when the two mismatch; the band ``A = 2`` is ours (the paper prints no threshold)."""

# -- initialization --------------------------------------------------------------------------------
InitScheme = Literal["orthonormal", "msra"]
INIT_SCHEMES: tuple[str, ...] = ("orthonormal", "msra")
DEFAULT_INIT: InitScheme = "orthonormal"
"""The paper keeps the constraint "both at initialization and in regularization"."""
