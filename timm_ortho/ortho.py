"""The orthonormality regularizer as pure tensor math (no modules, no hooks).

A parametric layer's weight is read as a *filter matrix* ``Wm`` of shape ``(f_out, f_in)``: one row
per filter, ``f_in = C * kh * kw`` inputs per filter. The regularizer of Xie, Xiong & Pu (CVPR 2017,
Eq. 3) is

    R(Wm) = (lambda / 2) * || Wm Wm^T - I ||_F^2,        dR/dWm = 2 * lambda * (Wm Wm^T - I) Wm.

The diagonal of the Gram matrix pushes every filter to unit norm, the off-diagonal pushes filters of
one layer to be mutually orthogonal.

*Fat* matrices (``f_out > f_in``) cannot have orthonormal rows. They are split into
``ceil(f_out / f_in)`` consecutive groups of balanced size (the sizes of ``torch.tensor_split``:
they differ by at most one, the larger ones first), and each group's Gram matrix is penalized on its
own. To batch unequal groups, every group is padded to the common size with zero rows. A zero row
adds exactly ``1`` to ``||G - I||_F^2`` (its diagonal entry) and nothing to the gradient of the
other rows (its Gram row and column are zero), so padding is exact once that constant is removed.

Every function here works on a leading batch dimension and computes in float32 (or float64 if the
input is float64), whatever the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "GroupLayout",
    "compute_dtype",
    "filter_shape",
    "from_groups",
    "gram_mean_abs_cosine",
    "group_layout",
    "mean_abs_cosine",
    "orthonormal_",
    "orthonormality_grad",
    "orthonormality_penalty",
    "to_groups",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the regularizer's math runs in: float64 stays exact, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class GroupLayout:
    """How ``f_out`` filters of ``f_in`` inputs are cut into orthonormalizable groups.

    ``groups`` groups of ``size`` rows each after padding; ``pad`` zero rows were added in total.
    ``gather`` maps each padded row to a source row (``f_out`` points at the appended zero row);
    ``scatter`` maps each real filter back to its padded position. Both are None when no padding is
    needed (the thin case, or a fat case that divides evenly).
    """

    f_out: int
    f_in: int
    groups: int
    size: int
    pad: int
    gather: tuple[int, ...] | None
    scatter: tuple[int, ...] | None


def filter_shape(weight_shape: Sequence[int], conv_groups: int = 1) -> tuple[int, int]:
    """``(f_out, f_in)`` of each conv group's filter matrix, for a weight ``(out, in / conv_groups, *k)``.

    One row per filter: ``f_out = out / conv_groups`` filters of ``f_in = in / conv_groups * prod(k)``.
    """
    out = weight_shape[0]
    if out % conv_groups:
        raise ValueError(f"weight with {out} filters cannot be split into {conv_groups} conv groups")
    return out // conv_groups, math.prod(weight_shape[1:])


@cache
def group_layout(f_out: int, f_in: int) -> GroupLayout:
    """The group-wise rule: ``ceil(f_out / f_in)`` consecutive groups of balanced size."""
    if f_out < 1 or f_in < 1:
        raise ValueError(f"a filter matrix needs f_out >= 1 and f_in >= 1, got ({f_out}, {f_in})")
    groups = math.ceil(f_out / f_in)
    size = math.ceil(f_out / groups)
    pad = groups * size - f_out
    if pad == 0:
        return GroupLayout(f_out, f_in, groups, size, 0, None, None)
    # tensor_split sizes: the first (f_out % groups) groups hold `size` rows, the rest `size - 1`.
    full = f_out % groups
    gather: list[int] = []
    scatter: list[int] = []
    row = 0
    for g in range(groups):
        n = size if g < full else size - 1
        scatter.extend(range(len(gather), len(gather) + n))
        gather.extend(range(row, row + n))
        gather.extend([f_out] * (size - n))
        row += n
    return GroupLayout(f_out, f_in, groups, size, pad, tuple(gather), tuple(scatter))


@lru_cache(maxsize=1024)
def _row_index(rows: tuple[int, ...], device: torch.device) -> Tensor:
    """A layout's gather or scatter rows as an index tensor, made once per device (no copy per step)."""
    # A normal tensor even when first asked for under inference_mode: autograd may save it later.
    with torch.inference_mode(False):
        return torch.tensor(rows, device=device)


def to_groups(wm: Tensor, layout: GroupLayout | None = None) -> Tensor:
    """``(..., f_out, f_in)`` -> ``(..., groups, size, f_in)``: the group-wise rule, zero-padded.

    Uneven groups get zero rows at their ends (the ``gather`` of :func:`group_layout`); the dtype is
    kept. Without padding the result is a view of ``wm``.
    """
    layout = layout or group_layout(*wm.shape[-2:])
    if layout.gather is not None:
        wm = torch.cat([wm, wm.new_zeros(*wm.shape[:-2], 1, wm.shape[-1])], dim=-2)
        wm = wm.index_select(-2, _row_index(layout.gather, wm.device))
    return rearrange(wm, "... (g s) d -> ... g s d", g=layout.groups)


