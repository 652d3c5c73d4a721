"""``OrthoModulated``: the optimizer wrapper that applies the method to a model.

It wraps any ``torch.optim.Optimizer`` and, inside ``step()``, adds the orthonormality gradient

    dR/dW = 2 * ortho_decay * (Wg Wg^T - I) Wg          (per orthonormalized group Wg)

to every target weight's gradient ("coupled", for SGD-like optimizers) or applies it to the weight
itself scaled by the learning rate before the base update ("decoupled", for adaptive optimizers, the
way AdamW decouples weight decay):

    W <- W - lr * 2 * ortho_decay * (Wg Wg^T - I) Wg

Optionally it owns an :class:`~timm_ortho.modulation.ErrorModulation` whose hooks rescale the
backward error, and drives its schedule with the number of real updates.

Because every change to a gradient happens inside ``step()``, the wrapper composes with
``GradScaler.step`` (it sees unscaled gradients and never runs on a skipped step), with clipping
after ``unscale_``, with ``accelerator.prepare`` and with ``accelerator.accumulate``.
"""

from __future__ import annotations

import gc
import logging
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .batched import BatchedOrthonormality
from .chain import ChainCheck, check_plain_chain
from .defaults import (  # re-exported: callers import the defaults from here too
    DEFAULT_FORM,
    DEFAULT_MAX_GRAD_RATIO,
    DEFAULT_MODULATION,
    DEFAULT_ORTHO_DECAY,
    MODULATION_PRESETS,
    max_grad_ratio_for,
)
from .forms import resolve_form
from .step_bound import bound_gradients_
from .targets import FilterBank, find_targets

__all__ = [
    "DEFAULT_MAX_GRAD_RATIO",
    "DEFAULT_MODULATION",
    "DEFAULT_ORTHO_DECAY",
    "OrthoModulated",
    "param_groups_for_ortho",
]

Form = Literal["auto", "coupled", "decoupled"]

_log = logging.getLogger("timm_ortho")


