"""Backward error modulation (Xie, Xiong & Pu, CVPR 2017, Sec. 3.3): one autograd Function per target.

During backward, the error ``e_l = dL/dy_l`` at the output ``y_l`` of every target layer (the
parametric layers of :func:`~timm_ortho.targets.find_targets`, the classifier left out by default) is
measured by its norm and rescaled where its magnitude leaves a band around a reference; the rule and
its equations are in :mod:`timm_ortho.modulation_rule`. This module applies it, in eager mode and
under ``torch.compile`` alike, with one autograd Function
(:class:`~timm_ortho.modulation_function.Modulate`) that a forward hook puts on each target's output:

- forward, per target: ``(y, t) -> (y, t')``. The output passes unchanged (eager: the very tensor,
  declared modified in place, so nothing is copied; compiling: a copy, which inductor fuses), and a
  small *token* ``t`` is threaded from each target to the next in forward order.
- backward, per target: the gradient of the token is the chain's *state*, one row
  ``[norm, ref, log s]`` per target. A layer reads the reference norm the layer above it wrote (the
  top reads zeros: no reference), takes one norm of its error, applies the rule, writes its row and
  multiplies its error by ``s``. The token also orders the layers: each waits for the one above it.
- below the bottom target the state is the record of that backward. Eager: the bottom's backward
  publishes it. Compiled: it is the gradient of a leaf (the *sink*) whose post-accumulate-grad hook
  publishes it. :meth:`ErrorModulation.last_stats` builds :class:`ModulationStats` from it.

This module is the glue: the hooks that build the chain in forward (one per root forward, plus the
chains of target calls outside it: a checkpoint's recompute, a submodule called directly), the sink,
and the statistics. The Function and its state are :mod:`timm_ortho.modulation_function`.
docs/modulation.md describes the data flow, the ops per layer and the limits.
"""

from __future__ import annotations

import difflib
import functools
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .modulation_function import ROW, Chain, EagerLink, Modulate, Record, Rule, Splice, stats
from .modulation_rule import (
    DEFAULT_BAND,
    DEFAULT_MODE,
    DEFAULT_REFERENCE,
    STATISTICS,
    Mode,
    ModulationStats,
    Reference,
    Statistic,
    check_reference,
    check_rule,
    scale_factor,
    simulate_chain,
)
from .ortho import compute_dtype
from .targets import FilterBank, find_targets

Schedule = int | Callable[[int], bool] | None

__all__ = [
    "ErrorModulation",
    "Mode",
    "ModulationStats",
    "Reference",
    "Schedule",
    "Statistic",
    "scale_factor",
    "simulate_chain",
]


