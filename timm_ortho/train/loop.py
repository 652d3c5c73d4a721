"""The training loop behind ``scripts/train_imagenet.py`` and ``scripts/train_cifar.py``.

One loop runs both sides of every comparison in the paper: the method (orthonormal init,
:class:`~timm_ortho.OrthoModulated` with the orthonormality regularizer in place of L2 weight decay,
optional backward error modulation) and, with ``--baseline``, the usual recipe (MSRA init, L2 weight
decay, no modulation). It has the shape of Accelerate's examples: :func:`setup` builds a
:class:`Run`, :func:`train_one_epoch` and :func:`validate` advance it, :func:`train` orchestrates.

- mixed precision, the number of processes and the device come from ``accelerate launch`` (or its
  config file); nothing is hard-coded here;
- gradient accumulation through ``Accelerator(gradient_accumulation_steps)`` and
  ``accelerator.accumulate``; the optimizer is wrapped by ``OrthoModulated`` *before*
  ``accelerator.prepare`` so that the regularizer sees unscaled gradients once per update;
- a timm LR schedule stepped per update with ``step_update`` (kept out of ``prepare``, registered for
  checkpointing), optional SyncBatchNorm (timm's converter), ``torch.compile`` and ``ModelEmaV3``;
- rotating, crash-safe checkpoints (:mod:`timm_ortho.train.checkpoint`) and an exact ``--resume``;
- evaluation each epoch (top-1, top-5, loss via ``gather_for_metrics``), every record through
  ``accelerator.log`` (``metrics.jsonl`` is a tracker, :mod:`timm_ortho.train.tracking`), the
  method's per-layer statistics every ``--log-interval`` updates, plots and a summary at the end.

Exact resume: the data order and each sample's augmentation depend only on ``(seed, epoch, index)``
(see :mod:`timm_ortho.train.data`), the loader draws nothing from the global RNG, and the checkpoint
holds the model, the optimizer (with its ``ortho_decay`` / ``ortho_step`` fields), the GradScaler,
the LR schedule, the EMA weights, each process's RNG states and the position in the epoch, which
``skip_first_batches`` restores. On a CPU the resumed run ends with bit-identical weights.

One clock: the number of updates the optimizer *applied*. The trainer counts it in
``TrainProgress.updates`` (a step that a GradScaler skipped is no update: the optimizer's
``ortho_step`` does not count it either, nor does Accelerate's own scheduler wrapper), and every
other reader derives from that count: the LR schedule (timm's schedulers keep no count of their
own: ``step_update(updates)``), the EMA warmup, logs and checkpoint names; the modulation's step is
set from ``ortho_step`` by the optimizer, which counts the same updates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from torch import nn

from ..precise_bn import bn_layers, recompute_bn_statistics
from .checkpoint import CheckpointManager, check_run_folder, resolve_resume
from .config import (
    CIFAR_PROTOCOL,
    DEFAULT_PRECISE_BN_BATCHES,
    ConfigError,
    Preset,
    TrainConfig,
    build_parser,
    config_from_args,
    validate_config,
)
from .data import DataError, SeededTransform, build_datasets, build_loader, build_transforms
from .tracking import JsonlTracker, banner, format_summary, log_record, ratio_history, to_json

__all__ = [
    "CIFAR_PROTOCOL",
    "ConfigError",
    "Run",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "build_parser",
    "config_from_args",
    "evaluate",
    "format_summary",
    "init_weights_",
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
        for k, v in state.items():
            setattr(self, k, v)


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
    bn_loader: Any
    """Precise BN's own loader (own order and generator), or ``None`` when precise BN is off."""
    precise_bn: int
    probe: Any
    """The ErrorModulation whose statistics are logged: the method's own, or a measure-only one."""
    targets: list
    info: dict[str, Any]
    """The run's description: the ``config`` record of ``metrics.jsonl``."""
    checkpoints: CheckpointManager
    progress: TrainProgress = dataclasses.field(default_factory=TrainProgress)
    samples_seen: int = 0
    train_seconds: float = 0.0
    ema_eval: dict[str, float] | None = None

    @property
    def eager_model(self) -> nn.Module:
        """The model without DDP and torch.compile: precise BN's cumulative averages (momentum=None)
        would make a compiled model recompile and break its graph."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
def _cpu_only_multiprocess() -> bool:
    """Several processes launched on a machine without an accelerator (``CUDA_VISIBLE_DEVICES=``).

    Accelerate then sees each process as a lone one unless told to use the CPU, and every process
    would train its own copy into the same folder; with ``cpu=True`` they form a gloo group
    (``DistributedType.MULTI_CPU``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    probe = getattr(torch, "accelerator", None)
    return not (probe.is_available() if probe is not None else torch.cuda.is_available())


def _make_accelerator(cfg: TrainConfig) -> Any:
    import accelerate.utils as au
    from accelerate import Accelerator

    installed = [
        n for n in cfg.log_with or () if n == "all" or getattr(au, f"is_{n}_available", lambda: False)()
    ]
    accelerator = Accelerator(
        cpu=_cpu_only_multiprocess(),
        # None leaves the choice to `accelerate launch --mixed_precision` / its config file.
        mixed_precision=({"float16": "fp16", "bfloat16": "bf16"}[cfg.amp_dtype] if cfg.amp else None),
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=[JsonlTracker(os.devnull), *installed],  # the tracker's file is set with the run folder
        step_scheduler_with_optimizer=False,
    )
    # Other processes report warnings only (our own messages go through the main-process adapter).
    logging.getLogger("timm_ortho").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    for name in sorted(set(cfg.log_with or ()) - set(installed)):
        _log.warning("tracker %r is not installed (or unknown to accelerate): not logging to it", name)
    return accelerator


def _run_folder(cfg: TrainConfig, accelerator: Any) -> tuple[Path, Path | None]:
    """The run folder (named once, on the main process) and the checkpoint to resume from."""
    from accelerate.utils import broadcast_object_list

    run_dir, resume_path = None, None
    if cfg.resume is not None:
        given = Path(cfg.output) / cfg.experiment if cfg.experiment else None
        try:
            resume_path = resolve_resume(cfg.resume, given)
        except FileNotFoundError:
            # "auto" with a named run that has no checkpoint yet is a first launch: the same command
            # line then serves the first start and every restart of a preemptible job.
            if cfg.resume not in ("auto", "latest") or given is None:
                raise
            _log.info("--resume %s: no checkpoint under %s yet, starting from scratch", cfg.resume, given)
        if resume_path is not None and cfg.experiment is None and resume_path.parent.name == "checkpoints":
            run_dir = resume_path.parent.parent
    if run_dir is None:
        method = "baseline" if cfg.baseline else ("ortho-mod" if cfg.modulation else "ortho")
        name = [cfg.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{method}"]
        broadcast_object_list(name)  # the main process's clock names the folder
        run_dir = Path(cfg.output) / name[0]
    check_run_folder(run_dir, resume_path)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.project_configuration.set_directories(str(run_dir))
    return run_dir, resume_path


def _build_data(cfg: TrainConfig, accelerator: Any) -> tuple[Any, SeededTransform, Any, Any]:
    """``(datasets, train_set, train_loader, val_loader)``; the loaders are not prepared yet."""
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(cfg.model)
    size = getattr(pretrained, "input_size", None) if pretrained is not None else None
    data_cfg = cfg.data_config(cfg.img_size or (int(size[-1]) if size else 224))
    datasets = build_datasets(data_cfg)
    if datasets.synthetic:
        what = "Accuracy on it says nothing about ImageNet or CIFAR; pass --data-dir for real data."
        lines = [
            "NO DATA DIRECTORY GIVEN: TRAINING ON THE EMBEDDED SYNTHETIC DATA SET",
            datasets.description,
            what,
        ]
        _log.warning("\n%s", banner(lines))
    else:
        _log.info("data: %s", datasets.description)
    train_tf, eval_tf = build_transforms(data_cfg, datasets.mean, datasets.std, datasets.native_size)
    train_set = SeededTransform(datasets.train, train_tf, seed=cfg.seed)
    val_set = SeededTransform(datasets.val, eval_tf, seed=cfg.seed)
    loader = dict(seed=cfg.seed, workers=cfg.workers)
    loader["pin_memory"] = cfg.pin_memory if cfg.pin_memory is not None else accelerator.device.type == "cuda"
    train_loader = build_loader(train_set, cfg.batch_size, train=True, **loader)
    val_loader = build_loader(val_set, cfg.validation_batch_size or cfg.batch_size, train=False, **loader)
    return datasets, train_set, train_loader, val_loader


def init_weights_(model: nn.Module, scheme: str) -> str:
    """The trainer's whole-model initialization of a model that takes no ``init`` argument.

    ``msra`` keeps the model's own (timm) initialization; ``orthonormal`` gives every conv/linear
    weight orthonormal filters. Returns how the model was initialized, for the run's description.
    """
    from ..ortho import orthonormal_
    from ..targets import find_targets

    if scheme == "msra":
        return "the model's own (timm) initialization"
    for t in find_targets(model):
        orthonormal_(t.param, t.conv_groups)
    return "orthonormal (applied by the trainer to every conv/linear weight)"


def _create_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, str]:
    """The model and a description of its initialization."""
    import timm
    from timm.models import model_entrypoint

    from ..models.plain_cnn import StagedCnn

    kwargs: dict[str, Any] = {"num_classes": num_classes, **cfg.model_kwargs}
    if cfg.drop is not None:
        kwargs["drop_rate"] = cfg.drop
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    init = cfg.init or ("msra" if cfg.baseline else "orthonormal")
    # This package's architectures (all StagedCnn, registered from its own modules) take the
    # initialization as a creation argument; the signature says which other arguments they take.
    if not model_entrypoint(cfg.model).__module__.startswith(StagedCnn.__module__.rpartition(".")[0]):
        model = timm.create_model(cfg.model, **kwargs)
        return model, init_weights_(model, init)
    if cfg.drop_path is not None and "drop_path_rate" not in inspect.signature(StagedCnn).parameters:
        raise ConfigError(
            f"--drop-path: {cfg.model} takes no drop_path_rate (a plain net has no residual branch "
            "to drop); leave --drop-path out for this model"
        )
    return timm.create_model(cfg.model, init=init, **kwargs), init


def _build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> tuple[Any, Any, list, str]:
    """``(optimizer, probe, targets, description)``: timm's optimizer, wrapped for the method.

    The targets are found once, here, and handed to the wrapper. Without modulation the probe is a
    measure-only ErrorModulation (it changes no error), so both sides of a comparison record Fig. 3.
    """
    from timm.optim import create_optimizer_v2

    import timm_ortho

    from ..modulation import ErrorModulation
    from ..targets import find_targets

    extra = {"momentum": cfg.momentum, **({"eps": cfg.opt_eps} if cfg.opt_eps is not None else {})}
    targets = [t for t in find_targets(model, exclude=cfg.ortho_exclude) if t.param.requires_grad]
    if cfg.baseline:
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, **extra)
        probe = ErrorModulation(model, targets=targets, measure_only=True) if cfg.error_stats else None
        return optimizer, probe, targets, f"L2 weight decay {cfg.weight_decay:g}, no modulation"
    options = cfg.modulation_options()
    modulation = options if options is not None else ({"measure_only": True} if cfg.error_stats else False)
    # timm's parameter groups (no_weight_decay(), 1-D parameters), the targets without L2.
    optimizer = timm_ortho.create_optimizer(
        model,
        cfg.opt,
        lr=lr,
        weight_decay=cfg.weight_decay,
        ortho_decay=cfg.ortho_decay,
        form=cfg.ortho_form,
        modulation=modulation,
        max_grad_ratio=cfg.max_grad_ratio or None,
        target_kwargs={"targets": targets},
        **extra,
    )
    bound = f"|grad| <= {cfg.max_grad_ratio:g} |W| per layer" if cfg.max_grad_ratio else "off"
    if options is None:
        described = "off" + (" (error moments measured only)" if cfg.error_stats else "")
    else:
        described = "on " + (
            ", ".join(f"{k}={v}" for k, v in options.items()) or "(ErrorModulation defaults)"
        )
    return (
        optimizer,
        optimizer.modulation,
        optimizer.targets,
        (
            f"orthonormality regularizer lambda={cfg.ortho_decay:g} on {len(optimizer.targets)} weights "
            f"(no L2 on them), step bound {bound}, modulation {described}"
        ),
    )


