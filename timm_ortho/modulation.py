"""Backward error modulation (Xie, Xiong & Pu, CVPR 2017, Sec. 3.3) through hooks.

During backward, the error ``e_l = dL/dy_l`` at the output ``y_l`` of every target layer (the
parametric layers of :func:`~timm_ortho.targets.find_targets`, the classifier left out by default) is
measured by its norm and rescaled where its magnitude leaves a band around a reference; the rule and
its equations are in :mod:`timm_ortho.modulation_rule`. This module is the glue that applies it:

- eager mode: a forward hook on every target registers a tensor hook on its output; the tensor hook
  measures the error (one reduction), applies the rule and returns the rescaled error;
- under ``torch.compile``: the same rule as an autograd identity that threads a small token through
  the layers, so that dynamo traces it into the compiled graph (:mod:`timm_ortho.modulation_traced`);
- :class:`ModulationStats`: what one backward did, stacked once after it.
"""

from __future__ import annotations

import difflib
import functools
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

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
    log_scale,
    next_log_ref,
    scale_factor,
    simulate_chain,
)
from .modulation_traced import HEAD, Rule, TracedModulation, TracedRecord
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


@dataclass(eq=False)
class _Pass:
    """State of one forward pass's chain: what its tensor hooks close over.

    A pass is started by every forward of the root model. Its chain state (reference, records) is
    reset when a backward first reaches it and published when that backward finishes, so a second
    backward through the same graph (``retain_graph=True``) starts a fresh chain.

    The hooks only append 0-d tensors here; stacking them and deriving moments and scales happens
    once per backward, in :meth:`ErrorModulation.last_stats`.
    """

    open: bool = False
    modulate: bool = False
    log_ref: Tensor | None = None
    """None until the top of the chain has fired (then its log-norm, valid or not)."""
    names: list[str] = field(default_factory=list)
    stat: list[Tensor] = field(default_factory=list)
    """Per layer: the log-norm (modulating pass) or the norm (measuring pass, logs taken later)."""
    log_s: list[Tensor] = field(default_factory=list)
    """``log s`` of every layer below the top (the top's is 0)."""
    scale: list[Tensor] = field(default_factory=list)
    """``s`` of every layer below the top, the very tensors the errors were multiplied by."""


