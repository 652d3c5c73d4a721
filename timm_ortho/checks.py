"""What :class:`~timm_ortho.OrthoModulated` refuses, and the reasons it gives.

The wrapper's settings are checked when it is built and, since a scheduler or user code may change
its param-group fields afterwards, before every step: a NaN, infinite, negative or non-numeric value
would otherwise poison the weights at the next step. These are Python-value checks only (no tensor is
read, so no host-device synchronization).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from .defaults import MODULATION_PRESETS
from .targets import FilterBank, find_targets

__all__ = [
    "check_base_optimizer",
    "check_bound_options",
    "check_decay",
    "check_groups",
    "check_modulation",
    "check_owned_without_decay",
    "check_ratio",
    "check_same_groups",
    "some",
    "trainable_targets",
]


def some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def trainable_targets(
    model: nn.Module,
    targets: Sequence[FilterBank] | None,
    selection: dict[str, Any],
    include_depthwise: bool,
) -> list[FilterBank]:
    """The given ``targets``, or those found with ``selection``, less the frozen weights."""
    if targets is not None:
        chosen = sorted(k for k, v in selection.items() if v) + ["include_depthwise"] * include_depthwise
        if chosen:
            raise ValueError(
                f"pass either targets or the options that find them ({', '.join(chosen)}), not both"
            )
        found = list(targets)
    else:
        found = find_targets(model, **selection, include_depthwise=include_depthwise)
    trainable = [t for t in found if t.param.requires_grad]
    if not trainable:
        filtered = found or selection["include"] or selection["exclude"]
        raise ValueError(
            f"{type(model).__name__} has no trainable Conv/Linear weight to regularize"
            + (" after include/exclude/skip filters" if filtered else "")
            + "; check the model and the include/exclude patterns."
        )
    return trainable


def check_modulation(value: Any) -> None:
    from .modulation import ErrorModulation

    if value is None or isinstance(value, (bool, dict, ErrorModulation)):
        return
    if isinstance(value, str) and (value == "auto" or value in MODULATION_PRESETS):
        return
    names = ", ".join(repr(n) for n in ("auto", *MODULATION_PRESETS))
    raise ValueError(
        f"modulation must be {names}, True/False/None, a dict of ErrorModulation options or an "
        f"ErrorModulation, got {value!r}"
    )


def _is_number(value: Any) -> bool:
    """A Python int or float, not a bool (``True`` would pass as 1)."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_ratio(value: float | None, where: str = "") -> None:
    if value is None:
        return
    if not _is_number(value) or not 0 < value < float("inf"):
        raise ValueError(
            f"{where}max_grad_ratio must be None (no step bound), 'auto' (1/L on a plain chain of "
            f"L target layers, none elsewhere; only when wrapping) or a finite number > 0, got {value!r}"
        )


def check_bound_options(momentum: float | None, reference_lr: float | None, where: str = "") -> None:
    """The step bound's ``bound_momentum`` and ``bound_reference_lr``."""
    if momentum is not None and not (_is_number(momentum) and 0 < momentum < 1):
        raise ValueError(
            f"{where}bound_momentum must be None (the step bound measures each step's gradient) or a "
            f"number in (0, 1), the coefficient of the running average of the gradients it measures, "
            f"got {momentum!r}"
        )
    if reference_lr is not None and not (_is_number(reference_lr) and 0 < reference_lr < float("inf")):
        raise ValueError(
            f"{where}bound_reference_lr must be None (the step bound holds the gradient) or a finite "
            f"learning rate > 0 at which max_grad_ratio holds (the bound then holds the step), "
            f"got {reference_lr!r}"
        )