class OrthoModulated(Optimizer):
    """Orthonormality regularizer (replacing L2 weight decay) and error modulation for a model.

    Args:
        optimizer: the base optimizer; it must own every trainable target weight.
        model: the model whose Conv/Linear weights are regularized (see :func:`find_targets`).
        ortho_decay: ``lambda`` of ``R = lambda/2 * sum ||Wg Wg^T - I||_F^2``. Stored as the
            param-group field ``"ortho_decay"`` so schedulers and per-group settings can change it.
        form: ``"coupled"`` adds ``dR/dW`` to the gradient; ``"decoupled"`` applies it to the weight
            scaled by the lr. ``"auto"`` follows the optimizer's kind (:mod:`timm_ortho.forms`):
            coupled for SGD-like updates (SGD, LARS, ...), decoupled for adaptive ones (the Adam
            family, RMSprop, Adagrad, Adafactor, Lion, ...).
        weight_decay_policy: target weights must not also receive L2 decay. ``"split"`` moves them
            into sibling param groups with ``weight_decay=0`` and warns; ``"error"`` raises instead.
        include, exclude, skip_stem, skip_classifier, include_depthwise: which weights are targets,
            see :func:`~timm_ortho.targets.find_targets`.
        targets: the :class:`~timm_ortho.targets.FilterBank` list, when the caller has already found
            it (so that the model is walked once); then the selection options above must stay unset.
        modulation: ``"auto"`` (default): the ``"top"`` rule on a plain chain, off on any other model
            (:mod:`timm_ortho.chain` decides; one INFO line on the ``timm_ortho`` logger says which).
            ``True`` or ``"top"``: the library's rule (every layer against the top of the chain);
            ``"paper"``: the paper's consecutive-layer rule (:data:`timm_ortho.defaults.MODULATION_PRESETS`);
            a dict of :class:`~timm_ortho.modulation.ErrorModulation` options; an ``ErrorModulation``;
            ``False`` or ``None``: off.
        max_grad_ratio: the step bound. Inside ``step()``, after the orthonormality term is added,
            every target weight's gradient is scaled down where needed so that
            ``||grad_l||_F <= max_grad_ratio * ||W_l||_F`` (per layer; a layer-wise adaptive gradient
            clip). It bounds the *relative* change of each filter bank, which is what matters for
            weights followed by BatchNorm (scale-invariant), and it keeps the cubic orthonormality
            gradient from running away when a weight's scale has grown. ``"auto"`` (default): on a
            plain chain ``min(0.01, 1 / L)`` for ``L`` target layers
            (:func:`timm_ortho.defaults.max_grad_ratio_for`: deeper chains need smaller per-layer
            steps), no bound on any other model (it slows models with shortcuts, which do not need
            it). ``None`` turns it off. Stored, as a number or None, as the param-group field
            ``"max_grad_ratio"``.

    Target weights with ``requires_grad=False`` are ignored.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        *,
        ortho_decay: float = DEFAULT_ORTHO_DECAY,
        form: Form = DEFAULT_FORM,
        weight_decay_policy: Literal["split", "error"] = "split",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        skip_stem: bool = False,
        skip_classifier: bool = False,
        include_depthwise: bool = False,
        modulation: bool | str | dict[str, Any] | Any = DEFAULT_MODULATION,
        max_grad_ratio: float | Literal["auto"] | None = DEFAULT_MAX_GRAD_RATIO,
        targets: Sequence[FilterBank] | None = None,
    ) -> None:
        # super().__init__() is not called on purpose: params, groups and state stay the base's.
        if isinstance(optimizer, OrthoModulated):
            raise ValueError(
                "the optimizer is already wrapped by OrthoModulated; wrap the base optimizer once"
            )
        if type(optimizer).__module__.startswith("accelerate"):
            raise ValueError(
                "the optimizer was already passed through accelerator.prepare(); wrap the bare optimizer "
                "first, then prepare the wrapper: accelerator.prepare(model, OrthoModulated(opt, model), ...)"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_decay(ortho_decay)
        if max_grad_ratio != "auto":
            _check_ratio(max_grad_ratio)
        _check_modulation(modulation)
        self.form: Literal["coupled", "decoupled"] = resolve_form(optimizer, form)
        if weight_decay_policy not in ("split", "error"):
            raise ValueError(f"weight_decay_policy must be 'split' or 'error', got {weight_decay_policy!r}")

        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()
        _check_unwrapped(optimizer)  # before anything of the base optimizer changes
        self.base_optimizer = optimizer

        selection = dict(
            include=include, exclude=exclude, skip_stem=skip_stem, skip_classifier=skip_classifier
        )
        self.targets: list[FilterBank] = _trainable_targets(model, targets, selection, include_depthwise)
        self._check_owned()
        self._target_index = {id(t.param): i for i, t in enumerate(self.targets)}
        self._separate_weight_decay(weight_decay_policy)

        # "auto" settings depend on whether the model is a plain chain: one traced forward decides.
        settings = {"max_grad_ratio": max_grad_ratio, "modulation": modulation}
        auto = [name for name, value in settings.items() if isinstance(value, str) and value == "auto"]
        self.chain: ChainCheck | None = check_plain_chain(model) if auto else None
        plain = self.chain is not None and self.chain.plain
        if max_grad_ratio == "auto":
            max_grad_ratio = max_grad_ratio_for(len(self.targets)) if plain else None
        if modulation == "auto":  # a chain needs two layers below the classifier for the rule to act
            chained = sum(t.role != "classifier" for t in self.targets) > 1
            modulation = "top" if plain and chained else False
        self.defaults.update(ortho_decay=ortho_decay, ortho_step=0, max_grad_ratio=max_grad_ratio)
        for group in self.param_groups:
            self._fill_group_fields(group)
        self._batched = BatchedOrthonormality(self.targets)
        self.modulation = self._make_modulation(model, modulation)
        self._sync_modulation_step()
        _WRAPPED[optimizer] = weakref.ref(self)
        _log.info("%s", self._summary(type(model).__name__))

    def _summary(self, model_name: str) -> str:
        """The one line that says what the wrapper does to the model and, for "auto" settings, why."""
        ratio = self.defaults["max_grad_ratio"]
        decays = sorted({g["ortho_decay"] for g in self.param_groups})
        decay = decays[0] if len(decays) == 1 else decays
        removed = f"; weight decay removed from {self._undecayed} of them" if self._undecayed else ""
        parts = [
            f"OrthoModulated({type(self.base_optimizer).__name__}) on {model_name}: orthonormality term on "
            f"{len(self.targets)} conv/linear weights (ortho_decay={decay}, "
            f"{self.form} form{removed})"
        ]
        if self.chain is not None:
            parts.append(f"{'a' if self.chain.plain else 'not a'} plain chain ({self.chain.reason})")
        bound = f"step bound max_grad_ratio={ratio:.3g}" if ratio is not None else "no step bound"
        mod = self.modulation
        rule = (
            f"error modulation on (reference={mod.reference!r})" if mod is not None else "no error modulation"
        )
        parts.append(f"{bound}, {rule}")
        return "; ".join(parts)

    # -- sharing the base optimizer's containers ------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.base_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    # -- construction helpers -------------------------------------------------------------------
    def _check_owned(self) -> None:
        owned = {id(p) for g in self.base_optimizer.param_groups for p in g["params"]}
        missing = [t.name for t in self.targets if id(t.param) not in owned]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"the optimizer does not own {len(missing)} target weight(s) of the model: {shown}. Build "
                "the optimizer from this model's parameters, or leave these weights out with exclude=[...]."
            )

    def _separate_weight_decay(self, policy: str) -> None:
        """Make sure no target weight also gets L2 decay from the base optimizer."""
        groups = self.base_optimizer.param_groups
        rebuilt: list[dict[str, Any]] = []
        changed: list[str] = []
        self._undecayed = 0  # target weights whose weight decay was removed (for the summary line)
        for gi, group in enumerate(groups):
            targets = [p for p in group["params"] if id(p) in self._target_index]
            if not targets or not group.get("weight_decay", 0.0):
                rebuilt.append(group)
                continue
            if policy == "error":
                raise ValueError(
                    f"param group {gi} applies weight_decay={group['weight_decay']} to {len(targets)} target "
                    "weight(s); the orthonormality term replaces weight decay on them. Set weight_decay=0 "
                    "for those weights (timm_ortho.param_groups_for_ortho builds such groups), or use "
                    "weight_decay_policy='split'."
                )
            others = [p for p in group["params"] if id(p) not in self._target_index]
            changed.append(f"group {gi} ({len(targets)} weights, weight_decay={group['weight_decay']})")
            self._undecayed += len(targets)
            if others:
                group["params"] = others
                rebuilt.extend([group, {**group, "params": targets, "weight_decay": 0.0}])
            else:
                group["weight_decay"] = 0.0
                rebuilt.append(group)
        if changed:
            groups[:] = rebuilt  # in place: anything holding the list sees the new groups
            warnings.warn(
                "OrthoModulated: the orthonormality term replaces weight decay on its target weights, so "
                "their weight_decay was set to 0 in: " + "; ".join(changed) + ". Other parameters keep "
                "their weight decay. Create LR schedulers after wrapping.",
                stacklevel=3,
            )

    def _fill_group_fields(self, group: dict[str, Any], step: int = 0) -> None:
        """Give a param group the wrapper's fields it lacks (a new group, or one saved without them)."""
        group.setdefault("ortho_decay", self.defaults["ortho_decay"])
        group.setdefault("ortho_step", step)
        group.setdefault("max_grad_ratio", self.defaults["max_grad_ratio"])

    def _make_modulation(self, model: nn.Module, modulation: bool | str | dict[str, Any] | Any):
        if modulation is False or modulation is None:
            return None
        from .modulation import ErrorModulation

        if isinstance(modulation, ErrorModulation):
            return modulation
        if modulation is True:
            modulation = "top"
        options = MODULATION_PRESETS[modulation] if isinstance(modulation, str) else modulation
        return ErrorModulation(model, targets=self.targets, **options)

    def _sync_modulation_step(self) -> None:
        if self.modulation is not None:
            self.modulation.set_step(self.ortho_step)

    # -- the step -------------------------------------------------------------------------------
    @property
    def ortho_step(self) -> int:
        """Number of real updates done (steps skipped by a GradScaler do not count)."""
        return self.param_groups[0]["ortho_step"] if self.param_groups else 0

    @torch.no_grad()
    def apply_orthonormality(self) -> None:
        """Add the orthonormality term to the grads (coupled) or weights (decoupled); called by step()."""
        selected: list[int] = []
        coefficients: list[float] = []
        for group in self.param_groups:
            decay = group["ortho_decay"]
            if decay == 0:
                continue
            # Decoupled: W <- W - lr * dR/dW; coupled: grad <- grad + dR/dW.
            coefficient = -2.0 * decay * float(group["lr"]) if self.form == "decoupled" else 2.0 * decay
            for p in group["params"]:
                i = self._target_index.get(id(p))
                if i is not None and p.grad is not None:
                    selected.append(i)
                    coefficients.append(coefficient)
        if not selected:
            return
        params = [self.targets[i].param for i in selected]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("OrthoModulated does not support sparse gradients on target weights")
        products = self._batched.residual_products(selected, coefficients, reuse_buffers=True)
        updates = [products[i] for i in selected]
        # float32 updates into half-precision grads or weights: foreach casts on the way in.
        destinations = params if self.form == "decoupled" else [p.grad for p in params]
        torch._foreach_add_(destinations, updates)

    @torch.no_grad()
    def bound_gradients(self) -> None:
        """Scale target gradients so that ``||grad_l|| <= max_grad_ratio * ||W_l||``; called by step().

        Each group's ``max_grad_ratio`` for its target weights, all layers in one call of
        :func:`~timm_ortho.step_bound.bound_gradients_` (foreach norms, no host sync).
        """
        params: list[Tensor] = []
        ratios: list[float] = []
        for group in self.param_groups:
            ratio = group.get("max_grad_ratio")
            if ratio is None:
                continue
            for p in group["params"]:
                if id(p) in self._target_index and p.grad is not None:
                    params.append(p)
                    ratios.append(ratio)
        bound_gradients_(params, ratios)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Apply the orthonormality term, bound the target gradients, then the base optimizer's update."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_groups(self.param_groups)
        self.apply_orthonormality()
        self.bound_gradients()
        self.base_optimizer.step()
        for group in self.param_groups:
            group["ortho_step"] = group.get("ortho_step", 0) + 1
        self._sync_modulation_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_decay(param_group.get("ortho_decay", self.defaults["ortho_decay"]))  # before it is added
        step = self.ortho_step
        self.base_optimizer.add_param_group(param_group)
        self._fill_group_fields(self.param_groups[-1], step)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; the wrapper's own fields live in its param groups."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base_optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state = post_hook(self, state) or state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved with or without the wrapper."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        self.base_optimizer.load_state_dict(state_dict)
        for group in self.param_groups:
            self._fill_group_fields(group)
            _check_decay(group["ortho_decay"])
        self._sync_modulation_step()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # -- what users read ------------------------------------------------------------------------
    @torch.no_grad()
    def penalty(self, squared_residuals: Tensor | None = None) -> torch.Tensor:
        """``R = sum_l ortho_decay_l / 2 * ||Wg Wg^T - I||_F^2`` over all targets, a 0-d tensor.

        Computed from scratch (one matmul per shape) unless ``squared_residuals``, the per-layer
        ``||Wg Wg^T - I||_F^2`` aligned with :attr:`targets`, is given: a caller that has just
        measured them (``timm_ortho.diagnostics.layer_penalties(opt.targets)``) passes them to avoid
        a second pass. No host sync; call it when logging.
        """
        if squared_residuals is None:
            squared = self._batched.squared_residuals()
        elif squared_residuals.shape != (len(self.targets),):
            raise ValueError(
                f"squared_residuals must hold one value per target ({len(self.targets)}), "
                f"got shape {tuple(squared_residuals.shape)}"
            )
        else:
            squared = squared_residuals
        decay = torch.zeros(len(self.targets), dtype=squared.dtype)
        for group in self.param_groups:
            for p in group["params"]:
                i = self._target_index.get(id(p))
                if i is not None:
                    decay[i] = group["ortho_decay"]
        return 0.5 * (squared * decay.to(squared.device)).sum()

    def remove_hooks(self) -> None:
        """Remove the modulation hooks from the model (the regularizer keeps working)."""
        if self.modulation is not None:
            self.modulation.remove()

    @property
    def is_second_order(self) -> bool:
        return getattr(self.base_optimizer, "is_second_order", False)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        base = "\n".join("    " + line for line in repr(self.base_optimizer).splitlines())
        decays = sorted({g["ortho_decay"] for g in self.param_groups})
        return (
            f"{type(self).__name__} (\n{base}\n    targets: {len(self.targets)} weights, form: {self.form}, "
            f"ortho_decay: {decays[0] if len(decays) == 1 else decays}, "
            f"modulation: {self.modulation!r}\n)"
        )


