"""The training loop behind ``scripts/train_imagenet.py`` and ``scripts/train_cifar.py``.

One loop runs both sides of every comparison in the paper: the method (orthonormal init,
:class:`~timm_ortho.OrthoModulated` with the orthonormality regularizer in place of L2 weight decay,
optional backward error modulation) and, with ``--baseline``, the usual recipe (MSRA init, L2 weight
decay, no modulation). It has the shape of Accelerate's examples: :func:`~timm_ortho.train.setup.setup`
builds a :class:`~timm_ortho.train.setup.Run` (the loop's state), :func:`train_one_epoch` and
:func:`validate` advance it, :func:`train` orchestrates. Mixed precision, processes and device come from
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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from .checkpoint import CheckpointError, write_atomic
from .config import ConfigError, Preset, TrainConfig, build_parser, config_from_args
from .data import DataError, skipped_images
from .evaluation import evaluate
from .guards import Diverged, StopSignals, exit_code_for, resume_command
from .setup import Run, TrainProgress, setup
from .tracking import format_summary, log_record, to_json

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
    if _stop_requested(run.stop, acc, progress.updates):
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
    residuals, cosines, filters = _filters(run.targets)
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


def _stop_requested(stop: StopSignals, accelerator: Any, updates: int) -> bool:
    """One process: the signal flag (no sync). Several: every ``_STOP_POLL`` updates, all together."""
    return (accelerator.num_processes == 1 or updates % _STOP_POLL == 0) and stop.requested(accelerator)


def _check_finite(run: Run) -> None:
    """Raise Diverged if a loss so far or the current weights are not finite (two small syncs)."""
    run.divergence.check(run.accelerator)
    run.divergence.check_weights(run.model.parameters(), run.progress.updates)


def _checkpoint(run: Run) -> Path:
    """A crash-safe checkpoint of the current state, never of a diverged one."""
    _check_finite(run)
    progress = run.progress
    info = {"epoch": progress.epoch, "batch": progress.batch, "total_updates": run.info["total_updates"]}
    return run.checkpoints.save(progress.updates, info)


def _stopped(run: Run, wall_seconds: float) -> dict[str, Any]:
    """After a stop signal: the checkpoint and the command that resumes from it; returns the record."""
    acc, progress = run.accelerator, run.progress
    saved = run.checkpoints.saved
    # The newest checkpoint of this run, unless it was not saved at this update yet.
    newest = saved[1] if saved is not None and saved[0] == progress.updates else _checkpoint(run)
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


def _filters(targets: list) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Each target's orthonormality residual and mean filter cosine, and the whole model's."""
    from ..diagnostics import filter_statistics

    residuals, cosines = filter_statistics(targets)  # one Gram pass for both
    return residuals, cosines, {"ortho_residual": float(residuals.sum()), "filter_cos": float(cosines.mean())}


def _finish(run: Run, wall_seconds: float) -> dict[str, Any]:
    """Leave the returned model as evaluated, draw the plots, log and write the summary."""
    acc, progress = run.accelerator, run.progress
    trained = run.samples_seen > 0  # a backward ran in this process
    if run.precise_bn is not None and trained:  # the returned model carries what was evaluated
        for module in run.models:
            run.precise_bn.set_epoch(progress.epoch - 1 if progress.batch == 0 else progress.epoch)
            run.precise_bn.recalibrate(module, acc)
    if acc.is_main_process and trained:
        from .plots import plot_run

        pngs = plot_run(run.run_dir, run.cfg.model, run.probe, progress.updates)
    else:
        pngs = []
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
        **_filters(run.targets)[2],
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
