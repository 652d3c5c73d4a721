"""The training loop behind ``scripts/train_imagenet.py`` and ``scripts/train_cifar.py``.

One loop runs both sides of every comparison in the paper: the method (orthonormal init,
:class:`~timm_ortho.OrthoModulated` with the orthonormality regularizer in place of L2 weight decay,
optional backward error modulation) and, with ``--baseline``, the usual recipe (MSRA init, L2 weight
decay, no modulation). It has the shape of Accelerate's examples: :func:`setup` builds a :class:`Run`
(from the pieces of :mod:`timm_ortho.train.build`), :func:`train_one_epoch` and :func:`validate`
advance it, :func:`train` orchestrates. Mixed precision, processes and device come from
``accelerate launch``; the optimizer is wrapped *before* ``accelerator.prepare`` so that the
regularizer sees unscaled gradients, once per update under gradient accumulation.

Exact resume: the data order and each sample's augmentation depend only on ``(seed, epoch, index)``
(see :mod:`timm_ortho.train.data`), the loaders draw nothing from the global RNG, and the checkpoint
holds the model, the optimizer (with its ``ortho_decay`` / ``ortho_step`` fields), the GradScaler,
the LR schedule, the EMA weights, each process's RNG states and the position in the epoch, which
``skip_first_batches`` restores. On a CPU the resumed run ends with bit-identical weights.

One clock: the number of updates the optimizer *applied*. The trainer counts it in
``TrainProgress.updates``; a step that a GradScaler skipped is no update (the optimizer's
``ortho_step`` does not count it, nor does Accelerate's own scheduler wrapper step on it), so the two
counts agree. Every other reader derives from the trainer's count: the LR schedule (timm's
schedulers keep no count of their own: ``step_update(updates)``), the EMA warmup, the log steps and
the checkpoint names; the modulation's step is set from ``ortho_step`` by the optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from . import build, optimization
from .checkpoint import CheckpointError, CheckpointManager, write_atomic
from .config import ConfigError, Preset, TrainConfig, build_parser, config_from_args, validate_config
from .data import DataError, SeededTransform, skipped_images
from .evaluation import PreciseBN, evaluate, trivial_topk
from .guards import Diverged, DivergenceMonitor, StopSignals, exit_code_for, resume_command
from .resume import load_keeping_schedule, recipe_of, saved_total_updates
from .tracking import JsonlTracker, format_summary, log_record, ratio_history, to_json

__all__ = [
    "Run",
    "TrainProgress",
    "TrainResult",
    "main",
    "setup",
    "train",
    "train_one_epoch",
    "validate",
]

_log = get_logger("timm_ortho.train")


@dataclass
class TrainResult:
    """What :func:`train` returns: the summary (also in ``summary.json``) and the trained model."""

    summary: dict[str, Any]
    model: nn.Module
    """The unwrapped model (no DDP / compile wrapper, modulation hooks removed)."""
    run_dir: Path
    ema_model: nn.Module | None = None
    stopped_by: str | None = None
    """``"SIGTERM"`` or ``"SIGINT"`` when a signal stopped the run (after a checkpoint); else None."""


@dataclass
class TrainProgress:
    """Where the run stands; saved in every checkpoint (``register_for_checkpointing``)."""

    epoch: int = 0
    batch: int = 0
    """Micro-batches of ``epoch`` already consumed; ``skip_first_batches`` skips them on resume."""
    updates: int = 0
    """The run's clock: optimizer updates applied (see the module's docstring)."""
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
    last_checkpoint: Path | None = None
    last_checkpoint_update: int = -1
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


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
@dataclass
class _Interval:
    """The training loss and samples since the last log record (the loss summed on the device)."""

    loss_sum: torch.Tensor
    count: int = 0
    samples: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss.detach().float()
        self.count, self.samples = self.count + 1, self.samples + samples

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.count, self.samples, self.start = 0, 0, time.perf_counter()


def train_one_epoch(run: Run, epoch: int) -> float:
    """Train from ``run.progress.batch`` to the end of ``epoch`` or to the stop; returns the seconds."""
    from tqdm.auto import tqdm

    acc, cfg, progress = run.accelerator, run.cfg, run.progress
    run.train_set.set_epoch(epoch)
    run.train_loader.set_epoch(epoch)
    if run.mixup_fn is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
        run.mixup_fn.mixup_enabled = False
    start, t_epoch = progress.batch, time.perf_counter()
    loader = acc.skip_first_batches(run.train_loader, start) if start else run.train_loader
    interval = _Interval(torch.zeros((), device=acc.device))
    window_bad = False  # skip mode: a non-finite loss in this accumulation window
    bar_options = dict(disable=not acc.is_local_main_process, dynamic_ncols=True, mininterval=1.0)
    # A context: the bar is closed also when the loop raises, so an error line does not share its line.
    with tqdm(total=len(run.train_loader), initial=start, desc=f"epoch {epoch + 1}/{run.info['epochs']}",
              **bar_options) as bar:  # fmt: skip
        for images, labels in loader:
            loss, window_bad, applied = _train_step(run, images, labels, window_bad)
            progress.batch += 1
            if not window_bad:
                interval.add(loss, images.shape[0])
            window_bad &= not acc.sync_gradients  # a window ends at every sync
            bar.update(1)
            if applied and _after_update(run, epoch, interval, bar):
                break
        # The rest of the interval, so that an epoch (or a whole run) shorter than --log-interval
        # still leaves its train record: curves and the ratio history have a point per epoch at least.
        if interval.count and progress.updates != run.last_logged_update:
            _log_step(run, epoch, interval)
    seconds = time.perf_counter() - t_epoch
    run.train_seconds += seconds
    run.samples_seen += (progress.batch - start) * cfg.batch_size * acc.num_processes
    if progress.batch >= len(run.train_loader):
        progress.epoch, progress.batch = epoch + 1, 0
    return seconds


def _train_step(run: Run, images: torch.Tensor, labels: torch.Tensor, window_bad: bool) -> tuple:
    """One micro-batch: forward and backward, and at the end of an accumulation window the update.

    Returns ``(loss, window_bad, applied)``: the micro-batch's loss, whether the window up to this
    micro-batch holds a non-finite loss (skip mode), and whether an update was applied (the run's
    clock advances).
    """
    acc, cfg, model, optimizer = run.accelerator, run.cfg, run.model, run.optimizer
    if run.mixup_fn is not None:
        images, labels = run.mixup_fn(images, labels)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with acc.accumulate(model):
        loss = run.loss_fn(model(images), labels)
        run.divergence.observe(loss, run.progress.updates + 1)  # on the device: no sync
        acc.backward(loss)
        if run.divergence.skip:  # reads the loss on every process: one sync per micro-batch
            window_bad |= run.divergence.should_skip(loss, run.progress.updates + 1, acc)
        skip_update = window_bad and acc.sync_gradients
        if acc.sync_gradients and cfg.clip_grad is not None and not skip_update:
            clip = acc.clip_grad_norm_ if cfg.clip_mode == "norm" else acc.clip_grad_value_
            clip(model.parameters(), cfg.clip_grad)
        if not skip_update:  # the whole window's gradient holds the NaN: no step on it
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    applied = acc.sync_gradients and not skip_update and not optimizer.step_was_skipped
    return loss, window_bad, applied


def _after_update(run: Run, epoch: int, interval: _Interval, bar: Any) -> bool:
    """The clock advances: schedule, EMA, log, checkpoint, stop. Returns whether the epoch ends here."""
    acc, cfg, progress = run.accelerator, run.cfg, run.progress
    progress.updates += 1
    if run.scheduler is not None:
        run.scheduler.step_update(progress.updates)
    if run.ema is not None:
        run.ema.update(acc.unwrap_model(run.model), step=progress.updates)
    if progress.updates % cfg.log_interval == 0:
        mean = _log_step(run, epoch, interval)
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.3g}", refresh=False)
        interval.reset()
    if progress.updates >= run.info["stop_at"]:
        return True
    if cfg.checkpoint_interval and progress.updates % cfg.checkpoint_interval == 0:
        _checkpoint(run)
    if _stop_requested(run):
        run.stopped_by = run.stop.received or "a signal to another process"
        return True
    return False


def _log_step(run: Run, epoch: int, interval: _Interval) -> float:
    """The ``train`` and ``layers`` records; the one place of the hot loop that reads the device."""
    acc, step = run.accelerator, run.progress.updates
    run.last_logged_update = step
    loss = acc.reduce(interval.loss_sum / max(interval.count, 1), "mean").item()
    elapsed = time.perf_counter() - interval.start
    run.divergence.check(acc)  # the loss was just read: this costs no further wait
    residuals, cosines, filters = _filters(run)
    record: dict[str, Any] = {
        "type": "train",
        "epoch": epoch + 1,  # epochs count from 1 wherever they are shown
        "step": step,
        "loss": loss,
        "lr": float(run.optimizer.param_groups[0]["lr"]),
        "samples_per_s": interval.samples * acc.num_processes / max(elapsed, 1e-9),
        **filters,
    }
    if not run.cfg.baseline:  # the prepared optimizer wraps the OrthoModulated
        ortho = run.optimizer.optimizer
        # Its targets are run.targets less any frozen weight: reuse the residuals when they align.
        aligned = len(ortho.targets) == len(run.targets)
        record["ortho_penalty"] = float(ortho.penalty(residuals if aligned else None))
    layers = {
        "type": "layers",
        "step": step,
        "ortho_residual": residuals.tolist(),
        "filter_cos": cosines.tolist(),
    }
    stats = run.probe.last_stats() if run.probe is not None else None
    if stats is not None:
        record.update({f"mod_{k}": v for k, v in stats.as_dict().items()})
        per_layer = {k: torch.as_tensor(getattr(stats, k)).tolist() for k in ("q_before", "q_after", "scale")}
        layers.update(names=list(stats.names), **per_layer)
    log_record(acc, record)
    log_record(acc, layers)
    return loss


def validate(run: Run, epoch: int, epoch_seconds: float) -> None:
    """Evaluate (with precise BN when on), log the ``eval`` record, save the weights files."""
    acc, cfg, progress, ema = run.accelerator, run.cfg, run.progress, run.ema
    _check_finite(run)  # no evaluation, last.pth or model_best.pth of a diverged run
    with contextlib.ExitStack() as evaluation_state:
        if run.precise_bn is not None:  # evaluated (and saved) with precise BN, trained on unchanged
            run.precise_bn.set_epoch(epoch)
            for model in run.models:
                evaluation_state.enter_context(run.precise_bn.for_eval(model, acc))
        evaluation = evaluate(run.model, run.val_loader, acc, cfg.channels_last)
        record = {"type": "eval", "epoch": epoch + 1, "step": progress.updates}
        record["epoch_seconds"] = epoch_seconds
        record.update({f"val_{k}": v for k, v in evaluation.items()})
        if ema is not None:
            run.ema_eval = evaluate(ema.module, run.val_loader, acc, cfg.channels_last)
            record.update({f"ema_val_{k}": v for k, v in run.ema_eval.items()})
        is_best = progress.best_top1 is None or evaluation["top1"] > progress.best_top1
        if is_best:
            progress.best_top1, progress.best_epoch = evaluation["top1"], epoch + 1
        progress.last_eval = evaluation
        record.update(best_top1=progress.best_top1, best_epoch=progress.best_epoch)
        log_record(acc, record)
        _log.info(
            "epoch %d/%d (update %d): val loss %.4f, top-1 %.2f%%%s%s; best top-1 %.2f%% (epoch %d)",
            epoch + 1, run.info["epochs"], progress.updates, evaluation["loss"], evaluation["top1"],
            f", top-5 {evaluation['top5']:.2f}%" if "top5" in evaluation else "",
            f"; EMA top-1 {run.ema_eval['top1']:.2f}%" if run.ema_eval else "",
            progress.best_top1, progress.best_epoch,
        )  # fmt: skip
        for name in ("last.pth", "model_best.pth") if is_best else ("last.pth",):
            _save_weights(run, name, epoch)


def _save_weights(run: Run, name: str, epoch: int) -> None:
    """A timm-loadable weights file, written under a temporary name and renamed (never truncated)."""
    # The eager module: under --torchcompile the compiled wrapper's keys carry an `_orig_mod.` prefix,
    # which timm's loaders (validate.py, create_model(checkpoint_path=...)) do not expect.
    state = run.accelerator.get_state_dict(run.eager_model)
    if run.accelerator.is_main_process:
        payload: dict[str, Any] = {
            "state_dict": state,
            "arch": run.cfg.model,
            "epoch": epoch + 1,  # epochs completed
            "updates": run.progress.updates,
            "metric": run.progress.last_eval,
            "num_classes": run.info["num_classes"],
        }
        if run.ema is not None:
            payload["state_dict_ema"] = run.ema.module.state_dict()
        try:
            write_atomic(payload, run.run_dir / name)
        except CheckpointError as e:  # the checkpoint that follows retries, then rescues the state
            _log.error("%s", e)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) as ``cfg`` says; returns the summary (also in ``summary.json``) and the model.

    Must be called by every process of an ``accelerate launch``. SIGTERM or SIGINT stop the run after
    the current update with a checkpoint (:attr:`TrainResult.stopped_by`); a non-finite loss or
    weights raise :class:`~timm_ortho.train.guards.Diverged` before anything non-finite is saved.
    """
    t_start = time.perf_counter()
    run = setup(cfg)
    progress = run.progress
    run.model.train()
    with run.stop:
        for epoch in range(progress.epoch, run.info["epochs"]):
            if progress.updates >= run.info["stop_at"]:
                break
            seconds = train_one_epoch(run, epoch)
            if run.stopped_by and progress.batch:  # mid-epoch: checkpoint and go
                break
            validate(run, epoch, seconds)
            _log.info("checkpoint %s", _checkpoint(run))
            if run.stopped_by:
                break
        if progress.updates >= run.info["stop_at"]:  # the run is complete, even if a signal came
            run.stopped_by = None
        summary = _stopped(run, time.perf_counter() - t_start) if run.stopped_by else None
    summary = summary or _finish(run, time.perf_counter() - t_start)
    run.accelerator.end_training()
    if run.probe is not None:
        run.probe.remove()
    ema_model = run.ema.module if run.ema is not None else None
    return TrainResult(summary, run.eager_model, run.run_dir, ema_model, run.stopped_by)