def _trainable_targets(
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


def _check_modulation(value: Any) -> None:
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


def _check_ratio(value: float | None, where: str = "") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(
            f"{where}max_grad_ratio must be None (no step bound), 'auto' (min(0.01, 1/L) for L target "
            f"layers; only when wrapping) or a finite number > 0, got {value!r}"
        )


def _check_decay(value: float, where: str = "") -> None:
    # `not 0 <= value < inf` is also true for NaN.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(
            f"{where}ortho_decay must be a finite, non-negative number (0 turns the term off), got {value!r}"
        )


def _check_groups(groups: list[dict[str, Any]]) -> None:
    """The method's fields of every param group, checked on the host before each step.

    A scheduler or user code may change them after wrapping; a NaN, infinite, negative or non-numeric
    value would otherwise poison the weights at the next step. Python-float comparisons only: no
    tensor is read, so no host-device synchronization.
    """
    for i, group in enumerate(groups):
        where = f"param group {i}: "
        _check_decay(group.get("ortho_decay", 0.0), where)
        _check_ratio(group.get("max_grad_ratio"), where)


# Base optimizer -> its live wrapper: a second OrthoModulated around the same optimizer would add the
# term twice and split its groups again. Weak on both sides: a discarded wrapper frees its base.
_WRAPPED: weakref.WeakKeyDictionary[Optimizer, weakref.ref[OrthoModulated]] = weakref.WeakKeyDictionary()