def from_groups(wg: Tensor, layout: GroupLayout) -> Tensor:
    """``(..., groups, size, d)`` -> ``(..., f_out, d)``, padding rows dropped (undoes :func:`to_groups`)."""
    rows = rearrange(wg, "... g s d -> ... (g s) d")
    if layout.scatter is not None:
        rows = rows.index_select(-2, _row_index(layout.scatter, rows.device))
    return rows


def _grouped(wm: Tensor) -> tuple[Tensor, GroupLayout]:
    """``(..., f_out, f_in)`` -> ``(..., groups, size, f_in)`` in the compute dtype, zero-padded."""
    layout = group_layout(*wm.shape[-2:])
    return to_groups(wm.to(compute_dtype(wm.dtype)), layout), layout


def _gram_residual(wg: Tensor) -> Tensor:
    """``W W^T - I`` for a batch of group matrices ``(..., s, d)``."""
    eye = torch.eye(wg.shape[-2], dtype=wg.dtype, device=wg.device)
    return wg @ wg.transpose(-1, -2) - eye


def orthonormality_penalty(wm: Tensor, decay: float = 1.0) -> Tensor:
    """``(decay / 2) * sum_groups ||Wg Wg^T - I||_F^2`` for ``wm`` of shape ``(..., f_out, f_in)``.

    Returns one value per leading batch index (a 0-d tensor for a single matrix).
    """
    wg, layout = _grouped(wm)
    residual = _gram_residual(wg)
    total = residual.square().sum(dim=(-1, -2, -3)) - layout.pad
    return 0.5 * decay * total


def orthonormality_grad(wm: Tensor, decay: float = 1.0) -> Tensor:
    """Closed-form ``dR/dWm = 2 * decay * (Wg Wg^T - I) Wg`` per group, shaped like ``wm``.

    Returned in the compute dtype (float32, or float64 for float64 input).
    """
    wg, layout = _grouped(wm)
    return from_groups(2.0 * decay * (_gram_residual(wg) @ wg), layout)


@torch.no_grad()
def orthonormal_(weight: Tensor, conv_groups: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Fill ``weight`` in place with orthonormal filters, group-wise where the matrix is fat.

    ``weight`` has the layout of a conv or linear weight, ``(out, in / conv_groups, *kernel)``. Each
    conv group's filter matrix is cut as in :func:`group_layout` and every group gets unit-norm,
    mutually orthogonal rows: the Q factor of a Gaussian matrix, sign-corrected so that it is
    Haar-distributed (the distribution of Gram-Schmidt on Gaussian filters).
    """
    f_out, f_in = filter_shape(weight.shape, conv_groups)
    layout = group_layout(f_out, f_in)
    blocks = conv_groups * layout.groups
    gauss = torch.randn(blocks, f_in, layout.size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = from_groups(rearrange(q, "(c g) d s -> c g s d", c=conv_groups), layout)
    weight.copy_(rows.reshape(weight.shape).to(device=weight.device, dtype=weight.dtype))
    return weight


def mean_abs_cosine(wm: Tensor) -> Tensor:
    """Mean absolute cosine between distinct filters (rows) of ``wm`` ``(..., f_out, f_in)``.

    The paper's filter-correlation measure (its Fig. 2); computed over all pairs of the layer, not
    per group. Zero filters count as cosine 0. Returns one value per leading batch index.
    """
    w = wm.to(compute_dtype(wm.dtype))
    unit = w / w.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return _mean_abs_off_diagonal(unit @ unit.transpose(-1, -2))


def gram_mean_abs_cosine(gram: Tensor) -> Tensor:
    """:func:`mean_abs_cosine` from the Gram matrix ``G = Wm Wm^T`` ``(..., f_out, f_out)`` instead.

    ``cos_ij = G_ij / (||w_i|| ||w_j||)`` with ``||w_i|| = sqrt(G_ii)``, so a caller that already has
    the Gram (the penalty's) gets the correlation without a second matmul. Equal to
    :func:`mean_abs_cosine` up to rounding; zero filters count as cosine 0 here too.
    """
    sq_norm = gram.diagonal(dim1=-2, dim2=-1)
    inv = torch.where(sq_norm > 0, sq_norm.rsqrt(), torch.zeros_like(sq_norm))
    # |G_ij| / ||w_i|| <= ||w_j|| (Cauchy-Schwarz): scaling one side at a time cannot overflow.
    return _mean_abs_off_diagonal(gram * inv.unsqueeze(-1) * inv.unsqueeze(-2))


def _mean_abs_off_diagonal(cos: Tensor) -> Tensor:
    """Mean ``|cos_ij|`` over ``i != j`` of ``(..., n, n)``; 0 for a single filter."""
    n = cos.shape[-1]
    if n < 2:
        return cos.new_zeros(cos.shape[:-2])
    off_diag = cos.abs().sum(dim=(-1, -2)) - cos.diagonal(dim1=-2, dim2=-1).abs().sum(-1)
    return off_diag / (n * (n - 1))