def _build_schedule(cfg: TrainConfig, optimizer: Any, updates_per_epoch: int) -> tuple[Any, int, int]:
    """``(scheduler or None, total updates, epochs)``; the schedule is counted in updates."""
    from timm.scheduler import create_scheduler_v2

    if cfg.iterations is not None:
        total, epochs = cfg.iterations, math.ceil(cfg.iterations / updates_per_epoch)
    else:
        total, epochs = cfg.epochs * updates_per_epoch, cfg.epochs
    milestones = cfg.decay_steps or [round(m * updates_per_epoch) for m in cfg.decay_milestones]
    if cfg.sched == "multistep":
        # Here milestone m means: the first m updates run at the undecayed rate (the lr is divided
        # "at 32k iterations"). timm's multistep schedule decays at index m - 1, hence the shift.
        milestones = [m + 1 for m in milestones]
    warmup = (
        cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * updates_per_epoch)
    )
    # One schedule "epoch" is one update here, which lets milestones and warmup fall between epochs.
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=total,
        decay_epochs=max(1, round(cfg.decay_epochs * updates_per_epoch)),
        decay_milestones=list(milestones),
        decay_rate=cfg.decay_rate,
        warmup_epochs=warmup,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=1,
        noise_seed=cfg.seed,
    )
    return scheduler, total, epochs