def check_base_optimizer(optimizer: Any, wrapper: type, wrapper_attribute: str) -> None:
    """The base optimizer is a bare torch optimizer, not already wrapped (by ``wrapper``, which
    leaves a weak reference to itself in ``wrapper_attribute``) or prepared by Accelerate."""
    if isinstance(optimizer, wrapper):
        raise ValueError("the optimizer is already wrapped by OrthoModulated; wrap the base optimizer once")
    if type(optimizer).__module__.startswith("accelerate"):
        raise ValueError(
            "the optimizer was already passed through accelerator.prepare(); wrap the bare optimizer "
            "first, then prepare the wrapper: accelerator.prepare(model, OrthoModulated(opt, model), ...)"
        )
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    ref = getattr(optimizer, wrapper_attribute, None)
    if ref is not None and ref() is not None:
        # A second wrapper would apply the term and hook the model a second time.
        raise ValueError(
            f"this {type(optimizer).__name__} is already wrapped by an OrthoModulated; wrap a base optimizer "
            "once (build a new base optimizer for a second wrapper)"
        )


def check_decay(value: float, where: str = "") -> None:
    # `not 0 <= value < inf` is also true for NaN.
    if not _is_number(value) or not 0 <= value < float("inf"):
        raise ValueError(
            f"{where}ortho_decay must be a finite, non-negative number (0 turns the term off), got {value!r}"
        )


def check_groups(groups: list[dict[str, Any]]) -> None:
    """The method's fields and the lr of every param group, checked on the host before each step.

    A scheduler or user code may change them after wrapping; a NaN, infinite, negative or non-numeric
    value would otherwise poison the weights at the next step. Python-value checks only: no tensor is
    read, so no host-device synchronization.
    """
    for i, group in enumerate(groups):
        where = f"param group {i}: "
        check_decay(group.get("ortho_decay", 0.0), where)
        check_ratio(group.get("max_grad_ratio"), where)
        check_bound_options(group.get("bound_momentum"), group.get("bound_reference_lr"), where)
        lr = group.get("lr")
        if lr is not None and (isinstance(lr, (bool, str)) or not isinstance(lr, (int, float, Tensor))):
            raise ValueError(f"{where}lr must be a number (or a tensor), got {lr!r} ({type(lr).__name__})")


def check_owned_without_decay(targets: Sequence[FilterBank], groups: list[dict[str, Any]]) -> None:
    """Every target is owned by the base optimizer, in a group without weight decay."""
    owned = {id(p): (i, g) for i, g in enumerate(groups) for p in g["params"]}
    missing = [t.name for t in targets if id(t.param) not in owned]
    if missing:
        raise ValueError(
            f"the optimizer does not own {len(missing)} target weight(s) of the model: "
            f"{some(missing)}. Build the optimizer from this model's parameters, or leave these "
            "weights out with exclude=[...]."
        )
    decayed = [(owned[id(t.param)], t.name) for t in targets if owned[id(t.param)][1].get("weight_decay")]
    if decayed:
        (index, group), _ = decayed[0]
        raise ValueError(
            f"param group {index} applies weight_decay={group['weight_decay']} to {len(decayed)} "
            f"target weight(s) ({some([name for _, name in decayed])}); the orthonormality term "
            "replaces weight decay on them. Build the base optimizer from "
            "timm_ortho.param_groups_for_ortho(model, weight_decay=...) (no decay on the targets, the "
            "usual decay on the rest), use "
            "timm_ortho.create_optimizer(model, 'sgd', weight_decay=...), or pass weight_decay=0."
        )


def check_same_groups(state_dict: dict[str, Any], groups: list[dict[str, Any]]) -> None:
    saved = state_dict.get("param_groups", [])
    if [len(g["params"]) for g in saved] == [len(g["params"]) for g in groups]:
        return
    sizes = [len(g["params"]) for g in groups]
    raise ValueError(
        f"this optimizer state has {len(saved)} param group(s) of {[len(g['params']) for g in saved]} "
        f"parameters; the wrapped optimizer has {len(groups)} of {sizes}. It was saved by an optimizer "
        "grouped another way (a bare optimizer with weight decay on every parameter "
        "has one group; timm_ortho.param_groups_for_ortho keeps the targets apart from the decayed "
        "weights). Load it into an optimizer built as the saving one was, or start this optimizer's "
        "state afresh."
    )