# Updates between two checks for a stop signal when several processes must agree (one all-reduce).
_STOP_POLL = 5


def _stop_requested(run: Run) -> bool:
    """One process: the signal flag (no sync). Several: every ``_STOP_POLL`` updates, all together."""
    acc = run.accelerator
    return (acc.num_processes == 1 or run.progress.updates % _STOP_POLL == 0) and run.stop.requested(acc)


def _check_finite(run: Run) -> None:
    """Raise Diverged if a loss so far or the current weights are not finite (two small syncs)."""
    run.divergence.check(run.accelerator)
    run.divergence.check_weights(run.model.parameters(), run.progress.updates)


def _checkpoint(run: Run) -> Path:
    """A crash-safe checkpoint of the current state, never of a diverged one."""
    _check_finite(run)
    progress = run.progress
    info = {"epoch": progress.epoch, "batch": progress.batch, "total_updates": run.info["total_updates"]}
    run.last_checkpoint = run.checkpoints.save(progress.updates, info)
    run.last_checkpoint_update = progress.updates
    return run.last_checkpoint


def _stopped(run: Run, wall_seconds: float) -> dict[str, Any]:
    """After a stop signal: the checkpoint and the command that resumes from it; returns the record."""
    acc, progress = run.accelerator, run.progress
    newest = run.last_checkpoint
    if newest is None or run.last_checkpoint_update != progress.updates:  # not saved at this update yet
        newest = _checkpoint(run)
    command = resume_command(sys.argv, str(newest))
    who = run.stop.received or "another process's signal"
    _log.warning(
        "stopped by %s after update %d; checkpoint %s. Resume with:\n  %s",
        who, progress.updates, newest, command,
    )  # fmt: skip
    record = {"type": "stopped", "signal": who, "step": progress.updates, "checkpoint": str(newest)}
    log_record(acc, {**record, "resume": command, "wall_seconds": wall_seconds}, step=progress.updates)
    acc.wait_for_everyone()  # the processes leave together: a launcher ends the others at the first exit
    return record


