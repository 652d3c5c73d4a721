"""Which layers the method acts on, and how each weight becomes a filter matrix.

One place decides, for both ingredients: the orthonormality regularizer acts on the weights of the
targets found here and the error modulation hooks the outputs of the same modules.

By default, as in the paper, every convolution (``nn.Conv1d/2d/3d`` and their subclasses, which
covers timm's ``Conv2dSame``, ``StdConv2d``, ...) and every ``nn.Linear`` is a target. A grouped
convolution is ``conv_groups`` independent filter matrices; depthwise convolutions (one input
channel per filter, a ``1 x kh*kw`` matrix) are skipped unless asked for. Biases and normalization
parameters are never targets. Transposed convolutions and weights that are not held by a Conv or
Linear module (e.g. ``nn.MultiheadAttention.in_proj_weight``) are not targets.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from einops import rearrange
from torch import Tensor, nn

from .ortho import GroupLayout, filter_shape, group_layout

__all__ = ["FilterBank", "Role", "find_targets"]

Role = Literal["stem", "body", "classifier"]

_TARGET_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True, eq=False)
class FilterBank:
    """One regularized weight, read as ``conv_groups`` filter matrices of shape ``(f_out, f_in)``."""

    name: str
    """Parameter name in the model, e.g. ``"stages.0.blocks.1.conv.weight"``."""
    module_name: str
    module: nn.Module = field(repr=False)
    param: nn.Parameter = field(repr=False)
    conv_groups: int
    f_out: int
    """Filters per conv group."""
    f_in: int
    """Inputs per filter: ``in_channels / conv_groups * prod(kernel_size)``."""
    role: Role

    @property
    def breaks_principle(self) -> bool:
        """True where ``f_out > f_in``: orthonormal rows cannot exist, the rule goes group-wise."""
        return self.f_out > self.f_in

    @property
    def layout(self) -> GroupLayout:
        """How each conv group's filters are cut into orthonormalizable groups (the one rule, in ortho.py)."""
        return group_layout(self.f_out, self.f_in)

    @property
    def ortho_groups(self) -> int:
        """Orthonormalized groups per conv group: ``ceil(f_out / f_in)``."""
        return self.layout.groups

    def matrix(self, weight: Tensor | None = None) -> Tensor:
        """The weight as a ``(conv_groups, f_out, f_in)`` view."""
        w = self.param if weight is None else weight
        return rearrange(w, "(c o) ... -> c o (...)", c=self.conv_groups)


def _module_names(model: nn.Module, key: str) -> set[str]:
    """Module names a timm ``pretrained_cfg`` gives for ``first_conv`` or ``classifier``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    value = cfg.get(key)
    if value is None:
        return set()
    return {value} if isinstance(value, str) else set(value)


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _in_any(module_name: str, prefixes: Iterable[str]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def find_targets(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    skip_stem: bool = False,
    skip_classifier: bool = False,
    include_depthwise: bool = False,
) -> list[FilterBank]:
    """The model's target weights, in module registration order.

    Args:
        include: fnmatch patterns on parameter names; when given, only matching weights are kept.
        exclude: fnmatch patterns on parameter names; matching weights are dropped.
        skip_stem: drop the stem, i.e. the modules named by ``pretrained_cfg["first_conv"]`` on a
            timm model, else the first target.
        skip_classifier: drop the classifier, i.e. the modules named by
            ``pretrained_cfg["classifier"]``, else a trailing ``nn.Linear``.
        include_depthwise: also regularize depthwise convs (``groups == in_channels > 1``).

    A weight shared by several modules is listed once, under its first name.
    """
    stems, heads = _module_names(model, "first_conv"), _module_names(model, "classifier")
    found: list[FilterBank] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, _TARGET_TYPES):
            continue
        weight = module.weight
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{module_name!r} is a lazy module whose weight is not materialized yet; run one "
                "forward pass before wrapping the optimizer."
            )
        seen.add(id(weight))
        conv_groups = getattr(module, "groups", 1)
        depthwise = conv_groups > 1 and conv_groups == module.in_channels
        if depthwise and not include_depthwise:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        role: Role = "stem" if _in_any(module_name, stems) else "body"
        if role == "body" and _in_any(module_name, heads):
            role = "classifier"
        found.append(_bank(name, module_name, module, conv_groups, role))
    found = _fallback_roles(found, have_stem=bool(stems), have_head=bool(heads))
    if skip_stem:
        found = [t for t in found if t.role != "stem"]
    if skip_classifier:
        found = [t for t in found if t.role != "classifier"]
    return found


def _bank(name: str, module_name: str, module: nn.Module, conv_groups: int, role: Role) -> FilterBank:
    f_out, f_in = filter_shape(module.weight.shape, conv_groups)
    return FilterBank(
        name=name,
        module_name=module_name,
        module=module,
        param=module.weight,
        conv_groups=conv_groups,
        f_out=f_out,
        f_in=f_in,
        role=role,
    )


def _fallback_roles(found: list[FilterBank], have_stem: bool, have_head: bool) -> list[FilterBank]:
    """Without a timm cfg: the first target is the stem, a trailing Linear is the classifier."""
    if not found:
        return found
    out = list(found)
    if not have_stem and out[0].role == "body":
        out[0] = replace(out[0], role="stem")
    if not have_head and isinstance(out[-1].module, nn.Linear) and len(out) > 1:
        out[-1] = replace(out[-1], role="classifier")
    return out