def _check_unwrapped(base: Optimizer) -> None:
    def live() -> OrthoModulated | None:
        ref = _WRAPPED.get(base)
        return None if ref is None else ref()

    if live() is not None:
        gc.collect()  # a discarded wrapper still held in a reference cycle is not a live one
    if live() is not None:
        raise ValueError(
            f"this {type(base).__name__} is already wrapped by an OrthoModulated; wrap a base optimizer "
            "once (build a new base optimizer for a second wrapper)"
        )


def param_groups_for_ortho(
    model: nn.Module,
    weight_decay: float = 0.0,
    targets: Iterable[FilterBank] | None = None,
    **target_kwargs: Any,
) -> list[dict[str, Any]]:
    """Param groups for a base optimizer in which no target weight gets L2 decay.

    Three groups (empty ones left out): the target weights with ``weight_decay=0`` (the
    orthonormality term replaces decay on them), the other parameters timm's
    ``param_groups_weight_decay`` decays (e.g. 2-D embeddings) with ``weight_decay``, and those it
    leaves without decay (1-D parameters, biases, the model's ``no_weight_decay()`` names).
    """
    from timm.optim import param_groups_weight_decay

    banks = list(targets) if targets is not None else find_targets(model, **target_kwargs)
    ids = {id(t.param) for t in banks}
    no_decay_names = getattr(model, "no_weight_decay", lambda: set())()
    ortho = [p for p in model.parameters() if p.requires_grad and id(p) in ids]
    decayed: list[nn.Parameter] = []
    flat: list[nn.Parameter] = []
    # timm sorts the parameters (weight_decay=1 only marks its decayed group); targets are taken out.
    for group in param_groups_weight_decay(model, 1.0, no_weight_decay_list=no_decay_names):
        (decayed if group["weight_decay"] else flat).extend(p for p in group["params"] if id(p) not in ids)
    groups = [
        {"params": ortho, "weight_decay": 0.0},
        {"params": decayed, "weight_decay": weight_decay},
        {"params": flat, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