def _graph_task_id() -> int:
    """Id of the autograd graph task running on this thread, -1 outside backward."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if fn is None else fn()


def _stack(values: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    if not values:
        return torch.empty(0, device=device, dtype=dtype)
    return torch.stack([v.to(device=device, dtype=dtype) for v in values])


# -- the hooks -----------------------------------------------------------------------------------


class ErrorModulation:
    """Backward error modulation on a model's target layers, installed with hooks.

    Args:
        model: the root module. Each of its forwards starts a new chain (a "pass"); call this
            module (not only a submodule) so that passes are told apart.
        band: the quasi-isometry constant ``A >= 1``; ratios ``q_ref / q`` inside ``[A^-2, A^2]`` are
            left alone. ``band=1`` rescales every layer to the moment above it.
        mode: ``"clamp"`` rescales to the edge of the band, ``"match"`` to equality (the paper).
        statistic: ``"total"`` (sum of squares, the default: an orthonormal map preserves norms, and
            a per-element mean jumps with ``numel`` at stride and width changes) or ``"mean"``.
        include_classifier: put classifier-role targets in the chain (then the classifier, the last
            layer, is the top and sets the reference). Off by default.
        max_scale: bound every factor to ``[1/max_scale, max_scale]``; None for no bound.
        reference: ``"previous"`` (default, the paper): each layer is compared with the rescaled
            moment of the layer above it. ``"top"``: each layer is compared with the top layer's
            moment, which bounds the whole chain to the band around the top; a slow drift (every
            consecutive ratio inside the band, as at MSRA init) is then corrected too.
        schedule: when the rule may change the error, as a function of :meth:`set_step` (the number
            of optimizer updates done): None = always, an int ``N`` = while ``step < N``, a callable
            ``step -> bool``.
        measure_only: never change the error; only record statistics (the baseline of Fig. 3).
        record_when_inactive: while the schedule is off, still record statistics (default). False
            installs no tensor hook at all while off (zero backward cost).
        targets: the :class:`~timm_ortho.targets.FilterBank` list (the regularizer's targets); by
            default ``find_targets(model, **target_kwargs)``.

    The statistics of the last finished backward are :meth:`last_stats`. Use :meth:`remove` or a
    ``with`` block to take the hooks off; tensor hooks already attached to a live graph then do
    nothing.
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
        _check_options(target_kwargs)
        if targets is None:
            targets = find_targets(model, **target_kwargs)
        elif target_kwargs:
            raise ValueError(
                f"pass either targets or find_targets options, not both (got targets and "
                f"{sorted(target_kwargs)})"
            )
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

        # Hooked modules in registration order (the statistics list them in firing order instead).
        modules, self.module_names = _hooked_modules(model, targets, self.include_classifier)
        if len(modules) == 1 and not measure_only:
            warnings.warn(
                f"ErrorModulation on a single layer ({self.module_names[0]!r}) never rescales anything: "
                "the top of the chain only sets the reference. Modulate a model with several target "
                "layers, or pass measure_only=True to only record the error's moment.",
                UserWarning,
                stacklevel=2,
            )

        self._current: _Pass | None = None
        self._in_backward: dict[int, _Pass] = {}  # graph task id -> pass opened in it
        self._last: _Pass | TracedRecord | None = None
        self._last_stats: ModulationStats | None = None
        self._removed = False
        # The traced path (torch.compile): the chain token of the forward being traced, the next
        # slot, the names in forward order, and the sink that collects each backward's record.
        self._token: Tensor | None = None
        self._slot = 0
        self._traced_names: list[str] = []
        self._traced_modulate = False
        self._traced_forward = False  # the current root forward started in a compiled frame
        self._sink: Tensor | None = None
        self._sink_handle: RemovableHandle | None = None
        weight = next(modules[0].parameters(), None)
        if weight is not None:  # made here so that a compiled forward finds it (no graph break)
            self._make_sink(weight.device, compute_dtype(weight.dtype))
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._start_pass)]
        for name, module in zip(self.module_names, modules, strict=True):
            self._handles.append(module.register_forward_hook(functools.partial(self._on_output, name)))

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

        None -> always; int ``N`` -> ``step < N``; callable -> ``bool(schedule(step))``. It is read
        when a backward first reaches a forward pass's chain, so one backward is all on or all off.
        """
        if self.schedule is None:
            return True
        if isinstance(self.schedule, int):
            return self._step < self.schedule
        return bool(self.schedule(self._step))

    # -- lifecycle --------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook. Tensor hooks already on a live graph become no-ops. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._sink_handle is not None:
            self._sink_handle.remove()
            self._sink_handle = None
        self._removed = True
        self._current = None
        self._token = None
        self._in_backward.clear()

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
        """Statistics of the last finished backward (no host-device synchronization).

        When several forward passes finish in one backward (e.g. ``(loss1 + loss2).backward()``), the
        pass finished last is reported (eager; under ``torch.compile`` see docs/modulation.md).
        The hooks only keep 0-d tensors; they are stacked and turned into moments here, once.
        """
        if self._last_stats is None:
            p = self._last
            if p is None:
                raise RuntimeError(
                    "no backward has gone through the modulation hooks yet: run a forward of the model "
                    "with grad enabled and a backward first"
                )
            if isinstance(p, TracedRecord):
                self._last_stats = self._traced_stats(p)
            else:
                self._last_stats = self._eager_stats(p)
        return self._last_stats

    def _eager_stats(self, p: _Pass) -> ModulationStats:
        device = p.stat[0].device
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in p.stat) else torch.float32
        stat = _stack(p.stat, device, dtype)
        if p.modulate:
            log_n = stat
            # The top of the chain only set the reference: log s = 0, s = 1.
            log_s = torch.cat([log_n.new_zeros(1), _stack(p.log_s, device, dtype)])
            scale = torch.cat([log_n.new_ones(1), _stack(p.scale, device, dtype)])
        else:
            log_n = stat.log()
            log_s, scale = torch.zeros_like(log_n), torch.ones_like(log_n)
        return ModulationStats(
            names=list(p.names),
            q_before=(2.0 * log_n).exp(),
            q_after=(2.0 * (log_n + log_s)).exp(),
            scale=scale,
            modulated=p.modulate,
            statistic=self.statistic,
        )

    def _traced_stats(self, r: TracedRecord) -> ModulationStats:
        fired, slots = len(r.names), len(self.module_names)
        # Slots are in forward order; the statistics list the top of the chain first.
        log_n = r.record[HEAD : HEAD + fired].flip(0)
        log_s = r.record[HEAD + slots : HEAD + slots + fired].flip(0)
        return ModulationStats(
            names=r.names[::-1],
            q_before=(2.0 * log_n).exp(),
            q_after=(2.0 * (log_n + log_s)).exp(),
            scale=log_s.exp(),
            modulated=r.modulated,
            statistic=self.statistic,
        )

    # -- hook glue --------------------------------------------------------------------------------
    def _start_pass(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            # Traced: only attribute stores, which dynamo replays after the graph at every call.
            self._token, self._slot, self._traced_names = None, 0, []
            self._traced_modulate = self._active_now and not self.measure_only
            self._traced_forward = True
            return
        # A root forward during backward is a checkpoint recompute of the whole model: it belongs
        # to the pass being backpropagated, not to a new one.
        if _graph_task_id() < 0:
            self._current = _Pass()
            self._traced_forward = False

    def _on_output(self, name: str, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        if self._removed or not isinstance(output, Tensor) or not output.requires_grad:
            return None
        if torch.compiler.is_compiling():
            return self._on_output_traced(name, output)
        if self._traced_forward:
            # A part of a compiled forward that dynamo runs eagerly (e.g. a checkpointed segment it
            # cannot trace): it joins the forward's token chain, one chain as in eager mode. Inside
            # backward it is a checkpoint recompute, whose outputs are never backpropagated
            # (non-reentrant) or cannot join the token chain (reentrant): left alone.
            return None if _graph_task_id() >= 0 else self._on_output_traced(name, output)
        if not self.record_when_inactive and not self.measure_only and not self.active:
            return None
        task = _graph_task_id()
        if task >= 0:
            # Recompute inside backward (gradient checkpointing). Reentrant checkpointing backprops
            # the recomputed outputs in a nested backward: their hooks must continue the chain of
            # the pass being backpropagated in this task. (Non-reentrant recomputed outputs are
            # never backpropagated; their hooks never fire.)
            p = self._in_backward.get(task) or self._current_or_new()
            if not p.open:
                self._open(p, task)
        else:
            p = self._current_or_new()
        output.register_hook(functools.partial(self._on_error, p, name))
        return None

    def _current_or_new(self) -> _Pass:
        # Only reached when a target runs outside a root forward (a submodule called directly).
        if self._current is None:
            self._current = _Pass()
        return self._current

    def _open(self, p: _Pass, task: int) -> None:
        """A backward reaches pass ``p``: fresh chain; publish it when this graph task finishes."""
        p.open = True
        p.modulate = self.active and not self.measure_only
        p.log_ref = None
        p.names, p.stat, p.log_s, p.scale = [], [], [], []
        self._in_backward[task] = p
        Variable._execution_engine.queue_callback(functools.partial(self._close, p, task))

    def _close(self, p: _Pass, task: int) -> None:
        p.open = False
        self._in_backward.pop(task, None)
        if p.names:
            self._last, self._last_stats = p, None

    def _on_error(self, p: _Pass, name: str, g: Tensor) -> Tensor | None:
        """The tensor hook: per layer one reduction, and on modulating passes below the top the rule.

        Dispatched ops (``torch.profiler`` / a dispatch mode show them; tests/test_modulation.py
        counts them): a measuring pass 1 (the norm); the top of a modulating chain 2 (norm, log);
        every layer below it 10 with ``reference="top"`` (norm, log, sub, shrink, nan_to_num, exp,
        abs, lt, where, and the multiply of the error), 11 with ``"previous"`` (+ add). Stacking,
        logs of measured norms and moments are left to :meth:`last_stats`.
        """
        if self._removed or g.numel() == 0:
            return None
        if not p.open:
            self._open(p, _graph_task_id())
        p.names.append(name)
        # no_grad instead of g.detach(): the factor is a constant of the backward, also under
        # create_graph=True, and no op is dispatched for it.
        with torch.no_grad():
            # Fused float32 reduction (float64 stays float64): no g*g temporary, exact under autocast.
            norm = torch.linalg.vector_norm(g, dtype=compute_dtype(g.dtype))
            if not p.modulate:
                p.stat.append(norm if self.statistic == "total" else norm * g.numel() ** -0.5)
                return None
            log_ref = p.log_ref
            if log_ref is not None and log_ref.device != norm.device:
                log_ref = log_ref.to(norm.device, non_blocking=True)
            log_n = norm.log()
            if self.statistic == "mean":
                log_n = log_n - 0.5 * math.log(g.numel())
            p.stat.append(log_n)
            if log_ref is None:
                # The top of the chain: it only sets the reference (valid or not: an invalid one is
                # replaced by the next valid moment in next_log_ref). s = 1, the error is untouched.
                p.log_ref = log_n
                return None
            log_s = log_scale(log_n, log_ref, self.band, self.mode, self.max_scale)
            # "top" keeps the reference once valid, and takes log_n + 0 = log_n while it is not.
            after = log_n + log_s if self.reference == "previous" else log_n
            p.log_ref = next_log_ref(after, log_ref, self.reference)
            scale = log_s.exp()
            p.log_s.append(log_s)
            p.scale.append(scale)
        # g * 1.0 is exact (also for inf, nan and -0.0), so untouched layers stay bit-identical.
        return g * scale

    # -- traced path (torch.compile) --------------------------------------------------------------
    def _make_sink(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """A leaf whose gradient is the record of one compiled backward (see TracedModulation)."""
        if self._sink_handle is not None:
            self._sink_handle.remove()
        self._sink = torch.zeros(HEAD + 2 * len(self.module_names), device=device, dtype=dtype)
        self._sink.requires_grad_(True)
        self._sink_handle = self._sink.register_post_accumulate_grad_hook(self._publish)
        return self._sink

    def _publish(self, sink: Tensor) -> None:
        # Runs eagerly after the compiled backward, once per backward call: a second backward
        # through a retained graph brings a fresh record.
        record, sink.grad = sink.grad, None
        if record is None or self._removed:
            return
        self._last = TracedRecord(record, list(self._traced_names), self._traced_modulate)
        self._last_stats = None

    def _on_output_traced(self, name: str, output: Tensor) -> Tensor | None:
        modulate = self._traced_modulate
        if not modulate and not self.record_when_inactive and not self.measure_only:
            return None
        slot = self._slot
        if slot >= len(self.module_names):  # a target called more often than there are slots
            return None
        token = self._token
        if token is None:
            token = self._sink
            dtype = compute_dtype(output.dtype)
            if token is None or token.device != output.device or token.dtype != dtype:
                token = self._make_sink(output.device, dtype)  # model moved since construction
        rule = Rule(
            self.band,
            self.mode,
            self.max_scale,
            self.reference,
            self.statistic,
            modulate,
            len(self.module_names),
        )
        output, self._token = TracedModulation.apply(output, token, slot, rule)
        self._slot = slot + 1
        self._traced_names.append(name)
        return output


def _hooked_modules(
    model: nn.Module, targets: Sequence[FilterBank], include_classifier: bool
) -> tuple[list[nn.Module], list[str]]:
    """The distinct modules of ``targets`` to hook (the classifier only when asked) and their names."""
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