def _build_loss(cfg: TrainConfig, num_classes: int) -> tuple[Any, nn.Module]:
    """``(mixup or None, training loss)`` as timm's ``train.py`` pairs them."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def _precise_bn_batches(cfg: TrainConfig, model: nn.Module) -> int:
    """``cfg.precise_bn``, or its default: on for plain nets (no shortcut), off for other models."""
    from ..models.plain_cnn import PlainCnn

    if cfg.precise_bn is not None:
        return cfg.precise_bn
    return DEFAULT_PRECISE_BN_BATCHES if isinstance(model, PlainCnn) else 0


def setup(cfg: TrainConfig) -> Run:
    """Everything a run needs, built in the order Accelerate asks for (wrap, then ``prepare``)."""
    from accelerate.utils import set_seed
    from timm.layers import convert_sync_batchnorm
    from timm.utils import ModelEmaV3

    validate_config(cfg)
    accelerator = _make_accelerator(cfg)
    run_dir, resume_path = _run_folder(cfg, accelerator)
    datasets, train_set, train_loader, val_loader = _build_data(cfg, accelerator)
    set_seed(cfg.seed)  # the model is created identically on every process
    model, init = _create_model(cfg, datasets.num_classes)
    if cfg.sync_bn and (accelerator.num_processes == 1 or accelerator.device.type == "cpu"):
        _log.warning("--sync-bn ignored: it needs several processes on accelerators")
    elif cfg.sync_bn:
        model = convert_sync_batchnorm(model)
    model.to(
        accelerator.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format
    )
    # The EMA copy is taken before the modulation hooks exist, so it never carries them.
    ema = (
        ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
        if cfg.model_ema
        else None
    )
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum_steps
    scale = global_batch / cfg.lr_base_size
    lr = (
        cfg.lr
        if cfg.lr is not None
        else cfg.lr_base * (scale if cfg.lr_base_scale == "linear" else math.sqrt(scale))
    )
    optimizer, probe, targets, method = _build_optimizer(cfg, model, lr)
    precise_bn = _precise_bn_batches(cfg, model)
    method = f"{'baseline: ' if cfg.baseline else ''}{init} init, {method}, precise BN " + (
        f"over up to {precise_bn} batches" if precise_bn else "off"
    )
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.torchcompile:
        model = torch.compile(model, backend=cfg.torchcompile)
    # Its own loader (own order, own generator): recalibrating draws nothing from the training
    # loader or the global RNG, so a resumed run sees exactly the batches of an uninterrupted one.
    bn_loader = None
    if precise_bn:
        bn_loader = build_loader(
            train_set, cfg.batch_size, train=True, seed=cfg.seed + 1, workers=cfg.workers
        )
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader
    )
    bn_loader = accelerator.prepare(bn_loader) if bn_loader is not None else None
    set_seed(cfg.seed, device_specific=True)  # per-process randomness (dropout, mixup) from here on
    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler, total_updates, epochs = _build_schedule(cfg, optimizer, updates_per_epoch)
    mixup_fn, loss_fn = _build_loss(cfg, datasets.num_classes)
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
    run = Run(
        cfg, accelerator, run_dir, model, optimizer, scheduler, ema, loss_fn, mixup_fn, train_set,
        train_loader, val_loader, bn_loader, precise_bn, probe, targets, info,
        CheckpointManager(accelerator, run_dir / "checkpoints", keep=cfg.checkpoint_hist),
    )  # fmt: skip
    _start(run, resume_path)
    return run


def _start(run: Run, resume_path: Path | None) -> None:
    """Register the checkpointed state, open the trackers, resume, and describe the run."""
    acc, cfg, info = run.accelerator, run.cfg, run.info
    for stateful in (run.progress, run.scheduler, run.ema):
        if stateful is not None:
            acc.register_for_checkpointing(stateful)
    jsonl = next(t for t in acc.log_with if isinstance(t, JsonlTracker))
    jsonl.path = run.run_dir / "metrics.jsonl"
    hparams = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in info["config"].items()
    }
    acc.init_trackers(run.run_dir.name, config=hparams)
    if resume_path is not None:
        acc.load_state(str(resume_path))
        p = run.progress
        _log.info("resumed from %s: epoch %d, batch %d, update %d", resume_path, p.epoch, p.batch, p.updates)
        log_record(acc, {"type": "resume", "from": str(resume_path), **p.state_dict()})
    elif run.scheduler is not None:
        run.scheduler.step_update(0)
    log_record(acc, info)
    if acc.is_main_process:
        (run.run_dir / "config.json").write_text(json.dumps(info, indent=1, default=to_json))
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


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def train_one_epoch(run: Run, epoch: int) -> float:
    """Train from ``run.progress.batch`` to the end of ``epoch`` or to the stop; returns the seconds."""
    from tqdm.auto import tqdm

    acc, cfg, progress, model, optimizer = run.accelerator, run.cfg, run.progress, run.model, run.optimizer
    run.train_set.set_epoch(epoch)
    run.train_loader.set_epoch(epoch)
    if run.mixup_fn is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
        run.mixup_fn.mixup_enabled = False
    start = progress.batch
    loader = acc.skip_first_batches(run.train_loader, start) if start else run.train_loader
    bar = tqdm(
        total=len(run.train_loader),
        initial=start,
        desc=f"epoch {epoch + 1}/{run.info['epochs']}",
        disable=not acc.is_local_main_process,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    loss_sum = torch.zeros((), device=acc.device)
    count, samples, t_interval, t_epoch = 0, 0, time.perf_counter(), time.perf_counter()
    for images, labels in loader:
        if run.mixup_fn is not None:
            images, labels = run.mixup_fn(images, labels)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with acc.accumulate(model):
            loss = run.loss_fn(model(images), labels)
            acc.backward(loss)
            if acc.sync_gradients and cfg.clip_grad is not None:
                clip = acc.clip_grad_norm_ if cfg.clip_mode == "norm" else acc.clip_grad_value_
                clip(model.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        progress.batch += 1
        loss_sum += loss.detach().float()
        count, samples = count + 1, samples + images.shape[0]
        bar.update(1)
        if not acc.sync_gradients or optimizer.step_was_skipped:  # no update applied: the clock stays
            continue
        progress.updates += 1
        if run.scheduler is not None:
            run.scheduler.step_update(progress.updates)
        if run.ema is not None:
            run.ema.update(acc.unwrap_model(model), step=progress.updates)
        if progress.updates % cfg.log_interval == 0:
            loss = _log_step(run, epoch, loss_sum / max(count, 1), time.perf_counter() - t_interval, samples)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}", refresh=False)
            loss_sum.zero_()
            count, samples, t_interval = 0, 0, time.perf_counter()
        if progress.updates >= run.info["stop_at"]:
            break
        if cfg.checkpoint_interval and progress.updates % cfg.checkpoint_interval == 0:
            run.checkpoints.save(progress.updates, {"epoch": epoch, "batch": progress.batch})
    bar.close()
    seconds = time.perf_counter() - t_epoch
    run.train_seconds += seconds
    run.samples_seen += (progress.batch - start) * cfg.batch_size * acc.num_processes
    if progress.batch >= len(run.train_loader):
        progress.epoch, progress.batch = epoch + 1, 0
    return seconds


def _log_step(run: Run, epoch: int, mean_loss: torch.Tensor, seconds: float, samples: int) -> float:
    """The ``train`` and ``layers`` records; the one place of the hot loop that reads the device."""
    from ..diagnostics import filter_correlation, layer_penalties

    acc, step = run.accelerator, run.progress.updates
    loss = acc.reduce(mean_loss, "mean").item()
    residuals, cosines = layer_penalties(run.targets), filter_correlation(run.targets)
    record: dict[str, Any] = {
        "type": "train",
        "epoch": epoch,
        "step": step,
        "loss": loss,
        "lr": float(run.optimizer.param_groups[0]["lr"]),
        "samples_per_s": samples * acc.num_processes / max(seconds, 1e-9),
        "ortho_residual": float(residuals.sum()),
        "filter_cos": float(cosines.mean()),
    }
    if not run.cfg.baseline:  # the prepared optimizer wraps the OrthoModulated
        record["ortho_penalty"] = float(run.optimizer.optimizer.penalty())
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


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, accelerator: Any, channels_last: bool = False
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) over the whole split, gathered across processes."""
    from timm.utils import accuracy

    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top-1, top-5, samples
    for images, targets in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(images)
        # The whole split exactly once: gather_for_metrics drops the samples padded onto the last batch.
        logits, targets = accelerator.gather_for_metrics((logits.float(), targets))
        n = len(targets)
        hits = (torch.stack(accuracy(logits, targets, topk=(1, 5))).double() * n / 100).round()
        loss = F.cross_entropy(logits, targets, reduction="sum").double()
        totals += torch.cat([loss[None], hits, hits.new_tensor([n])])
    model.train(was_training)
    loss_sum, top1, top5, n = totals.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def recalibrate_bn(model: nn.Module, run: Run) -> int:
    """Precise BN in a (possibly distributed) run: recompute, then average the statistics over processes.

    Each process averages over its own shard of ``run.precise_bn`` batches; the per-process results
    are then averaged (every process saw as many batches, so that is the mean over all of them).
    """
    acc, channels_last = run.accelerator, run.cfg.channels_last

    def images_of(batch: Any) -> torch.Tensor:
        return batch[0].contiguous(memory_format=torch.channels_last) if channels_last else batch[0]

    with acc.autocast():
        used = recompute_bn_statistics(model, run.bn_loader, run.precise_bn, prepare=images_of)
    if acc.num_processes > 1:
        for layer in bn_layers(model):
            for buffer in (layer.running_mean, layer.running_var):
                buffer.copy_(acc.reduce(buffer.clone(), reduction="mean"))
    return used


