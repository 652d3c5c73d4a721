"""The optimizer and the learning-rate schedule of a run, from timm's factories.

The optimizer fields of :class:`~timm_ortho.train.config.TrainConfig` carry timm's names (``opt``,
``lr``, ``weight_decay``, ``momentum``, ``opt_eps``), so ``timm.optim.optimizer_kwargs`` reads them
as it reads timm's ``train.py`` arguments; the method then wraps what timm builds
(:func:`timm_ortho.create_optimizer`). The schedule is counted in updates: its settings are handed to
``timm.scheduler.scheduler_kwargs`` under timm's names with every length converted to updates, and
one schedule "epoch" is one update (``updates_per_epoch=1``), which lets milestones and warm-up fall
between epochs.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any

from torch import nn

from .config import ConfigError, TrainConfig, base_optimizer_name

__all__ = ["build_optimizer", "build_schedule", "learning_rate"]


def learning_rate(cfg: TrainConfig, global_batch: int) -> float:
    """``--lr``, or ``--lr-base`` scaled (linearly or by the square root) by the global batch."""
    if cfg.lr is not None:
        return cfg.lr
    scale = global_batch / cfg.lr_base_size
    return cfg.lr_base * (scale if cfg.lr_base_scale == "linear" else math.sqrt(scale))


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> tuple[Any, Any, list, str]:
    """``(optimizer, probe, targets, description)``: timm's optimizer, wrapped for the method.

    The targets are found once, here, and handed to the wrapper. Without modulation the probe is a
    measure-only ErrorModulation (it changes no error), so both sides of a comparison record Fig. 3.
    """
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    import timm_ortho

    from ..modulation import ErrorModulation
    from ..targets import find_targets

    # The method is applied here, not selected by an ortho_ name; the lr is the one scaled by the batch.
    timm_args = optimizer_kwargs(dataclasses.replace(cfg, opt=base_optimizer_name(cfg.opt), lr=lr))
    targets = [t for t in find_targets(model, exclude=cfg.ortho_exclude) if t.param.requires_grad]
    if cfg.baseline:
        optimizer = create_optimizer_v2(model, **timm_args)
        probe = ErrorModulation(model, targets=targets, measure_only=True) if cfg.error_stats else None
        return optimizer, probe, targets, f"L2 weight decay {cfg.weight_decay:g}, no modulation"
    # timm's parameter groups (no_weight_decay(), 1-D parameters), the targets without L2.
    optimizer = timm_ortho.create_optimizer(
        model,
        **timm_args,
        ortho_decay=cfg.ortho_decay,
        form=cfg.ortho_form,
        modulation=cfg.modulation_setting(),
        max_grad_ratio=cfg.max_grad_ratio or None,
        bound_momentum=cfg.bound_momentum,
        target_kwargs={"targets": targets},
    )
    return optimizer, *_method_probe(cfg, model, optimizer)


def _method_probe(cfg: TrainConfig, model: nn.Module, optimizer: Any) -> tuple[Any, list, str]:
    """``(probe, targets, description)`` of the wrapped optimizer: its own modulation, or a
    measure-only one (with ``--error-stats``), and what the method does, for the log."""
    from ..modulation import ErrorModulation

    ratio = optimizer.defaults["max_grad_ratio"]  # "auto" resolved by the wrapper from the model
    bound = f"|grad| <= {ratio:.3g} |W| per layer" if ratio else "off"
    if ratio and cfg.bound_momentum:
        bound = bound.replace("|grad|", f"|running average of grad, beta {cfg.bound_momentum:g}|")
    probe = optimizer.modulation
    if probe is not None:
        m = probe
        status = f"on (reference={m.reference}, mode={m.mode}, band={m.band:g}, schedule={m.schedule})"
    else:
        status = "off" + (" (error moments measured only)" if cfg.error_stats else "")
        probe = (
            ErrorModulation(model, targets=optimizer.targets, measure_only=True) if cfg.error_stats else None
        )
    method = (
        f"orthonormality regularizer lambda={cfg.ortho_decay:g} on {len(optimizer.targets)} weights "
        f"(no L2 on them), step bound {bound}, modulation {status}"
    )
    return probe, optimizer.targets, method


def _schedule_in_updates(cfg: TrainConfig, updates_per_epoch: int) -> SimpleNamespace:
    """The schedule settings of ``cfg`` under the names ``timm.scheduler.scheduler_kwargs`` reads,
    every length in updates (``epochs`` is the run's length in updates, and so on)."""
    total = cfg.iterations if cfg.iterations is not None else cfg.epochs * updates_per_epoch
    milestones = cfg.decay_steps or [round(m * updates_per_epoch) for m in cfg.decay_milestones]
    if cfg.sched == "multistep":
        # Here milestone m means: the first m updates run at the undecayed rate (the lr is divided
        # "at 32k iterations"). timm's multistep schedule decays at index m - 1, hence the shift.
        milestones = [m + 1 for m in milestones]
    warmup = (
        cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * updates_per_epoch)
    )
    return SimpleNamespace(
        sched=cfg.sched,
        epochs=total,
        decay_epochs=max(1, round(cfg.decay_epochs * updates_per_epoch)),
        decay_milestones=list(milestones),
        decay_rate=cfg.decay_rate,
        warmup_epochs=warmup,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        seed=cfg.seed,
        sched_on_updates=True,  # the loop calls step_update(updates)
    )


def build_schedule(cfg: TrainConfig, optimizer: Any, updates_per_epoch: int) -> tuple[Any, int, int]:
    """``(scheduler or None, total updates, epochs)``; the schedule is counted in updates."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    in_updates = _schedule_in_updates(cfg, updates_per_epoch)
    total = in_updates.epochs
    # The metric's direction is read by the plateau schedule only, which validate_config refuses.
    kwargs = scheduler_kwargs(in_updates, decreasing_metric=False)
    try:
        scheduler, _ = create_scheduler_v2(optimizer, **kwargs, updates_per_epoch=1)
    except (ValueError, AssertionError) as e:  # timm checks its arguments with both
        raise ConfigError(
            f"--sched {cfg.sched}: timm cannot build this schedule ({e}); the trainer gives it in updates: "
            f"{total} in all (--epochs / --iterations), {in_updates.warmup_epochs} of warm-up "
            f"(--warmup-epochs / --warmup-steps), {in_updates.decay_epochs} of decay (--decay-epochs)"
        ) from e
    return scheduler, total, math.ceil(total / updates_per_epoch)
