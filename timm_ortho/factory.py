"""timm's optimizer factory with the orthonormality term in place of weight decay.

``create_optimizer(model, "adamw", lr=..., weight_decay=..., ortho_decay=...)`` builds the base
optimizer with ``timm.optim.create_optimizer_v2`` and timm's own parameter groups (the model's
``no_weight_decay()``, ``layer_decay``, ``param_group_fn``, ``filter_bias_and_bn``), except that the
regularized Conv/Linear weights are taken out of every decayed group into a sibling group without
weight decay *before* the optimizer is built (every other group field, e.g. layer decay's
``lr_scale``, is kept), then wraps it in :class:`~timm_ortho.OrthoModulated`.

timm's registry is left as it is: its ``create_optimizer_v2`` picks the optimizer by the last
``_``-separated word of the name (``ortho_sgd`` would silently build plain SGD) and hands the optimizer
class parameter groups, never the model, which the wrapper needs (the filter layout of grouped convs,
the classifier and stem, the hooks of the modulation, the plain-chain check). timm's ``train.py``
reaches the factory through :mod:`timm_ortho.plugins.run_timm` (``--opt ortho_<name>``); see
docs/timm.md.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from .defaults import DEFAULT_FORM, DEFAULT_MAX_GRAD_RATIO, DEFAULT_MODULATION, DEFAULT_ORTHO_DECAY
from .groups import groups_without_decay_on
from .optim import OrthoModulated
from .targets import FilterBank, find_targets

__all__ = [
    "ORTHO_OPTIONS",
    "ORTHO_PREFIX",
    "create_optimizer",
    "create_ortho_optimizer",
    "groups_without_decay_on",
]

ORTHO_PREFIX = "ortho_"

# Keyword arguments that configure OrthoModulated; every other one goes to timm and the base optimizer.
ORTHO_OPTIONS = (
    "ortho_decay",
    "max_grad_ratio",
    "bound_momentum",
    "bound_reference_lr",
    "form",
    "modulation",
    "include",
    "exclude",
    "skip_stem",
    "skip_classifier",
    "include_depthwise",
    "targets",
)
_TARGET_OPTIONS = ("include", "exclude", "skip_stem", "skip_classifier", "include_depthwise")

# create_optimizer_v2's own keywords that decide the parameter groups.
_GROUPING = (
    "filter_bias_and_bn",
    "fallback_list",
    "fallback_no_weight_decay",
    "layer_decay",
    "layer_decay_min_scale",
    "layer_decay_no_opt_scale",
    "param_group_fn",
)


def base_name(opt: str) -> str:
    """``ortho_lookahead_adamw`` -> ``lookahead_adamw``, checked against timm's registry.

    Raises a ``ValueError`` naming the problem for a misplaced prefix or an unknown optimizer (with
    the closest names), before anything is built.
    """
    from timm.optim import list_optimizers

    if not isinstance(opt, str):
        raise TypeError(f"the optimizer name must be a string such as 'sgd' or 'adamw', got {opt!r}")
    name = opt.lower().removeprefix(ORTHO_PREFIX)
    words = name.split("_")
    if ORTHO_PREFIX.rstrip("_") in words:
        raise ValueError(
            f"optimizer name {opt!r}: 'ortho' must come first (e.g. 'ortho_lookahead_adamw'); "
            "OrthoModulated wraps the whole base optimizer, Lookahead included"
        )
    known = list_optimizers()
    inner = words[1:] if words[0] == "lookahead" else words  # timm's one prefix of its own
    if len(inner) != 1 or inner[0] not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.optim.list_optimizers() lists them"
        raise ValueError(f"unknown optimizer {opt!r}: timm's registry has no {name!r}{hint}")
    return name


def _timm_groups(model: nn.Module, weight_decay: float, grouping: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameter groups ``create_optimizer_v2(model, ...)`` would build (its order of precedence)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    if grouping.get("param_group_fn") is not None:
        return list(grouping["param_group_fn"](model))
    common = dict(
        weight_decay=weight_decay,
        weight_decay_exclude_1d=grouping.get("filter_bias_and_bn", True),
        no_weight_decay_list=getattr(model, "no_weight_decay", lambda: set())(),
        fallback_list=grouping.get("fallback_list", ()),
        fallback_no_weight_decay=grouping.get("fallback_no_weight_decay", False),
    )
    if grouping.get("layer_decay") is not None:
        return param_groups_layer_decay(
            model,
            layer_decay=grouping["layer_decay"],
            min_scale=grouping.get("layer_decay_min_scale", 0.0),
            no_opt_scale=grouping.get("layer_decay_no_opt_scale"),
            **common,
        )
    return param_groups_weight_decay(model, **common)


def _check_keywords(timm_kwargs: dict[str, Any]) -> None:
    """A keyword that looks like a misspelt wrapper option is an error before timm sees it."""
    from timm.optim import create_optimizer_v2

    for key in timm_kwargs:
        close = difflib.get_close_matches(key, ORTHO_OPTIONS, n=1, cutoff=0.8)
        if key.startswith("ortho") or (
            close and key not in inspect.signature(create_optimizer_v2).parameters
        ):
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"unknown option {key!r}{hint}: OrthoModulated's options are {', '.join(ORTHO_OPTIONS)}"
            )


def _targets(model: nn.Module, options: dict[str, Any]) -> list[FilterBank]:
    """``options["targets"]``, or the targets the selection options find."""
    unknown = sorted(set(options) - {"targets", *_TARGET_OPTIONS})
    if unknown:
        raise TypeError(
            f"unknown target option(s) {unknown}; expected some of targets, {', '.join(_TARGET_OPTIONS)}"
        )
    if options.get("targets") is not None:
        return list(options["targets"])
    return find_targets(model, **{k: v for k, v in options.items() if k != "targets"})


def create_optimizer(
    model: nn.Module,
    opt: str = "sgd",
    lr: float | None = None,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    *,
    ortho_decay: float = DEFAULT_ORTHO_DECAY,
    modulation: bool | str | dict[str, Any] = DEFAULT_MODULATION,
    max_grad_ratio: float | Literal["auto"] | None = DEFAULT_MAX_GRAD_RATIO,
    bound_momentum: float | None = None,
    bound_reference_lr: float | None = None,
    form: str = DEFAULT_FORM,
    target_kwargs: dict[str, Any] | None = None,
    **timm_kwargs: Any,
) -> OrthoModulated:
    """``timm.optim.create_optimizer_v2`` for ``model``, wrapped in :class:`~timm_ortho.OrthoModulated`.

    Args:
        model: the model (its Conv/Linear weights are the targets; timm reads ``no_weight_decay()``).
        opt: any name of timm's optimizer registry (``sgd``, ``adamw``, ``lookahead_adamw``, ...),
            with or without the ``ortho_`` prefix.
        lr, weight_decay, momentum: as in ``create_optimizer_v2``. ``weight_decay`` reaches only the
            parameters timm decays that are not targets (e.g. a ViT's position embedding).
        ortho_decay, modulation, max_grad_ratio, bound_momentum, bound_reference_lr, form: see
            :class:`~timm_ortho.OrthoModulated`.
        target_kwargs: ``include``, ``exclude``, ``skip_stem``, ... (see :func:`~timm_ortho.find_targets`),
            or ``targets`` (an already-found list).
        **timm_kwargs: everything else ``create_optimizer_v2`` takes (``layer_decay``,
            ``param_group_fn``, ``filter_bias_and_bn``, ``foreach``, ``betas``, ``eps``, ...).

    Names, options and the lr are checked before anything is built.
    """
    from timm.optim import create_optimizer_v2

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"create_optimizer needs the model (an nn.Module), got {type(model).__name__}: the wrapper "
            "regularizes the model's Conv/Linear weights and hooks its layers, so pass the model itself"
        )
    name = base_name(opt)
    if lr is not None and (isinstance(lr, (bool, str)) or not isinstance(lr, (int, float))):
        raise TypeError(f"lr must be a number, got {lr!r} ({type(lr).__name__})")
    _check_keywords(timm_kwargs)
    targets = _targets(model, dict(target_kwargs or {}))
    grouping = {k: timm_kwargs.pop(k) for k in _GROUPING if k in timm_kwargs}
    groups = groups_without_decay_on(_timm_groups(model, weight_decay, grouping), targets, weight_decay)
    base = create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=0.0, momentum=momentum, **timm_kwargs)
    return OrthoModulated(
        base,
        model,
        ortho_decay=ortho_decay,
        modulation=modulation,
        max_grad_ratio=max_grad_ratio,
        bound_momentum=bound_momentum,
        bound_reference_lr=bound_reference_lr,
        form=form,
        targets=[t for t in targets if t.param.requires_grad],
    )


create_ortho_optimizer = create_optimizer  # the name of releases before 0.2


def routed(create: Callable[..., Any]) -> Callable[..., Any]:
    """``create_optimizer_v2`` with ``ortho_*`` names built by :func:`create_optimizer`.

    What :mod:`timm_ortho.plugins.run_timm` binds in the namespace of the timm script it runs (timm's
    own module is not changed). The wrapper's options arrive as keywords, as ``train.py
    --opt-kwargs`` passes them; every other name goes to ``create`` unchanged.
    """

    def create_optimizer_v2(model_or_params: Any, opt: str = "sgd", *args: Any, **kwargs: Any) -> Any:
        if not opt.lower().startswith(ORTHO_PREFIX):
            misplaced = sorted(set(kwargs) & set(ORTHO_OPTIONS))
            if misplaced:
                raise TypeError(
                    f"{', '.join(misplaced)}: OrthoModulated option(s) for the optimizer {opt!r}, which has "
                    f"no {ORTHO_PREFIX!r} prefix; use {ORTHO_PREFIX + opt!r} to train with the method"
                )
            return create(model_or_params, opt, *args, **kwargs)
        if not isinstance(model_or_params, nn.Module):
            raise ValueError(
                f"optimizer {opt!r} regularizes a model's Conv/Linear weights and hooks its layers: pass "
                "the model to create_optimizer_v2, not a list of parameters or param groups"
            )
        options = {k: kwargs.pop(k) for k in ORTHO_OPTIONS if k in kwargs}
        targets = {k: options.pop(k) for k in (*_TARGET_OPTIONS, "targets") if k in options}
        return create_optimizer(model_or_params, opt, *args, target_kwargs=targets, **options, **kwargs)

    return create_optimizer_v2