def _filters(run: Run) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Each target's orthonormality residual and mean filter cosine, and the whole model's."""
    from ..diagnostics import filter_statistics

    residuals, cosines = filter_statistics(run.targets)  # one Gram pass for both
    return residuals, cosines, {"ortho_residual": float(residuals.sum()), "filter_cos": float(cosines.mean())}


def _finish(run: Run, wall_seconds: float) -> dict[str, Any]:
    """Leave the returned model as evaluated, draw the plots, log and write the summary."""
    acc, progress = run.accelerator, run.progress
    trained = run.samples_seen > 0  # a backward ran in this process
    if run.precise_bn is not None and trained:  # the returned model carries what was evaluated
        for module in run.models:
            run.precise_bn.set_epoch(progress.epoch - 1 if progress.batch == 0 else progress.epoch)
            run.precise_bn.recalibrate(module, acc)
    pngs = _plots(run) if acc.is_main_process and trained else []
    skipped = skipped_images(run.train_set, acc)  # a collective: every process calls it
    keys = ("run_dir", "model", "params", "method", "data", "synthetic", "processes", "mixed_precision")
    summary: dict[str, Any] = {
        "type": "summary",
        **{k: run.info[k] for k in keys},
        "updates": progress.updates,
        "epochs_done": progress.epoch + progress.batch / max(len(run.train_loader), 1),
        "final_eval": progress.last_eval,
        "ema_eval": run.ema_eval,
        "best_top1": progress.best_top1,
        "best_epoch": progress.best_epoch,
        **_filters(run)[2],
        "wall_seconds": wall_seconds,
        "train_samples_per_s": run.samples_seen / run.train_seconds if run.train_seconds > 0 else None,
        "plots": pngs,
        "skipped_images": len(skipped),
    }
    log_record(acc, summary, step=progress.updates)
    if acc.is_main_process:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=to_json))
        _log.info("\n%s", format_summary(summary))
    return summary


def _plots(run: Run) -> list[str]:
    """The loss and accuracy curves; with a probe, the error moments of this process's last backward
    and the bottom/top ratio over the run."""
    from .plots import plot_error_moments, plot_ratio_history, plot_training_curves

    cfg, modulated = run.cfg, run.probe is not None and not run.probe.measure_only
    metrics = run.run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    curves = plot_training_curves([json.loads(line) for line in lines], run.run_dir / "training_curves.png")
    pngs = [str(curves)] if curves is not None else []
    if run.probe is None:
        return pngs
    # With modulation, what the same forward gives without it and what the weight gradients saw;
    # without, the measured moments.
    which = ("unmodulated", "after") if modulated else ("before",)
    title = f"{cfg.model}: error second moments at update {run.progress.updates}"
    moments = plot_error_moments(
        run.probe.last_stats(), run.run_dir / "error_moments.png", which=which, title=title
    )
    pngs.append(str(moments))
    history = ratio_history(metrics, unmodulated=modulated)
    if history:
        pngs.append(str(plot_ratio_history(history, run.run_dir / "bottom_top_ratio.png", title=cfg.model)))
    return pngs


def main(argv: Sequence[str] | None = None, preset: Preset = "imagenet", prog: str | None = None) -> int:
    """Entry point of the scripts and of ``timm-ortho-train``: parse flags, train, return the exit code."""
    args = build_parser(preset, prog).parse_args(argv)
    # Every process logs at INFO; the trainer's messages go through accelerate's main-process adapter.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # Accelerate reports every file of every checkpoint at INFO; the trainer reports the checkpoint.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        result = train(config_from_args(args))
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e} No checkpoint or weights file holds the diverged state.", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("aborted (a second Ctrl-C): the newest checkpoint is the state to resume from", file=sys.stderr)
        return exit_code_for("SIGINT")
    return exit_code_for(result.stopped_by)
