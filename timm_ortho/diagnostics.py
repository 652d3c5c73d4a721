"""What a user inspects and plots about the regularized weights.

- :func:`filter_report`: every target layer's ``f_in`` / ``f_out`` and whether it breaks the design
  principle ``f_in >= f_out`` (where orthonormal rows cannot exist and the rule goes group-wise).
- :func:`layer_penalties`: per-layer ``||Wg Wg^T - I||_F^2`` (the penalty without ``lambda / 2``).
- :func:`filter_correlation`: per-layer mean absolute cosine between filters, the paper's measure of
  how redundant a layer's filters are.
- :func:`filter_statistics`: both of the last two from one Gram matrix per filter group, for a
  caller that logs both.

All of them take a model (or a list of :class:`~timm_ortho.targets.FilterBank`) and return plain
values or tensors; none of them changes the model. A caller that measures the same list again and
again (a training loop, every N steps) should pass the list: the batched engine is then built once
per list, not once per call.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .batched import BatchedOrthonormality
from .targets import FilterBank, find_targets

__all__ = [
    "LayerShape",
    "filter_correlation",
    "filter_report",
    "filter_statistics",
    "format_filter_report",
    "layer_penalties",
]


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


# The engine of each target list a caller passes, keyed weakly by the list's first bank. The engine
# holds copies of the banks (same modules, same parameters), never the key itself, so an entry goes
# away with the caller's list. The signature checks that the list is still the one the engine was
# built for; the parameters it names are kept alive by the engine, so their ids cannot be reused.
_ENGINES: weakref.WeakKeyDictionary[FilterBank, tuple[tuple, BatchedOrthonormality]] = (
    weakref.WeakKeyDictionary()
)


def _engine(model_or_targets: nn.Module | Sequence[FilterBank]) -> BatchedOrthonormality:
    if isinstance(model_or_targets, nn.Module):  # fresh banks on every call: nothing to reuse
        return BatchedOrthonormality(find_targets(model_or_targets))
    banks = list(model_or_targets)
    if not banks:
        return BatchedOrthonormality(banks)
    signature = tuple((id(b.param), b.conv_groups, b.f_out, b.f_in) for b in banks)
    cached = _ENGINES.get(banks[0])
    if cached is None or cached[0] != signature:
        cached = (signature, BatchedOrthonormality([dataclasses.replace(b) for b in banks]))
        _ENGINES[banks[0]] = cached
    return cached[1]


def layer_penalties(model_or_targets: nn.Module | Sequence[FilterBank]) -> Tensor:
    """Per-layer ``sum_groups ||Wg Wg^T - I||_F^2``, float32, aligned with the targets' order."""
    return _engine(model_or_targets).squared_residuals()


def filter_correlation(model_or_targets: nn.Module | Sequence[FilterBank]) -> Tensor:
    """Per-layer mean ``|cos|`` between distinct filters of the same conv group (float32, CPU)."""
    return filter_statistics(model_or_targets)[1]


def filter_statistics(model_or_targets: nn.Module | Sequence[FilterBank]) -> tuple[Tensor, Tensor]:
    """``(layer_penalties, filter_correlation)`` from one pass: one Gram matrix per filter group.

    The Gram ``Wg Wg^T`` of a layer that is one group (``f_out <= f_in``, every layer of the plain
    nets but an ImageNet classifier) gives both its residual and its cosines
    ``G_ij / sqrt(G_ii G_jj)``; see :meth:`BatchedOrthonormality.gram_statistics`.
    """
    return _engine(model_or_targets).gram_statistics()
