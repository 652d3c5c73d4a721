"""timm's optimizer factory with the orthonormality term in place of weight decay.

Two ways in, one implementation:

* ``create_optimizer(model, "adamw", lr=..., weight_decay=..., ortho_decay=...)``, the one place in
  this project that builds the wrapped optimizer;
* ``timm.optim.create_optimizer_v2(model, "ortho_adamw", ..., ortho_decay=...)``, and therefore
  timm's ``train.py --opt ortho_adamw --opt-kwargs ortho_decay=1e-4 modulation=True``: importing
  :mod:`timm_ortho` registers an ``ortho_<name>`` entry for every optimizer in timm's registry
  (``timm.optim.list_optimizers("ortho_*")``); ``ortho_lookahead_<name>`` works too.

Either way timm builds the base optimizer exactly as it would without the prefix (its parameter
groups: ``no_weight_decay()``, ``layer_decay``, ``param_group_fn``, ``filter_bias_and_bn``), and
:class:`~timm_ortho.OrthoModulated` wraps it. The wrapper moves the regularized Conv/Linear weights of
any group that applies weight decay into a sibling group without it (all other group fields, e.g.
layer decay's ``lr_scale``, are kept), so the groups are timm's except that those weights get no L2.

timm parses an optimizer name by its last ``_``-separated word (``lookahead_adamw`` -> ``adamw``),
so a registered ``ortho_adamw`` entry alone would be built as plain AdamW. The registration therefore
also routes names that start with ``ortho_`` in the default registry's ``create_optimizer`` to this
module; every other name goes to timm unchanged.
"""

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer

from .defaults import DEFAULT_FORM, DEFAULT_MAX_GRAD_RATIO, DEFAULT_MODULATION, DEFAULT_ORTHO_DECAY
from .optim import OrthoModulated

__all__ = [
    "ORTHO_OPTIONS",
    "ORTHO_PREFIX",
    "create_optimizer",
    "create_ortho_optimizer",
    "register_timm_optimizers",
]

ORTHO_PREFIX = "ortho_"

# Keyword arguments that configure OrthoModulated; every other one goes to timm and the base optimizer.
ORTHO_OPTIONS = (
    "ortho_decay",
    "max_grad_ratio",
    "form",
    "modulation",
    "weight_decay_policy",
    "include",
    "exclude",
    "skip_stem",
    "skip_classifier",
    "include_depthwise",
    "targets",
)

_SPLIT_WARNING = "OrthoModulated: the orthonormality term replaces weight decay"


def _is_ortho(opt: str) -> bool:
    return ORTHO_PREFIX.rstrip("_") in opt.lower().split("_")


def _base_name(opt: str) -> str:
    """``ortho_lookahead_adamw`` -> ``lookahead_adamw``; names without the prefix pass unchanged."""
    name = opt.lower()
    if name.startswith(ORTHO_PREFIX):
        name = name[len(ORTHO_PREFIX) :]
    if ORTHO_PREFIX.rstrip("_") in name.split("_"):
        raise ValueError(
            f"optimizer name {opt!r}: 'ortho' must come first (e.g. 'ortho_lookahead_adamw'); "
            "OrthoModulated wraps the whole base optimizer, Lookahead included"
        )
    return name


def _wrap(base: Optimizer, model: nn.Module, options: dict[str, Any]) -> OrthoModulated:
    """``OrthoModulated(base, model, **options)``; the wrapper's INFO line reports what it did.

    The split of timm's decayed groups is what this factory asks for, so the wrapper's warning (meant
    for users who passed decayed groups by hand) is silenced here; the INFO line counts the weights.
    """
    unknown = sorted(set(options) - set(ORTHO_OPTIONS))
    if unknown:
        raise TypeError(f"unknown OrthoModulated option(s) {unknown}; expected some of {list(ORTHO_OPTIONS)}")
    options.setdefault("ortho_decay", DEFAULT_ORTHO_DECAY)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SPLIT_WARNING, category=UserWarning)
        return OrthoModulated(base, model, **options)


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
        ortho_decay, modulation, max_grad_ratio, form: see :class:`~timm_ortho.OrthoModulated`.
        target_kwargs: ``include``, ``exclude``, ``skip_stem``, ... (see :func:`~timm_ortho.find_targets`),
            or ``targets`` (an already-found list), and ``weight_decay_policy``.
        **timm_kwargs: everything else ``create_optimizer_v2`` takes (``layer_decay``,
            ``param_group_fn``, ``filter_bias_and_bn``, ``foreach``, ``betas``, ``eps``, ...).
    """
    from timm.optim import create_optimizer_v2

    if not isinstance(model, nn.Module):
        raise TypeError(f"create_optimizer needs the model (an nn.Module), got {type(model).__name__}")
    name = _base_name(opt)
    base = create_optimizer_v2(
        model, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum, **timm_kwargs
    )
    options = {
        "ortho_decay": ortho_decay,
        "modulation": modulation,
        "max_grad_ratio": max_grad_ratio,
        "form": form,
        **(target_kwargs or {}),
    }
    return _wrap(base, model, options)


create_ortho_optimizer = create_optimizer  # the name of releases before 0.2


def _ortho_aware(create: Callable[..., Optimizer]) -> Callable[..., Optimizer]:
    """The registry's ``create_optimizer``, with ``ortho_*`` names built by this module."""

    @functools.wraps(create)
    def create_optimizer(model_or_params: Any, opt: str, *args: Any, **kwargs: Any) -> Optimizer:
        if not _is_ortho(opt):
            return create(model_or_params, opt, *args, **kwargs)
        if not isinstance(model_or_params, nn.Module):
            raise ValueError(
                f"optimizer {opt!r} regularizes a model's Conv/Linear weights and hooks its layers: pass "
                "the model to create_optimizer_v2, not a list of parameters or param groups"
            )
        options = {k: kwargs.pop(k) for k in ORTHO_OPTIONS if k in kwargs}
        name = _base_name(opt)
        base = create(model_or_params, name, *args, **kwargs)
        return _wrap(base, model_or_params, options)

    create_optimizer._timm_ortho = True  # type: ignore[attr-defined]  (marks the patch: install once)
    return create_optimizer


def register_timm_optimizers() -> list[str]:
    """Register ``ortho_<name>`` for every optimizer of timm's default registry; returns the new names.

    Idempotent. The entries keep the base optimizer's ``OptimInfo`` (class, flags, defaults) with
    the name and description changed; build them through ``create_optimizer_v2(model, ...)``.
    """
    from timm.optim import _optim_factory

    registry = _optim_factory.default_registry
    existing = registry.list_optimizers()
    added = []
    for name in existing:
        ortho_name = ORTHO_PREFIX + name
        if _is_ortho(name) or ortho_name in existing:
            continue
        info = registry.get_optimizer_info(name)
        registry.register(
            dataclasses.replace(
                info,
                name=ortho_name,
                description=f"{info.description}; wrapped in timm_ortho.OrthoModulated "
                "(orthonormality regularizer in place of weight decay on conv/linear weights)",
            )
        )
        added.append(ortho_name)
    if not getattr(registry.create_optimizer, "_timm_ortho", False):
        # An instance attribute: only the default registry (what create_optimizer_v2 uses) changes.
        registry.create_optimizer = _ortho_aware(registry.create_optimizer)
    return added
