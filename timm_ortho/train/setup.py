"""A run's state and how it is built: :func:`setup` turns a checked
:class:`~timm_ortho.train.config.TrainConfig` into a :class:`Run`, which the loop
(:mod:`timm_ortho.train.loop`) advances.

:func:`setup` validates the settings, names the run folder (after everything that can fail without
building anything was checked, so that a failed start leaves no folder), then builds the pieces of
:mod:`timm_ortho.train.build` and :mod:`timm_ortho.train.optimization` in the order Accelerate asks
for: the model and the wrapped optimizer before ``accelerator.prepare``, so that the regularizer
sees unscaled gradients, once per update under gradient accumulation; the schedule after it, on the
prepared optimizer and the prepared loader's length. It then registers the checkpointed state,
opens the trackers, resumes (:mod:`timm_ortho.train.resume`) and describes the run in the
``config`` record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from . import build, optimization
from .checkpoint import CheckpointManager
from .config import TrainConfig
from .data import SeededTransform
from .evaluation import PreciseBN, trivial_topk
from .guards import DivergenceMonitor, StopSignals
from .resume import load_keeping_schedule, recipe_of, saved_total_updates
from .tracking import JsonlTracker, log_record, to_json
from .validation import validate_config

__all__ = ["Run", "TrainProgress", "setup"]

_log = get_logger("timm_ortho.train")


@dataclass
class TrainProgress:
    """Where the run stands; saved in every checkpoint (``register_for_checkpointing``)."""

    epoch: int = 0
    batch: int = 0
    """Micro-batches of ``epoch`` already consumed; ``skip_first_batches`` skips them on resume."""
    updates: int = 0
    """The run's clock: optimizer updates applied (see :mod:`timm_ortho.train.loop`)."""
    best_top1: float | None = None
    best_epoch: int | None = None
    last_eval: dict[str, float] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


@dataclass
class Run:
    """What :func:`setup` builds and the loop advances (prepared objects where Accelerate wraps them)."""

    cfg: TrainConfig
    accelerator: Any
    run_dir: Path
    model: nn.Module
    optimizer: Any
    scheduler: Any
    ema: Any
    loss_fn: nn.Module
    mixup_fn: Any
    train_set: SeededTransform
    train_loader: Any
    val_loader: Any
    precise_bn: PreciseBN | None
    """``None`` when precise BN is off."""
    probe: Any
    """The ErrorModulation whose statistics are logged: the method's own, or a measure-only one."""
    targets: list
    info: dict[str, Any]
    """The run's description: the ``config`` record of ``metrics.jsonl``."""
    checkpoints: CheckpointManager
    progress: TrainProgress = dataclasses.field(default_factory=TrainProgress)
    divergence: DivergenceMonitor = dataclasses.field(default_factory=DivergenceMonitor)
    stop: StopSignals = dataclasses.field(default_factory=StopSignals)
    stopped_by: str | None = None
    """The signal that stopped the run after the current update (``None``: it was not stopped)."""
    last_logged_update: int = -1
    samples_seen: int = 0
    train_seconds: float = 0.0
    ema_eval: dict[str, float] | None = None

    @property
    def eager_model(self) -> nn.Module:
        """The model without DDP and torch.compile: precise BN's cumulative averages (momentum=None)
        would make a compiled model recompile and break its graph."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def models(self) -> list[nn.Module]:
        """The eager model and, with an EMA, the EMA's: what is evaluated, saved and returned."""
        return [self.eager_model, *([self.ema.module] if self.ema is not None else [])]


def setup(cfg: TrainConfig) -> Run:
    """Everything a run needs: the settings and inputs checked, the run folder, then the pieces."""
    validate_config(cfg)
    accelerator = build.make_accelerator(cfg)
    run_dir, resume_path = build.run_folder(cfg, accelerator)  # checks inputs before creating it
    try:
        return _build_run(cfg, accelerator, run_dir, resume_path)
    except BaseException:
        if accelerator.is_main_process:  # a failed start leaves no run folder of its own behind
            build.discard_failed_start(run_dir)
        raise


