"""``OrthoModulated``: the optimizer wrapper that applies the method to a model.

It wraps any ``torch.optim.Optimizer`` and, inside ``step()``, adds the orthonormality gradient

    dR/dW = 2 * ortho_decay * (Wg Wg^T - I) Wg          (per orthonormalized group Wg)

to every target weight's gradient ("coupled", for SGD-like optimizers) or applies it to the weight
itself scaled by the learning rate before the base update ("decoupled", for adaptive optimizers, the
way AdamW decouples weight decay):

    W <- W - lr * 2 * ortho_decay * (Wg Wg^T - I) Wg

It shares the base optimizer's ``param_groups``, ``state`` and ``defaults`` (as timm's ``Lookahead``
does), keeps its own settings as param-group fields, composes the step bound
(:mod:`timm_ortho.step_bound`) and owns the :class:`~timm_ortho.modulation.ErrorModulation` whose
hooks rescale the backward error. Every change to a gradient happens inside ``step()``, so the
wrapper composes with ``GradScaler.step`` (it sees unscaled gradients and never runs on a skipped
step), with clipping after ``unscale_``, with ``accelerator.prepare`` and ``accelerator.accumulate``.

The weights it regularizes must get no L2 decay from the base optimizer (the term replaces it): build
the base optimizer's groups with :func:`param_groups_for_ortho` or use
:func:`timm_ortho.create_optimizer`; a decayed target is refused with that advice.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .batched import BatchedOrthonormality
from .chain import ChainCheck, check_plain_chain
from .checks import (
    check_base_optimizer,
    check_bound_options,
    check_decay,
    check_groups,
    check_modulation,
    check_owned_without_decay,
    check_ratio,
    check_same_groups,
    trainable_targets,
)
from .defaults import (  # re-exported: callers import the defaults from here too
    DEFAULT_FORM,
    DEFAULT_MAX_GRAD_RATIO,
    DEFAULT_MODULATION,
    DEFAULT_ORTHO_DECAY,
    MODULATION_PRESETS,
    max_grad_ratio_for,
)
from .forms import resolve_form
from .groups import param_groups_for_ortho
from .step_bound import GradientAverages, bound_gradients_, group_ratio
from .targets import FilterBank

__all__ = [
    "DEFAULT_MAX_GRAD_RATIO",
    "DEFAULT_MODULATION",
    "DEFAULT_ORTHO_DECAY",
    "OrthoModulated",
    "param_groups_for_ortho",
]

Form = Literal["auto", "coupled", "decoupled"]

_log = logging.getLogger("timm_ortho")
# The wrapper's settings, kept as fields of every param group (besides "ortho_step", its step count).
GROUP_FIELDS = ("ortho_decay", "max_grad_ratio", "bound_momentum", "bound_reference_lr")
_WRAPPER = "_timm_ortho_wrapper"  # the base optimizer's attribute: a weak reference to its wrapper


class OrthoModulated(Optimizer):
    """Orthonormality regularizer (replacing L2 weight decay) and error modulation for a model.

    Args:
        optimizer: the base optimizer; it must own every trainable target weight and give none of
            them weight decay (:func:`param_groups_for_ortho` builds such groups).
        model: the model whose Conv/Linear weights are regularized (see :func:`find_targets`).
        ortho_decay: ``lambda`` of ``R = lambda/2 * sum ||Wg Wg^T - I||_F^2``. Stored as the
            param-group field ``"ortho_decay"`` so schedulers and per-group settings can change it.
        form: ``"coupled"`` adds ``dR/dW`` to the gradient; ``"decoupled"`` applies it to the weight
            scaled by the lr. ``"auto"`` follows the optimizer's kind (:mod:`timm_ortho.forms`):
            coupled for SGD-like updates (SGD, LARS, L-BFGS, ...), decoupled for adaptive ones (the Adam
            family, RMSprop, Adagrad, Adafactor, Lion, ...).
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
        max_grad_ratio: the step bound (:mod:`timm_ortho.step_bound`): inside ``step()``, every target
            weight's step from the gradient is limited to ``max_grad_ratio * ||W_l||_F`` of its
            gradient norm, the orthonormality term included (coupled: the sum is bounded; decoupled:
            the term's update ``lr * dR/dW`` is bounded to ``lr * max_grad_ratio * ||W_l||`` on its
            own, as the gradient is). It bounds the relative change of each filter bank and keeps
            the cubic term in check when a weight's scale has grown. ``"auto"`` (default): on a
            plain chain ``1 / L`` for ``L`` target layers
            (:func:`timm_ortho.defaults.max_grad_ratio_for`), no bound on any other model (it slows
            models with shortcuts, which do not need it). ``None`` turns it off. Stored, as a number
            or None, as the param-group field ``"max_grad_ratio"``.
        bound_momentum: ``None`` (default): the bound measures each step's gradient. A number ``beta``
            in (0, 1): it measures the running average ``a_l <- beta a_l + (1 - beta) g_l`` instead,
            so that a small batch's sampling noise does not tighten it (:mod:`timm_ortho.step_bound`;
            the averages are saved in the state dict). Param-group field ``"bound_momentum"``.
            Measured on plain_cnn110: 0.9 helps at batch 32 and lr 0.02 and fails at lr 0.1, where
            the default bound trains (docs/optimizer.md, "The step bound").
        bound_reference_lr: ``None`` (default): the bound holds the gradient to ``max_grad_ratio``.
            A learning rate ``lr_ref``: it holds the step instead, ``lr * ||g_l|| <= lr_ref *
            max_grad_ratio * ||W_l||`` at the group's current ``lr`` (the bound measured at ``lr_ref``,
            whatever the lr and its schedule). Param-group field ``"bound_reference_lr"``.

    Target weights with ``requires_grad=False`` are ignored. ``step(closure)`` works with every
    closure optimizer (L-BFGS re-evaluates it): the term and the bound act on the gradients of each
    evaluation, and in the coupled form the closure's value is returned as ``loss + R``, the
    objective whose gradient the base optimizer sees.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        *,
        ortho_decay: float = DEFAULT_ORTHO_DECAY,
        form: Form = DEFAULT_FORM,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        skip_stem: bool = False,
        skip_classifier: bool = False,
        include_depthwise: bool = False,
        modulation: bool | str | dict[str, Any] | Any = DEFAULT_MODULATION,
        max_grad_ratio: float | Literal["auto"] | None = DEFAULT_MAX_GRAD_RATIO,
        bound_momentum: float | None = None,
        bound_reference_lr: float | None = None,
        targets: Sequence[FilterBank] | None = None,
    ) -> None:
        # super().__init__() is not called on purpose: params, groups and state stay the base's.
        check_base_optimizer(optimizer, OrthoModulated, _WRAPPER)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be the nn.Module whose weights the optimizer trains, got {type(model).__name__}"
                + (" (its parameters?): pass the model itself" if not isinstance(model, Optimizer) else "")
            )
        check_decay(ortho_decay)
        if max_grad_ratio != "auto":
            check_ratio(max_grad_ratio)
        check_bound_options(bound_momentum, bound_reference_lr)
        check_modulation(modulation)
        self.form: Literal["coupled", "decoupled"] = resolve_form(optimizer, form)

        self._init_hooks()
        self.base_optimizer = optimizer

        selection = dict(
            include=include, exclude=exclude, skip_stem=skip_stem, skip_classifier=skip_classifier
        )
        self.targets: list[FilterBank] = trainable_targets(model, targets, selection, include_depthwise)
        self._target_index = {id(t.param): i for i, t in enumerate(self.targets)}
        check_owned_without_decay(self.targets, self.base_optimizer.param_groups)

        max_grad_ratio, modulation = self._resolve_auto(model, max_grad_ratio, modulation)

        self.defaults.update(ortho_decay=ortho_decay, ortho_step=0, max_grad_ratio=max_grad_ratio)
        self.defaults.update(bound_momentum=bound_momentum, bound_reference_lr=bound_reference_lr)
        self.bound_averages = GradientAverages()
        for group in self.param_groups:
            self._fill_group_fields(group)
        self._batched = BatchedOrthonormality(self.targets)
        self.modulation = self._make_modulation(model, modulation)
        self._sync_modulation_step()
        setattr(optimizer, _WRAPPER, weakref.ref(self))
        _log.info("%s", self.summary(type(model).__name__))

    def _init_hooks(self) -> None:
        """What ``Optimizer.__init__`` (not called: the containers are the base's) sets up for hooks."""
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()

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
    def _resolve_auto(self, model: nn.Module, max_grad_ratio: Any, modulation: Any) -> tuple[Any, Any]:
        """The ``"auto"`` settings, which depend on whether the model is a plain chain (one traced
        forward decides, kept as :attr:`chain`)."""
        settings = {"max_grad_ratio": max_grad_ratio, "modulation": modulation}
        auto = [name for name, value in settings.items() if isinstance(value, str) and value == "auto"]
        self.chain: ChainCheck | None = check_plain_chain(model) if auto else None
        plain = self.chain is not None and self.chain.plain
        if max_grad_ratio == "auto":
            max_grad_ratio = max_grad_ratio_for(len(self.targets)) if plain else None
        if modulation == "auto":  # a chain needs two layers below the classifier for the rule to act
            chained = sum(t.role != "classifier" for t in self.targets) > 1
            modulation = "top" if plain and chained else False
        return max_grad_ratio, modulation

    def _fill_group_fields(self, group: dict[str, Any], step: int = 0) -> None:
        """Give a param group the wrapper's fields it lacks (a new group, or one saved without them)."""
        for key in GROUP_FIELDS:
            group.setdefault(key, self.defaults.get(key))
        group.setdefault("ortho_step", step)

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

    def _selected(self, key: Callable[[dict[str, Any]], Any]) -> tuple[list[int], list[Any]]:
        """Indices of the targets with a gradient, and ``key(group)`` of each one's group."""
        selected, values = [], []
        for group in self.param_groups:
            value = key(group)
            if value is None:
                continue
            for p in group["params"]:
                i = self._target_index.get(id(p))
                if i is not None and p.grad is not None:
                    selected.append(i)
                    values.append(value)
        return selected, values

    @torch.no_grad()
    def apply_orthonormality(self) -> None:
        """Add the orthonormality term to the grads (coupled) or weights (decoupled); called by step().

        Decoupled, the update ``-lr * dR/dW`` is bounded like a gradient before it is applied:
        ``||lr * dR/dW|| <= lr * max_grad_ratio * ||W||`` (where the group has a bound).
        """
        decoupled = self.form == "decoupled"

        def coefficient(group: dict[str, Any]) -> float | None:
            if group["ortho_decay"] == 0:
                return None
            # Decoupled: W <- W - lr * dR/dW; coupled: grad <- grad + dR/dW.
            return (
                -2.0 * group["ortho_decay"] * float(group["lr"]) if decoupled else 2.0 * group["ortho_decay"]
            )

        selected, coefficients = self._selected(coefficient)
        if not selected:
            return
        params = [self.targets[i].param for i in selected]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("OrthoModulated does not support sparse gradients on target weights")
        products = self._batched.residual_products(selected, coefficients, reuse_buffers=True)
        updates = [products[i] for i in selected]
        if decoupled:
            self._bound_decoupled(selected, updates)
        # float32 updates into half-precision grads or weights: foreach casts on the way in.
        torch._foreach_add_(params if decoupled else [p.grad for p in params], updates)

    def _bound_decoupled(self, selected: list[int], updates: list[Tensor]) -> None:
        """The step bound on the decoupled term's updates (``lr * ratio`` per group)."""
        bounded, limits = self._selected(
            lambda g: None if g["ortho_decay"] == 0 or (r := group_ratio(g)) is None else r * float(g["lr"])
        )
        if not bounded:
            return
        position = {i: k for k, i in enumerate(selected)}
        bound_gradients_(
            [self.targets[i].param for i in bounded], limits, grads=[updates[position[i]] for i in bounded]
        )

    @torch.no_grad()
    def bound_gradients(self) -> None:
        """Scale target gradients by ``min(1, max_grad_ratio * ||W_l|| / ||grad_l or a_l||)``; by step()."""
        selected, settings = self._selected(
            lambda g: None if (r := group_ratio(g)) is None else (r, g.get("bound_momentum"))
        )
        params = [self.targets[i].param for i in selected]
        grads = [p.grad for p in params]
        reference = self.bound_averages.update(selected, grads, [beta for _, beta in settings])
        bound_gradients_(params, [ratio for ratio, _ in settings], grads, reference)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """The orthonormality term, the step bound, then the base optimizer's update.

        Decoupled, the term moves the weights first (with a closure, the closure then sees the moved
        weights). Coupled, it is added to the gradients, which are then bounded; with a closure, to
        the gradients of every evaluation.
        """
        check_groups(self.param_groups)
        coupled = self.form == "coupled"
        if not coupled:
            self.apply_orthonormality()
        if closure is None:
            if coupled:
                self.apply_orthonormality()
            self.bound_gradients()
            loss = self.base_optimizer.step()
        else:
            loss = self.base_optimizer.step(self._wrap_closure(closure))
        for group in self.param_groups:
            group["ortho_step"] = group.get("ortho_step", 0) + 1
        self._sync_modulation_step()
        return loss

    def _wrap_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """The closure the base optimizer evaluates: the user's, then the method on its gradients.

        Coupled, every evaluation gets the term and returns ``loss + R``: L-BFGS' line search compares
        evaluations, whose values and gradients must be of the same objective.
        """

        def evaluate():
            with torch.enable_grad():
                loss = closure()
            if self.form == "coupled":
                self.apply_orthonormality()
                if loss is not None:
                    loss = loss + self.penalty().to(loss.device if isinstance(loss, Tensor) else "cpu")
            self.bound_gradients()
            return loss

        return evaluate

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        check_decay(param_group.get("ortho_decay", self.defaults["ortho_decay"]))  # before it is added
        step = self.ortho_step
        self.base_optimizer.add_param_group(param_group)
        self._fill_group_fields(self.param_groups[-1], step)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; the wrapper's own fields live in its param groups."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base_optimizer.state_dict()
        if self.bound_averages.averages:  # absent otherwise: the base optimizer's own state dict
            state["bound_averages"] = self.bound_averages.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state = post_hook(self, state) or state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this wrapper, or by the same base optimizer without it.

        The param groups must match (torch's rule): a state saved by an optimizer grouped another way
        (e.g. a bare SGD with weight decay on every parameter, one group) is refused with the reason.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        check_same_groups(state_dict, self.param_groups)
        state_dict = dict(state_dict)
        averages = state_dict.pop("bound_averages", {})
        self.bound_averages.check_loadable(averages, [t.param for t in self.targets])
        self.base_optimizer.load_state_dict(state_dict)
        self.bound_averages.load_state_dict(averages, [t.param for t in self.targets])
        for group in self.param_groups:
            self._fill_group_fields(group)
            check_decay(group["ortho_decay"])
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

    def summary(self, model_name: str = "the model") -> str:
        """One line: what the wrapper does to the model and, for "auto" settings, why."""
        ratio = self.defaults["max_grad_ratio"]
        decays = sorted({g["ortho_decay"] for g in self.param_groups})
        decay = decays[0] if len(decays) == 1 else decays
        parts = [
            f"OrthoModulated({type(self.base_optimizer).__name__}) on {model_name}: orthonormality term on "
            f"{len(self.targets)} conv/linear weights (ortho_decay={decay}, {self.form} form)"
        ]
        if self.chain is not None:
            parts.append(f"{'a' if self.chain.plain else 'not a'} plain chain ({self.chain.reason})")
        bound = f"step bound max_grad_ratio={ratio:.3g}" if ratio is not None else "no step bound"
        if ratio is not None:
            beta, lr_ref = self.defaults.get("bound_momentum"), self.defaults.get("bound_reference_lr")
            bound += "" if beta is None else f" on the gradients' running average (bound_momentum={beta})"
            bound += "" if lr_ref is None else f" on the step, as at lr {lr_ref} (bound_reference_lr)"
        mod = self.modulation
        rule = "no error modulation" if mod is None else f"error modulation on (reference={mod.reference!r})"
        parts.append(f"{bound}, {rule}")
        return "; ".join(parts)

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
        ratio = self.defaults["max_grad_ratio"]
        modulation = "off" if self.modulation is None else repr(self.modulation)
        return (
            f"{type(self).__name__} (\n{base}\n    targets: {len(self.targets)} weights, form: {self.form}, "
            f"ortho_decay: {decays[0] if len(decays) == 1 else decays}, "
            f"step bound: {'off' if ratio is None else ratio}, modulation: {modulation}\n)"
        )
