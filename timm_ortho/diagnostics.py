"""What a user inspects and plots about the regularized weights.

- :func:`filter_report`: every target layer's ``f_in`` / ``f_out`` and whether it breaks the design
  principle ``f_in >= f_out`` (where orthonormal rows cannot exist and the rule goes group-wise).
- :func:`layer_penalties`: per-layer ``||Wg Wg^T - I||_F^2`` (the penalty without ``lambda / 2``).
- :func:`filter_correlation`: per-layer mean absolute cosine between filters, the paper's measure of
  how redundant a layer's filters are.

All of them take a model (or a list of :class:`~timm_ortho.targets.FilterBank`) and return plain
values or tensors; none of them changes the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batched import BatchedOrthonormality
from .ortho import mean_abs_cosine
from .targets import FilterBank, find_targets

__all__ = ["LayerShape", "filter_correlation", "filter_report", "format_filter_report", "layer_penalties"]


@dataclass(frozen=True)
class LayerShape:
    """One row of :func:`filter_report`."""

    name: str
    role: str
    f_out: int
    f_in: int
    conv_groups: int
    ortho_groups: int
    breaks_principle: bool


def _banks(model_or_targets: nn.Module | Sequence[FilterBank]) -> list[FilterBank]:
    if isinstance(model_or_targets, nn.Module):
        return find_targets(model_or_targets)
    return list(model_or_targets)


def filter_report(model_or_targets: nn.Module | Sequence[FilterBank]) -> list[LayerShape]:
    """Each target layer's filter-matrix shape and whether ``f_out > f_in`` (the principle broken)."""
    return [
        LayerShape(t.name, t.role, t.f_out, t.f_in, t.conv_groups, t.ortho_groups, t.breaks_principle)
        for t in _banks(model_or_targets)
    ]


def format_filter_report(rows: Sequence[LayerShape], only_breaking: bool = False) -> str:
    """A fixed-width table of :func:`filter_report` rows, for logs and the command line."""
    shown = [r for r in rows if r.breaks_principle] if only_breaking else list(rows)
    width = max([len(r.name) for r in shown] + [5])
    lines = [f"{'layer':<{width}}  {'role':<10}  {'f_out':>6}  {'f_in':>6}  {'groups':>6}  principle"]
    for r in shown:
        verdict = f"broken: {r.ortho_groups} ortho groups" if r.breaks_principle else "ok"
        lines.append(
            f"{r.name:<{width}}  {r.role:<10}  {r.f_out:>6}  {r.f_in:>6}  {r.conv_groups:>6}  {verdict}"
        )
    broken = sum(r.breaks_principle for r in rows)
    lines.append(f"{broken} of {len(rows)} target layers have f_out > f_in")
    return "\n".join(lines)


def layer_penalties(model_or_targets: nn.Module | Sequence[FilterBank]) -> Tensor:
    """Per-layer ``sum_groups ||Wg Wg^T - I||_F^2``, float32, aligned with the targets' order."""
    return BatchedOrthonormality(_banks(model_or_targets)).squared_residuals()


@torch.no_grad()
def filter_correlation(model_or_targets: nn.Module | Sequence[FilterBank]) -> Tensor:
    """Per-layer mean ``|cos|`` between distinct filters of the same conv group (float32)."""
    values = [mean_abs_cosine(t.matrix(t.param.detach())).mean() for t in _banks(model_or_targets)]
    return torch.stack([v.float().cpu() for v in values])