@contextlib.contextmanager
def precise_bn_for_eval(model: nn.Module, run: Run) -> Iterator[None]:
    """Recomputed BN statistics inside the block (evaluation, saving the evaluated weights), the
    training ones restored after it: evaluating never changes the state that training continues
    from, so a run resumed from any checkpoint ends exactly where an uninterrupted one does."""
    layers = bn_layers(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    recalibrate_bn(model, run)
    try:
        yield
    finally:
        for m, (mean, var, count) in zip(layers, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)


def validate(run: Run, epoch: int, epoch_seconds: float) -> None:
    """Evaluate (with precise BN when on), log the ``eval`` record, save the weights files."""
    acc, cfg, progress, ema = run.accelerator, run.cfg, run.progress, run.ema
    with contextlib.ExitStack() as evaluation_state:
        if run.bn_loader is not None:  # evaluated (and saved) with precise BN, trained on unchanged
            run.bn_loader.set_epoch(epoch)
            for model in (run.eager_model, ema.module if ema is not None else None):
                if model is not None:
                    evaluation_state.enter_context(precise_bn_for_eval(model, run))
        evaluation = evaluate(run.model, run.val_loader, acc, cfg.channels_last)
        record = {"type": "eval", "epoch": epoch, "step": progress.updates, "epoch_seconds": epoch_seconds}
        record.update({f"val_{k}": v for k, v in evaluation.items()})
        if ema is not None:
            run.ema_eval = evaluate(ema.module, run.val_loader, acc, cfg.channels_last)
            record.update({f"ema_val_{k}": v for k, v in run.ema_eval.items()})
        is_best = progress.best_top1 is None or evaluation["top1"] > progress.best_top1
        if is_best:
            progress.best_top1, progress.best_epoch = evaluation["top1"], epoch
        progress.last_eval = evaluation
        record.update(best_top1=progress.best_top1, best_epoch=progress.best_epoch)
        log_record(acc, record)
        _log.info(
            "epoch %d/%d (update %d): val loss %.4f, top-1 %.2f%%, top-5 %.2f%%%s; "
            "best top-1 %.2f%% (epoch %d)",
            epoch + 1, run.info["epochs"], progress.updates, evaluation["loss"], evaluation["top1"],
            evaluation["top5"], f"; EMA top-1 {run.ema_eval['top1']:.2f}%" if run.ema_eval else "",
            progress.best_top1, progress.best_epoch + 1,
        )  # fmt: skip
        for name in ("last.pth", "model_best.pth") if is_best else ("last.pth",):
            _save_weights(run, name, epoch)


def _save_weights(run: Run, name: str, epoch: int) -> None:
    """A timm-loadable weights file, written under a temporary name and renamed (never truncated)."""
    state = run.accelerator.get_state_dict(run.model)
    if run.accelerator.is_main_process:
        payload: dict[str, Any] = {
            "state_dict": state,
            "arch": run.cfg.model,
            "epoch": epoch,
            "updates": run.progress.updates,
            "metric": run.progress.last_eval,
            "num_classes": run.info["num_classes"],
        }
        if run.ema is not None:
            payload["state_dict_ema"] = run.ema.module.state_dict()
        tmp = run.run_dir / f".tmp-{name}"
        torch.save(payload, tmp)
        os.replace(tmp, run.run_dir / name)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) as ``cfg`` says; returns the summary (also in ``summary.json``) and the model.

    Must be called by every process of an ``accelerate launch``.
    """
    t_start = time.perf_counter()
    run = setup(cfg)
    progress = run.progress
    run.model.train()
    for epoch in range(progress.epoch, run.info["epochs"]):
        if progress.updates >= run.info["stop_at"]:
            break
        seconds = train_one_epoch(run, epoch)
        validate(run, epoch, seconds)
        _log.info(
            "checkpoint %s",
            run.checkpoints.save(progress.updates, {"epoch": progress.epoch, "batch": progress.batch}),
        )
    summary = _finish(run, time.perf_counter() - t_start)
    return TrainResult(
        summary=summary,
        model=run.accelerator.unwrap_model(run.model),
        run_dir=run.run_dir,
        ema_model=run.ema.module if run.ema is not None else None,
    )


def _finish(run: Run, wall_seconds: float) -> dict[str, Any]:
    """Leave the returned model as evaluated, draw the plots, log and write the summary."""
    from ..diagnostics import filter_correlation, layer_penalties

    acc, progress, ema = run.accelerator, run.progress, run.ema
    trained = run.samples_seen > 0  # a backward ran in this process
    if run.bn_loader is not None and trained:  # the returned model carries what was evaluated
        for module in (run.eager_model, ema.module if ema is not None else None):
            if module is not None:
                run.bn_loader.set_epoch(progress.epoch - 1 if progress.batch == 0 else progress.epoch)
                recalibrate_bn(module, run)
    pngs = _plots(run) if run.probe is not None and acc.is_main_process and trained else []
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
        "ortho_residual": float(layer_penalties(run.targets).sum()),
        "filter_cos": float(filter_correlation(run.targets).mean()),
        "wall_seconds": wall_seconds,
        "train_samples_per_s": run.samples_seen / run.train_seconds if run.train_seconds > 0 else None,
        "plots": pngs,
    }
    log_record(acc, summary)
    if acc.is_main_process:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=to_json))
        _log.info("\n%s", format_summary(summary))
    acc.end_training()
    if run.probe is not None:
        run.probe.remove()
    return summary


def _plots(run: Run) -> list[str]:
    """The error moments of this process's last backward and the bottom/top ratio over the run."""
    from .plots import plot_error_moments, plot_ratio_history

    cfg, modulated = run.cfg, run.cfg.modulation is not False
    # With modulation, what the same forward gives without it and what the weight gradients saw;
    # without, the measured moments.
    which = ("unmodulated", "after") if modulated else ("before",)
    title = f"{cfg.model}: error second moments at update {run.progress.updates}"
    pngs = [
        str(
            plot_error_moments(
                run.probe.last_stats(), run.run_dir / "error_moments.png", which=which, title=title
            )
        )
    ]
    history = ratio_history(run.run_dir / "metrics.jsonl", unmodulated=modulated)
    if history:
        pngs.append(str(plot_ratio_history(history, run.run_dir / "bottom_top_ratio.png", title=cfg.model)))
    return pngs


def main(argv: Sequence[str] | None = None, preset: Preset = "imagenet") -> int:
    """Entry point of the scripts: parse flags, train, return the process exit code."""
    args = build_parser(preset).parse_args(argv)
    # Every process logs at INFO; the trainer's messages go through accelerate's main-process adapter.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # Accelerate reports every file of every checkpoint at INFO; the trainer reports the checkpoint.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        train(config_from_args(args))
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