class ErrorModulation:
    """Backward error modulation on a model's target layers (one autograd Function per target call).

    Args:
        model: the root module. Each of its forwards starts a new chain; call this module (not only
            a submodule) so that chains are told apart.
        band: the quasi-isometry constant ``A >= 1``; ratios ``q_ref / q`` inside ``[A^-2, A^2]`` are
            left alone. ``band=1`` rescales every layer to the moment above it.
        mode: ``"clamp"`` rescales to the edge of the band, ``"match"`` to equality (the paper).
        statistic: ``"total"`` (sum of squares, the default: an orthonormal map preserves norms, and
            a per-element mean jumps with ``numel`` at stride and width changes) or ``"mean"``.
        include_classifier: put classifier-role targets in the chain (then the classifier, the last
            layer, is the top and sets the reference). Off by default.
        max_scale: bound every factor to ``[1/max_scale, max_scale]``; None for no bound.
        reference: ``"previous"`` (the paper): each layer is compared with the rescaled moment of the
            layer above it. ``"top"``: each layer is compared with the top layer's moment, which
            bounds the whole chain to the band around the top; a slow drift (every consecutive ratio
            inside the band, as at MSRA init) is then corrected too.
        schedule: when the rule may change the error, as a function of :meth:`set_step` (the number
            of optimizer updates done): None = always, an int ``N`` = while ``step < N``, a callable
            ``step -> bool``. Read at each forward of the root model.
        measure_only: never change the error; only record statistics (the baseline of Fig. 3).
        record_when_inactive: while the schedule is off, still record statistics (default). False
            installs nothing at all while off (zero backward cost).
        targets: the :class:`~timm_ortho.targets.FilterBank` list (the regularizer's targets); by
            default ``find_targets(model, **target_kwargs)``.

    :meth:`last_stats` builds the statistics of the last finished backward. Use :meth:`remove` or a
    ``with`` block to take the hooks off; in eager mode a graph already built then passes its errors
    through untouched.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        band: float = DEFAULT_BAND,
        mode: Mode = DEFAULT_MODE,
        statistic: Statistic = "total",
        include_classifier: bool = False,
        max_scale: float | None = None,
        reference: Reference = DEFAULT_REFERENCE,
        schedule: Schedule = None,
        measure_only: bool = False,
        record_when_inactive: bool = True,
        targets: Sequence[FilterBank] | None = None,
        **target_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_rule(band, mode, max_scale)
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        check_reference(reference)
        self.band = float(band)
        self.mode: Mode = mode
        self.statistic: Statistic = statistic
        self.include_classifier = bool(include_classifier)
        self.max_scale = None if max_scale is None else float(max_scale)
        self.reference: Reference = reference
        self._step = 0
        self.schedule = schedule  # validated by the property setter
        self.measure_only = bool(measure_only)
        self.record_when_inactive = bool(record_when_inactive)
        # Hooked modules in registration order (the statistics list them top of the chain first).
        modules, self.module_names = _hooked_modules(model, targets, self.include_classifier, target_kwargs)
        if len(modules) == 1 and not measure_only:
            warnings.warn(
                f"ErrorModulation on a single layer ({self.module_names[0]!r}) never rescales anything: "
                "the top of the chain only sets the reference. Modulate a model with several target "
                "layers, or pass measure_only=True to only record the error's moment.",
                UserWarning,
                stacklevel=2,
            )
        self._init_state(len(modules), next(modules[0].parameters(), None))
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._start_pass),
            model.register_forward_hook(self._end_pass),
        ]
        for name, module in zip(self.module_names, modules, strict=True):
            self._handles.append(module.register_forward_hook(functools.partial(self._on_output, name)))

    def _init_state(self, layers: int, weight: Tensor | None) -> None:
        self._removed = False
        self._last: Record | None = None
        self._last_stats: ModulationStats | None = None
        self._rows = self._capacity = layers  # slots of the next chain, and of the current one
        # The chain the root forward builds (plain attributes: dynamo replays their stores).
        self._token: Tensor | None = None
        self._slot = 0
        self._names: list[str] = []
        self._modulate = False
        self._chain: Chain | None = None  # None while the root forward is compiled
        self._in_root = False
        self._root_grad = True
        self._compiled_gap = False  # a compiled forward ran targets under no_grad (reentrant checkpoint)
        self._warned_gap = False
        self._eager = Splice(self._publish)
        # A compiled forward's record: the sink's gradient, and its forward's names.
        self._sink: Tensor | None = None
        self._seed: Tensor | None = None
        self._sink_handle: RemovableHandle | None = None
        self._sink_names: list[str] = []
        self._sink_modulated = False
        if weight is not None:  # made here so that a compiled forward finds it (no graph break)
            self._make_sink(weight.device, compute_dtype(weight.dtype))

    # -- schedule ---------------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Number of optimizer updates done so far; the schedule reads it."""
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self._step = step
        self._active_now = self.active

    @property
    def step(self) -> int:
        return self._step

    @property
    def schedule(self) -> Schedule:
        """None (always on), an int ``N`` (on while ``step < N``) or a callable ``step -> bool``."""
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Schedule) -> None:
        _check_schedule(schedule)
        self._schedule = schedule
        # A compiled forward reads this bool, not the step: dynamo guards on what it reads, and a
        # guard on the step would recompile at every optimizer update.
        self._active_now = self.active

    @property
    def active(self) -> bool:
        """Whether the schedule is on at the current step (``measure_only`` overrides it).

        None -> always; int ``N`` -> ``step < N``; callable -> ``bool(schedule(step))``. It is read at
        each forward of the root model: the backward of that forward is all on or all off.
        """
        if self.schedule is None:
            return True
        if isinstance(self.schedule, int):
            return self._step < self.schedule
        return bool(self.schedule(self._step))

    # -- lifecycle --------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook. Eager graphs already built pass their errors through. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._sink_handle is not None:
            self._sink_handle.remove()
            self._sink_handle = None
        self._removed = self._eager.removed = True
        self._token = None
        self._eager.reset()

    @property
    def removed(self) -> bool:
        return self._removed

    def __enter__(self) -> ErrorModulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        schedule = self.schedule if self.schedule is None or isinstance(self.schedule, int) else "callable"
        return (
            f"{type(self).__name__}(layers={len(self.module_names)}, band={self.band}, mode={self.mode!r}, "
            f"statistic={self.statistic!r}, include_classifier={self.include_classifier}, "
            f"max_scale={self.max_scale}, reference={self.reference!r}, schedule={schedule}, "
            f"measure_only={self.measure_only}{', removed' if self._removed else ''})"
        )

    # -- statistics -------------------------------------------------------------------------------
    def last_stats(self) -> ModulationStats:
        """Build the statistics of the last finished backward (tensors; no host-device sync).

        A method, not a field: backward only leaves the chain's state (one tensor); the first call
        after a backward turns it into :class:`ModulationStats` with a fixed number of tensor ops
        (not growing with the depth), later calls return the same object. When several forward
        passes end in one backward (``(loss1 + loss2).backward()``): eager, the pass whose bottom
        layer ran last; compiled, the per-layer mean over them (docs/modulation.md).
        """
        if self._last_stats is None:
            if self._last is None:
                raise RuntimeError(
                    "no backward has gone through the modulated layers yet: run a forward of the model "
                    "with grad enabled and a backward first"
                )
            self._last_stats = stats(self._last, self.statistic)
        return self._last_stats

    # -- the root forward (traced under torch.compile: only attribute stores, replayed by dynamo) ---
    def _start_pass(self, module: nn.Module, args: Any) -> None:
        self._in_root, self._root_grad = True, torch.is_grad_enabled()
        if not self._root_grad and not torch.compiler.is_compiling():
            return  # nothing will be put on (eval): keep the reservations a pending backward needs
        self._token, self._slot, self._names, self._capacity = None, 0, [], self._rows
        self._modulate, self._compiled_gap = self._active_now and not self.measure_only, False
        if torch.compiler.is_compiling():
            self._chain = None
        else:
            self._chain = Chain(self._names, self._modulate)
            self._eager.reset()

    def _end_pass(self, module: nn.Module, args: Any, output: Any) -> None:
        self._in_root = False
        if self._chain is None and self._slot:  # compiled: the sink's next record is this forward's
            self._sink_names, self._sink_modulated = self._names, self._modulate

    def _on_output(self, name: str, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        if self._removed or not isinstance(output, Tensor):
            return None
        if not output.requires_grad:
            if self._in_root and self._root_grad and not torch.is_grad_enabled():
                self._gap(name)
            return None
        if self._in_root or torch.compiler.is_compiling():
            return self._join_root(name, output)
        return self._join_side(name, output)  # a recompute during backward, or a direct call

    def _join_root(self, name: str, output: Tensor) -> Tensor | None:
        """Put the Function on a target's output in the root forward's chain (eager or compiled)."""
        if not self._installs(self._modulate):
            return None
        slot = self._slot
        if slot >= self._capacity:
            return self._overflow(name)
        bottom = self._token is None
        token = self._bottom_token(output, sink=self._chain is None) if bottom else self._token
        link = None if torch.compiler.is_compiling() else EagerLink(self._eager, self._chain, self._seed)
        output, self._token = Modulate.apply(output, token, slot, self._rule(self._modulate), bottom, link)
        self._slot = slot + 1
        self._names.append(name)
        return output

    def _join_side(self, name: str, output: Tensor) -> Tensor | None:
        """A target call outside a root forward (eager): a reentrant checkpoint's recompute joins the
        root chain in its reserved slots; anything else (a non-reentrant recompute, whose outputs are
        never backpropagated, or a submodule called directly) is a chain of its own."""
        side = self._eager.side
        if not isinstance(side, _Side):
            chain = self._chain
            if chain is not None and name in chain.reserved:
                side = _Side(chain, splice=True)
            elif self._compiled_gap:
                return None  # warned in forward
            else:
                side = _Side(Chain([], self._active_now and not self.measure_only), splice=False)
            self._eager.side = side
        if not self._installs(side.chain.modulate):
            return None
        if side.splice:
            slot = side.chain.free_slot(name, self._eager.filled)
            if slot is None:
                return None
            self._eager.filled.add(slot)
        else:
            slot = len(side.chain.names)
            if slot >= self._capacity:
                return None
            side.chain.names.append(name)
        bottom = side.token is None
        token = self._bottom_token(output, sink=False) if bottom else side.token
        link = EagerLink(self._eager, side.chain, self._seed, side.splice)  # type: ignore[arg-type]
        rule = self._rule(side.chain.modulate)
        output, side.token = Modulate.apply(output, token, slot, rule, bottom, link)
        return output

    def _gap(self, name: str) -> None:
        """A target ran under no_grad inside a root forward with grad: a reentrant checkpoint segment
        (``use_reentrant=True`` runs it so, and again with grad in backward). Eager: keep its slot, so
        that the recompute writes its row where the forward order puts it."""
        if torch.compiler.is_compiling() or not self._installs(self._modulate):
            return
        if self._chain is None:  # part of a compiled forward: its recompute cannot join its chain
            if not self._warned_gap:
                self._warned_gap = True
                warnings.warn(
                    f"{name!r} ran under no_grad inside a torch.compile'd forward (reentrant gradient "
                    "checkpointing?): its recompute in backward is not modulated. Use "
                    "use_reentrant=False (see docs/modulation.md).",
                    UserWarning,
                    stacklevel=2,
                )
            self._compiled_gap = True
        elif self._slot < self._capacity:
            self._chain.reserved.setdefault(name, []).append(self._slot)
            self._names.append(name)
            self._slot += 1

    def _overflow(self, name: str) -> None:
        if self._rows > self._capacity:  # warned in this forward already
            return
        warnings.warn(
            f"the modulated layers were called more than {self._capacity} times in one forward; "
            f"{name!r} and later calls are left out of this forward's chain (the next forwards have "
            f"room for {2 * self._capacity})",
            UserWarning,
            stacklevel=3,
        )
        self._rows = 2 * self._capacity  # the next forward's state is made for the larger chain

    def _installs(self, modulate: bool) -> bool:
        return modulate or self.measure_only or self.record_when_inactive

    def _rule(self, modulate: bool) -> Rule:
        return Rule(self.band, self.mode, self.max_scale, self.reference, self.statistic, modulate)

    # -- the state below the bottom -----------------------------------------------------------------
    def _bottom_token(self, output: Tensor, sink: bool) -> Tensor:
        """The bottom layer's token: the sink in a compiled forward (its gradient is the record), else
        zeros without grad (the bottom's eager backward publishes the record itself)."""
        dtype, size = compute_dtype(output.dtype), ROW * (self._capacity + 1)
        t = self._sink
        if t is None or t.device != output.device or t.dtype != dtype or t.shape[0] != size:
            self._make_sink(output.device, dtype)  # the model moved, or the chain grew, since
        return self._sink if sink else self._seed  # type: ignore[return-value]

    def _make_sink(self, device: torch.device, dtype: torch.dtype) -> None:
        if self._sink_handle is not None:
            self._sink_handle.remove()
        self._seed = torch.zeros(ROW * (self._capacity + 1), device=device, dtype=dtype)
        self._sink = self._seed.clone().requires_grad_(True)
        self._sink_handle = self._sink.register_post_accumulate_grad_hook(self._publish_sink)

    def _publish_sink(self, sink: Tensor) -> None:
        # After a compiled backward, once per backward call (also through a retained graph).
        record, sink.grad = sink.grad, None
        if record is not None and not self._removed:
            self._last = Record(record, list(self._sink_names), self._sink_modulated, counted=True)
            self._last_stats = None

    def _publish(self, state: Tensor, chain: Chain, filled: set[int]) -> None:
        self._last = Record(state, chain.names, chain.modulate, chain.keep(filled))
        self._last_stats = None


@dataclass(eq=False)
class _Side:
    """A chain of target calls outside a root forward, built in forward."""

    chain: Chain
    splice: bool
    token: Tensor | None = None


def _hooked_modules(
    model: nn.Module,
    targets: Sequence[FilterBank] | None,
    include_classifier: bool,
    target_kwargs: dict[str, Any],
) -> tuple[list[nn.Module], list[str]]:
    """The distinct modules of ``targets`` (default: ``find_targets(model, **target_kwargs)``) to
    hook, the classifier only when asked, and their names."""
    _check_options(target_kwargs)
    if targets is None:
        targets = find_targets(model, **target_kwargs)
    elif target_kwargs:
        raise ValueError(
            f"pass either targets or find_targets options, not both (got targets and {sorted(target_kwargs)})"
        )
    in_model = {id(m) for m in model.modules()}
    modules: list[nn.Module] = []
    names: list[str] = []
    for t in targets:
        if t.role == "classifier" and not include_classifier:
            continue
        if id(t.module) not in in_model:
            raise ValueError(f"target {t.name!r} is not a submodule of the model given")
        if any(t.module is m for m in modules):
            continue
        modules.append(t.module)
        names.append(t.module_name)
    if not modules:
        raise ValueError(
            "no target layer to modulate: the model has no Conv/Linear targets outside the "
            "classifier (pass include_classifier=True, or other targets)"
        )
    return modules, names


# What ErrorModulation(**options) accepts besides the target selection: for "did you mean" errors.
_OPTIONS = (
    "band",
    "mode",
    "statistic",
    "include_classifier",
    "max_scale",
    "reference",
    "schedule",
    "measure_only",
    "record_when_inactive",
    "targets",
)
_TARGET_OPTIONS = ("include", "exclude", "skip_stem", "skip_classifier", "include_depthwise")


def _check_options(target_kwargs: dict[str, Any]) -> None:
    """Unknown keyword arguments (a typo in ``modulation={...}``) get an error naming the close one."""
    unknown = sorted(set(target_kwargs) - set(_TARGET_OPTIONS))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, _OPTIONS + _TARGET_OPTIONS, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"unknown ErrorModulation option(s) {', '.join(hints)}; the options are "
        f"{', '.join(_OPTIONS + _TARGET_OPTIONS)}"
    )


def _check_schedule(schedule: object) -> None:
    if schedule is None or callable(schedule):
        return
    if isinstance(schedule, bool) or not isinstance(schedule, int):
        raise TypeError(
            f"schedule must be None (always on), an int N (on for the first N optimizer steps) or a "
            f"callable step -> bool, got {schedule!r}"
        )
    if schedule < 0:
        raise ValueError(f"schedule as a number of steps must be >= 0, got {schedule}")