def _build_run(cfg: TrainConfig, accelerator: Any, run_dir: Path, resume_path: Path | None) -> Run:
    """The run's pieces, in the order Accelerate asks for (wrap, then ``prepare``)."""
    from accelerate.utils import set_seed

    datasets, train_set, train_loader, val_loader = build.build_data(cfg, accelerator)
    model, ema, init = build.build_model(cfg, accelerator, datasets.num_classes)
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum_steps
    lr = optimization.learning_rate(cfg, global_batch)
    optimizer, probe, targets, method = optimization.build_optimizer(cfg, model, lr)
    bn_loader, precise_bn = build.precise_bn_loader(cfg, model, train_set)
    method = f"{'baseline: ' if cfg.baseline else ''}{init} init, {method}, precise BN " + (
        f"over up to {precise_bn} batches" if precise_bn else "off"
    )
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.torchcompile:
        model = torch.compile(model, backend=cfg.torchcompile)
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader
    )
    precise = PreciseBN(accelerator.prepare(bn_loader), precise_bn, cfg.channels_last) if precise_bn else None
    set_seed(cfg.seed, device_specific=True)  # per-process randomness (dropout, mixup) from here on
    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler, total_updates, epochs = optimization.build_schedule(cfg, optimizer, updates_per_epoch)
    mixup_fn, loss_fn = build.build_loss(cfg, datasets.num_classes)
    info = {
        "type": "config",
        "time": time.time(),
        "run_dir": str(run_dir),
        "model": cfg.model,
        "params": n_params,
        "method": method,
        "data": datasets.description,
        "synthetic": datasets.synthetic,
        "num_classes": datasets.num_classes,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "global_batch": global_batch,
        "lr": lr,
        "updates_per_epoch": updates_per_epoch,
        "total_updates": total_updates,
        "stop_at": min(total_updates, cfg.max_steps) if cfg.max_steps else total_updates,
        "epochs": epochs,
        "layers": [t.name for t in targets],
        "config": dataclasses.asdict(cfg),
    }
    checkpoints = CheckpointManager(
        accelerator, run_dir / "checkpoints", keep=cfg.checkpoint_hist,
        recipe=recipe_of(cfg, datasets.num_classes),
    )  # fmt: skip
    run = Run(
        cfg, accelerator, run_dir, model, optimizer, scheduler, ema, loss_fn, mixup_fn, train_set,
        train_loader, val_loader, precise, probe, targets, info, checkpoints,
        divergence=DivergenceMonitor(skip=cfg.skip_nonfinite),
    )  # fmt: skip
    _start(run, resume_path)
    return run


def _start(run: Run, resume_path: Path | None) -> None:
    """Register the checkpointed state, open the trackers, resume, and describe the run."""
    acc, cfg, info = run.accelerator, run.cfg, run.info
    acc.register_for_checkpointing(*[s for s in (run.progress, run.scheduler, run.ema) if s is not None])
    jsonl = next(t for t in acc.log_with if isinstance(t, JsonlTracker))
    jsonl.path = run.run_dir / "metrics.jsonl"
    hparams = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in info["config"].items()
    }
    acc.init_trackers(run.run_dir.name, config=hparams)
    if resume_path is not None:
        rebuilt = load_keeping_schedule(acc, resume_path, run.scheduler, run.progress)
        p = run.progress
        _log.info("resumed from %s: epoch %d, batch %d, update %d", resume_path, p.epoch, p.batch, p.updates)
        log_record(acc, {"type": "resume", "from": str(resume_path), **p.state_dict()}, step=p.updates)
        if rebuilt:
            _log_rebuilt_schedule(run, resume_path)
    elif run.scheduler is not None:
        run.scheduler.step_update(0)
    log_record(acc, info, step=run.progress.updates)
    if acc.is_main_process:
        (run.run_dir / "config.json").write_text(json.dumps(info, indent=1, default=to_json))
    for k in trivial_topk(info["num_classes"]):
        n = info["num_classes"]
        _log.info(
            "top-%d is not reported: with %d classes every label is in the top %d of any model", k, n, k
        )
    broken = sum(t.breaks_principle for t in run.targets)
    _log.info(
        "model %s (%.2fM params, %d target layers, %d with f_out > f_in); %s",
        cfg.model, info["params"] / 1e6, len(run.targets), broken, info["method"],
    )  # fmt: skip
    _log.info(
        "%d process(es) on %s, mixed precision %s; global batch %d (%d x %d processes x %d accumulation), "
        "lr %.4g; %d updates per epoch, %d epochs, stopping after update %d; output %s",
        acc.num_processes, acc.device, acc.mixed_precision, info["global_batch"], cfg.batch_size,
        acc.num_processes, cfg.grad_accum_steps, info["lr"], info["updates_per_epoch"], info["epochs"],
        info["stop_at"], run.run_dir,
    )  # fmt: skip


def _log_rebuilt_schedule(run: Run, resume_path: Path) -> None:
    """Say that the schedule is this run's, not the checkpoint's (see :func:`load_keeping_schedule`)."""
    saved, info = saved_total_updates(resume_path), run.info
    _log.info(
        "schedule rebuilt from this run's flags (--sched %s over %d updates, %d epochs) instead of the "
        "checkpoint's (%s), as timm's train.py does on resume: only the position is restored; update %d "
        "runs at lr %.4g",
        run.cfg.sched, info["total_updates"], info["epochs"],
        f"{saved} updates" if saved is not None else "other settings", run.progress.updates + 1,
        run.optimizer.param_groups[0]["lr"],
    )  # fmt: skip
