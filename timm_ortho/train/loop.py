"""The training loop behind ``scripts/train_imagenet.py`` and ``scripts/train_cifar.py``.

One loop runs both sides of every comparison in the paper: the method (orthonormal init,
:class:`~timm_ortho.OrthoModulated` with the orthonormality regularizer in place of L2 weight decay,
optional backward error modulation) and, with ``--baseline``, the usual recipe (MSRA init, L2 weight
decay, no modulation). Everything else is shared and built on Hugging Face Accelerate:

- mixed precision, the number of processes and the device come from ``accelerate launch`` (or its
  config file); nothing is hard-coded here;
- gradient accumulation through ``Accelerator(gradient_accumulation_steps)`` and
  ``accelerator.accumulate``; the optimizer is wrapped by ``OrthoModulated`` *before*
  ``accelerator.prepare`` so that the regularizer sees unscaled gradients once per update;
- a timm LR schedule stepped per update with ``step_update`` (kept out of ``prepare``, registered for
  checkpointing), optional SyncBatchNorm (timm's converter), ``torch.compile`` and ``ModelEmaV3``;
- rotating, crash-safe checkpoints (:mod:`timm_ortho.train.checkpoint`) and an exact ``--resume``;
- evaluation each epoch (top-1, top-5, loss via ``gather_for_metrics``), a JSON-lines metrics file,
  Accelerate trackers when installed, the method's per-layer statistics every ``--log-interval``
  updates, a PNG of the per-layer error moments and a summary at the end.

Exact resume: the data order and each sample's augmentation depend only on ``(seed, epoch, index)``
(see :mod:`timm_ortho.train.data`), the loader draws nothing from the global RNG, and the checkpoint holds
the model, the optimizer (with its ``ortho_decay`` / ``ortho_step`` fields that drive the modulation
schedule), the GradScaler, the LR schedule, the EMA weights, each process's RNG states and the
position in the epoch, which ``skip_first_batches`` restores. On a CPU the resumed run ends with
bit-identical weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..optim import DEFAULT_MAX_GRAD_RATIO, DEFAULT_ORTHO_DECAY
from ..precise_bn import bn_layers, recompute_bn_statistics
from .checkpoint import MARKER, CheckpointManager, list_checkpoints, resolve_resume
from .data import (
    AugmentKind,
    DataConfig,
    DataError,
    DatasetKind,
    SeededTransform,
    build_datasets,
    build_loader,
    build_transforms,
)

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "build_parser",
    "config_from_args",
    "evaluate",
    "format_summary",
    "main",
    "train",
]

_log = logging.getLogger("timm_ortho.train")

Preset = Literal["imagenet", "cifar"]


class ConfigError(ValueError):
    """Flags that contradict each other or are out of range."""


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
DEFAULT_PRECISE_BN_BATCHES = 100
"""Precise-BN batches for plain nets: enough for stable averages (fvcore uses 200), cheap next to an epoch."""


@dataclass
class TrainConfig:
    """All settings of a run; the command-line flags map one to one onto these fields."""

    # model and method
    model: str = "plain_cnn44_imagenet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    drop: float | None = None
    drop_path: float | None = None
    init: Literal["orthonormal", "msra"] | None = None
    """``None``: orthonormal for the method, msra for ``baseline``."""
    baseline: bool = False
    """MSRA init + L2 weight decay, no orthonormality term, no modulation."""
    ortho_decay: float = DEFAULT_ORTHO_DECAY
    ortho_form: Literal["auto", "coupled", "decoupled"] = "auto"
    max_grad_ratio: float | None = DEFAULT_MAX_GRAD_RATIO
    """The step bound of :class:`~timm_ortho.OrthoModulated`; ``None`` or 0: off."""
    ortho_exclude: list[str] | None = None
    modulation: bool = False
    mod_band: float | None = None
    mod_mode: str | None = None
    mod_statistic: str | None = None
    mod_include_classifier: bool | None = None
    mod_max_scale: float | None = None
    mod_reference: str | None = None
    mod_schedule: int = 0
    """Modulate during the first N updates only; 0 = for the whole run."""
    error_stats: bool = True
    """Without modulation, still measure the per-layer error moments (hooks that change nothing)."""
    precise_bn: int | None = None
    """Batches of training data over which BN statistics are recomputed with the final weights before
    every evaluation (precise BN); ``None``: ``DEFAULT_PRECISE_BN_BATCHES`` for plain nets (a chain
    with no shortcut, whose running statistics lag the weights most), 0 (off) for other models."""

    # optimizer and schedule
    opt: str = "momentum"
    lr: float | None = None
    lr_base: float = 0.1
    lr_base_size: int = 256
    lr_base_scale: Literal["linear", "sqrt"] = "linear"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    opt_eps: float | None = None
    clip_grad: float | None = None
    clip_mode: Literal["norm", "value"] = "norm"
    sched: str = "multistep"
    """Default: the paper's ImageNet schedule (90 epochs, lr divided by 10 at epochs 30 and 60)."""
    epochs: int = 90
    iterations: int | None = None
    """Length of the run in updates (overrides ``epochs``); the schedule is then counted in updates."""
    decay_milestones: list[float] = field(default_factory=lambda: [30.0, 60.0])
    decay_steps: list[int] | None = None
    """Multistep milestones in updates (overrides ``decay_milestones``, which are in epochs)."""
    decay_epochs: float = 90.0
    decay_rate: float = 0.1
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None
    warmup_lr: float = 1e-5
    min_lr: float = 0.0

    # batches, devices, numerics
    batch_size: int = 128
    validation_batch_size: int | None = None
    grad_accum_steps: int = 1
    amp: bool = False
    """Mixed precision in ``amp_dtype`` (as timm's ``--amp``); off: what ``accelerate launch`` says."""
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    workers: int = 4
    pin_memory: bool | None = None
    channels_last: bool = False
    sync_bn: bool = False
    torchcompile: str | None = None
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False

    # regularization of the inputs and targets
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    smoothing: float = 0.0

    # data: the fields of DataConfig (data_config() projects them), defaults taken from it
    data_dir: str | None = DataConfig.data_dir
    dataset: DatasetKind = DataConfig.dataset
    train_split: str = DataConfig.train_split
    val_split: str = DataConfig.val_split
    img_size: int | None = None
    num_classes: int | None = DataConfig.num_classes
    synthetic_size: int = DataConfig.synthetic_size
    synthetic_val_size: int = DataConfig.synthetic_val_size
    augment: AugmentKind = DataConfig.augment
    aa: str | None = DataConfig.aa
    reprob: float = DataConfig.reprob
    remode: str = DataConfig.remode
    recount: int = DataConfig.recount
    hflip: float = DataConfig.hflip
    color_jitter: float = DataConfig.color_jitter
    scale: tuple[float, float] = DataConfig.scale
    ratio: tuple[float, float] = DataConfig.ratio
    interpolation: str = DataConfig.interpolation
    crop_pct: float | None = DataConfig.crop_pct
    mean: tuple[float, float, float] | None = DataConfig.mean
    std: tuple[float, float, float] | None = DataConfig.std

    # run, logging, checkpoints
    seed: int = DataConfig.seed
    output: str = "./output"
    experiment: str | None = None
    resume: str | None = None
    checkpoint_interval: int = 0
    """Also checkpoint every N updates (0: at epoch ends and at the stop only)."""
    checkpoint_hist: int = 2
    log_interval: int = 50
    log_with: list[str] | None = None
    max_steps: int | None = None
    """Stop after this many updates (the schedule is unchanged); for tests and quick runs."""

    def data_config(self, img_size: int) -> DataConfig:
        """The :class:`DataConfig` part of this configuration."""
        names = {f.name for f in dataclasses.fields(DataConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        values["img_size"] = img_size
        return DataConfig(**values)


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
    best_top1: float | None = None
    best_epoch: int | None = None
    last_eval: dict[str, float] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
class _KeyValue(argparse.Action):
    """``--model-kwargs depth=20 drop_rate=0.1`` -> ``{"depth": 20, "drop_rate": 0.1}``."""

    def __call__(self, parser, namespace, values, option_string=None):
        out = {}
        for item in values:
            key, sep, raw = item.partition("=")
            if not sep:
                parser.error(f"{option_string} expects key=value pairs, got {item!r}")
            try:
                out[key] = json.loads(raw)
            except json.JSONDecodeError:
                out[key] = raw
        setattr(namespace, self.dest, out)


def build_parser(preset: Preset = "imagenet") -> argparse.ArgumentParser:
    """The flags of the training scripts, named like timm's ``train.py`` where the concept is the same.

    ``preset="cifar"`` sets the defaults to the paper's CIFAR-10 protocol (He et al.'s schedule).
    """
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description=(
            "Train a timm model with orthonormality regularization and backward error modulation "
            "(or, with --baseline, MSRA init + L2 weight decay). Launch with `accelerate launch`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="ImageFolder root (train/, val/) or CIFAR-10 "
        "pickle directory; omitted: the embedded synthetic set",
    )
    g.add_argument("--dataset", default=d.dataset, choices=["auto", "imagefolder", "cifar10", "synthetic"])
    g.add_argument("--train-split", default=d.train_split)
    g.add_argument("--val-split", default=d.val_split)
    g.add_argument("--img-size", type=int, default=d.img_size, help="None: the model's input size")
    g.add_argument(
        "--num-classes",
        type=int,
        default=d.num_classes,
        help="checked against the data; None with the synthetic set: 10 classes",
    )
    g.add_argument("--synthetic-size", type=int, default=d.synthetic_size, help="synthetic training images")
    g.add_argument("--synthetic-val-size", type=int, default=d.synthetic_val_size)
    g.add_argument(
        "--augment",
        default=d.augment,
        choices=["timm", "cifar", "none"],
        help="timm: random resized crop etc.; cifar: pad-4 crop + flip; none",
    )
    g.add_argument(
        "--no-aug",
        dest="augment",
        action="store_const",
        const="none",
        default=argparse.SUPPRESS,  # an alias: --augment shows the default
        help="same as --augment none",
    )
    g.add_argument("--aa", default=d.aa, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=float, default=d.reprob, help="random erasing probability")
    g.add_argument("--remode", default=d.remode)
    g.add_argument("--recount", type=int, default=d.recount)
    g.add_argument("--hflip", type=float, default=d.hflip)
    g.add_argument("--color-jitter", type=float, default=d.color_jitter)
    g.add_argument("--scale", type=float, nargs=2, default=d.scale, metavar=("MIN", "MAX"))
    g.add_argument("--ratio", type=float, nargs=2, default=d.ratio, metavar=("MIN", "MAX"))
    g.add_argument("--interpolation", default=d.interpolation)
    g.add_argument("--crop-pct", type=float, default=d.crop_pct)
    g.add_argument("--mean", type=float, nargs=3, default=d.mean)
    g.add_argument("--std", type=float, nargs=3, default=d.std)
    g.add_argument("--workers", "-j", type=int, default=d.workers)
    g.add_argument(
        "--pin-mem",
        dest="pin_memory",
        action=argparse.BooleanOptionalAction,
        default=d.pin_memory,
        help="pinned host memory (None: on when training on CUDA)",
    )

    g = p.add_argument_group("model and method")
    g.add_argument("--model", default=d.model)
    g.add_argument("--model-kwargs", nargs="*", default={}, action=_KeyValue, metavar="KEY=VALUE")
    g.add_argument("--drop", type=float, default=d.drop, help="dropout before the classifier")
    g.add_argument("--drop-path", type=float, default=d.drop_path)
    g.add_argument(
        "--init",
        default=d.init,
        choices=["orthonormal", "msra"],
        help="None: orthonormal, or msra with --baseline",
    )
    g.add_argument(
        "--baseline",
        action="store_true",
        help="MSRA init + L2 weight decay, no orthonormality term, no modulation",
    )
    g.add_argument(
        "--ortho-decay",
        type=float,
        default=d.ortho_decay,
        help="lambda of the orthonormality regularizer (replaces L2 on conv/linear weights)",
    )
    g.add_argument("--ortho-form", default=d.ortho_form, choices=["auto", "coupled", "decoupled"])
    g.add_argument(
        "--max-grad-ratio",
        type=float,
        default=d.max_grad_ratio,
        help="step bound: every regularized weight's gradient is scaled so that |grad| <= RATIO |W| "
        "(per layer, inside the optimizer step); 0 turns it off",
    )
    g.add_argument(
        "--ortho-exclude",
        nargs="+",
        default=d.ortho_exclude,
        metavar="PATTERN",
        help="fnmatch patterns of weights left to --weight-decay",
    )
    g.add_argument(
        "--modulation",
        action=argparse.BooleanOptionalAction,
        default=d.modulation,
        help="backward error modulation",
    )
    g.add_argument(
        "--mod-band",
        type=float,
        default=d.mod_band,
        help="quasi-isometry constant A >= 1 (None: ErrorModulation's own)",
    )
    g.add_argument(
        "--mod-mode", default=d.mod_mode, choices=["clamp", "match"], help="None: ErrorModulation's own"
    )
    g.add_argument(
        "--mod-statistic",
        default=d.mod_statistic,
        choices=["total", "mean"],
        help="None: ErrorModulation's own",
    )
    g.add_argument(
        "--mod-include-classifier", action=argparse.BooleanOptionalAction, default=d.mod_include_classifier
    )
    g.add_argument("--mod-max-scale", type=float, default=d.mod_max_scale)
    g.add_argument("--mod-reference", default=d.mod_reference, choices=["previous", "top"])
    g.add_argument(
        "--precise-bn",
        type=int,
        default=d.precise_bn,
        metavar="N",
        help=f"recompute BN statistics over N training batches before each evaluation; when not given: "
        f"{DEFAULT_PRECISE_BN_BATCHES} for plain nets, 0 (off) for other models",
    )
    g.add_argument(
        "--error-stats",
        action=argparse.BooleanOptionalAction,
        default=d.error_stats,
        help="without modulation, still record the per-layer error moments (measure-only hooks)",
    )
    g.add_argument(
        "--mod-schedule",
        type=int,
        default=d.mod_schedule,
        help="modulate during the first N updates only (0: always)",
    )

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default=d.opt, help="timm optimizer name (momentum = SGD without Nesterov)")
    g.add_argument(
        "--lr", type=float, default=d.lr, help="learning rate; None: --lr-base scaled by the global batch"
    )
    g.add_argument("--lr-base", type=float, default=d.lr_base)
    g.add_argument("--lr-base-size", type=int, default=d.lr_base_size)
    g.add_argument("--lr-base-scale", default=d.lr_base_scale, choices=["linear", "sqrt"])
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="L2 for --baseline; otherwise only for weights outside the regularizer",
    )
    g.add_argument("--opt-eps", type=float, default=d.opt_eps)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad)
    g.add_argument("--clip-mode", default=d.clip_mode, choices=["norm", "value"])
    g.add_argument(
        "--sched", default=d.sched, help="timm scheduler: cosine, step, multistep, poly, none, ..."
    )
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument(
        "--iterations", type=int, default=d.iterations, help="length in updates (overrides --epochs)"
    )
    g.add_argument(
        "--decay-milestones",
        type=float,
        nargs="+",
        default=d.decay_milestones,
        help="multistep milestones in epochs",
    )
    g.add_argument(
        "--decay-steps",
        type=int,
        nargs="+",
        default=d.decay_steps,
        help="multistep milestones in updates (overrides --decay-milestones)",
    )
    g.add_argument("--decay-epochs", type=float, default=d.decay_epochs, help="step scheduler interval")
    g.add_argument("--decay-rate", type=float, default=d.decay_rate)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="overrides --warmup-epochs")
    g.add_argument("--warmup-lr", type=float, default=d.warmup_lr)
    g.add_argument("--min-lr", type=float, default=d.min_lr)

    g = p.add_argument_group("training")
    g.add_argument("--batch-size", "-b", type=int, default=d.batch_size, help="per process")
    g.add_argument(
        "--validation-batch-size", "-vb", type=int, default=d.validation_batch_size, help="None: --batch-size"
    )
    g.add_argument("--grad-accum-steps", type=int, default=d.grad_accum_steps)
    g.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision in --amp-dtype (as timm); without it, accelerate launch's --mixed_precision",
    )
    g.add_argument("--amp-dtype", default=d.amp_dtype, choices=["float16", "bfloat16"])
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (timm converter)")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=d.torchcompile, metavar="BACKEND")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay)
    g.add_argument("--model-ema-warmup", action="store_true")
    g.add_argument("--mixup", type=float, default=d.mixup)
    g.add_argument("--cutmix", type=float, default=d.cutmix)
    g.add_argument("--mixup-prob", type=float, default=d.mixup_prob)
    g.add_argument("--mixup-switch-prob", type=float, default=d.mixup_switch_prob)
    g.add_argument("--mixup-mode", default=d.mixup_mode)
    g.add_argument("--mixup-off-epoch", type=int, default=d.mixup_off_epoch)
    g.add_argument("--smoothing", type=float, default=d.smoothing)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after N updates")

    g = p.add_argument_group("output")
    g.add_argument("--output", default=d.output)
    g.add_argument("--experiment", default=d.experiment, help="run folder name under --output")
    g.add_argument(
        "--resume",
        default=d.resume,
        help="checkpoint folder, a file in one (or a run's last.pth, as timm's --resume FILE), run folder, "
        "or 'auto' (newest of --experiment; none yet: start fresh)",
    )
    g.add_argument(
        "--checkpoint-interval",
        type=int,
        default=d.checkpoint_interval,
        help="also checkpoint every N updates",
    )
    g.add_argument("--checkpoint-hist", type=int, default=d.checkpoint_hist, help="checkpoints kept")
    g.add_argument("--log-interval", type=int, default=d.log_interval, help="updates between log records")
    g.add_argument(
        "--log-with",
        nargs="+",
        action="extend",
        default=d.log_with,
        help="accelerate trackers, e.g. tensorboard",
    )
    g.add_argument(
        "--log-wandb",
        dest="log_with",
        action="append_const",
        const="wandb",
        default=argparse.SUPPRESS,  # an alias: --log-with shows the default
        help="same as --log-with wandb (timm's flag)",
    )

    if preset == "cifar":
        p.set_defaults(**CIFAR_PROTOCOL)
    elif preset != "imagenet":
        raise ValueError(f"unknown preset {preset!r}")
    for action in p._actions:
        # ArgumentDefaultsHelpFormatter appends "(default: ...)" only to options that have a help text.
        if action.help is None and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"
    return p


CIFAR_PROTOCOL: dict[str, Any] = {
    # The paper follows He et al.: 64k iterations at batch 128, lr 0.1 divided by 10 at 32k and 48k.
    "model": "plain_cnn44",
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "opt": "momentum",
    "sched": "multistep",
    "iterations": 64000,
    "decay_steps": [32000, 48000],
    "decay_rate": 0.1,
    "warmup_epochs": 0.0,
    "smoothing": 0.0,
    "augment": "none",
    "img_size": 32,
    "dataset": "auto",
    "synthetic_size": 50000,
    "synthetic_val_size": 10000,
    "workers": 2,
    "log_interval": 100,
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed flags (unknown attributes are an error)."""
    values = dict(vars(args))
    for key in ("scale", "ratio", "mean", "std"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return TrainConfig(**values)


# ----------------------------------------------------------------------------------------------
# pieces of the run
# ----------------------------------------------------------------------------------------------
def _validate(cfg: TrainConfig) -> None:
    if cfg.max_grad_ratio is not None and not 0 <= cfg.max_grad_ratio < math.inf:
        raise ConfigError(f"--max-grad-ratio must be a finite number >= 0 (0: off), got {cfg.max_grad_ratio}")
    if cfg.precise_bn is not None and cfg.precise_bn < 0:
        raise ConfigError(f"--precise-bn takes a number of batches >= 0 (0: off), got {cfg.precise_bn}")
    if cfg.baseline and cfg.modulation:
        raise ConfigError("--baseline means no modulation; drop --modulation or --baseline")
    if cfg.baseline and cfg.init == "orthonormal":
        raise ConfigError("--baseline means MSRA init; drop --init orthonormal or --baseline")
    for name in ("batch_size", "grad_accum_steps", "log_interval", "checkpoint_hist"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"--max-steps must be positive, got {cfg.max_steps}")
    if cfg.iterations is not None and cfg.iterations < 1:
        raise ConfigError(f"--iterations must be positive, got {cfg.iterations}")
    if cfg.epochs < 1 and cfg.iterations is None:
        raise ConfigError(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.amp_dtype not in ("float16", "bfloat16"):
        raise ConfigError(f"--amp-dtype must be float16 or bfloat16, got {cfg.amp_dtype!r}")


def _default_img_size(model_name: str) -> int:
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(model_name)
    size = getattr(pretrained, "input_size", None) if pretrained is not None else None
    return int(size[-1]) if size else 224


def _create_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, str]:
    """The model and a description of its initialization."""
    import timm

    from ..ortho import orthonormal_
    from ..targets import find_targets

    kwargs: dict[str, Any] = {"num_classes": num_classes, **cfg.model_kwargs}
    if cfg.drop is not None:
        kwargs["drop_rate"] = cfg.drop
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    init = cfg.init or ("msra" if cfg.baseline else "orthonormal")
    try:
        return timm.create_model(cfg.model, init=init, **kwargs), init
    except TypeError as e:
        if "drop_path_rate" in str(e):
            raise ConfigError(
                f"--drop-path: {cfg.model} takes no drop_path_rate (a plain net has no residual branch "
                "to drop); leave --drop-path out for this model"
            ) from e
        if "init" not in str(e):
            raise
    # A model without an ``init`` argument (any timm model outside this package).
    model = timm.create_model(cfg.model, **kwargs)
    if init == "msra":
        return model, "the model's own (timm) initialization"
    for t in find_targets(model):
        orthonormal_(t.param, t.conv_groups)
    return model, "orthonormal (applied by the trainer to every conv/linear weight)"


def _modulation_options(cfg: TrainConfig) -> dict[str, Any]:
    options = {
        "band": cfg.mod_band,
        "mode": cfg.mod_mode,
        "statistic": cfg.mod_statistic,
        "include_classifier": cfg.mod_include_classifier,
        "max_scale": cfg.mod_max_scale,
        "reference": cfg.mod_reference,
        "schedule": cfg.mod_schedule or None,
    }
    return {k: v for k, v in options.items() if v is not None}


def _describe_modulation(cfg: TrainConfig) -> str:
    if not cfg.modulation:
        return "off" + (" (error moments measured only)" if cfg.error_stats else "")
    options = _modulation_options(cfg)
    return "on " + (
        ", ".join(f"{k}={v}" for k, v in options.items()) if options else "(ErrorModulation defaults)"
    )


def _build_schedule(cfg: TrainConfig, optimizer: Any, updates_per_epoch: int) -> tuple[Any, int, int]:
    """``(scheduler or None, total updates, epochs)``; the schedule is counted in updates."""
    from timm.scheduler import create_scheduler_v2

    if cfg.iterations is not None:
        total = cfg.iterations
        epochs = math.ceil(total / updates_per_epoch)
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


class _JsonLines:
    """Appends records to ``metrics.jsonl`` (main process only), flushed line by line."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._f = path.open("a") if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, default=_jsonable) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _ratio_history(path: Path, unmodulated: bool) -> dict[str, tuple[list[int], list[float]]]:
    """Bottom/top error-moment ratios logged so far in ``metrics.jsonl``, across resumes.

    Steps logged twice (after the last checkpoint of an interrupted run, then again after the
    resume) keep their latest value.
    """
    after: dict[int, float] = {}
    plain: dict[int, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "train" and "mod_bottom_top_ratio" in record:
            after[record["step"]] = record["mod_bottom_top_ratio"]
            plain[record["step"]] = record["mod_bottom_top_ratio_unmodulated"]
    if not after:
        return {}
    steps = sorted(after)
    history = {"as trained": (steps, [after[t] for t in steps])}
    if unmodulated:
        history["same forward, unmodulated"] = (steps, [plain[t] for t in steps])
    return history


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, accelerator: Any, channels_last: bool = False
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) over the whole split, gathered across processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    for images, targets in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(images)
        logits = logits.float()
        loss = F.cross_entropy(logits, targets, reduction="none")
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
        loss, top1, top5 = accelerator.gather_for_metrics((loss, hits[:, 0].float(), hits.any(1).float()))
        totals += torch.stack([loss.sum(), top1.sum(), top5.sum(), torch.tensor(float(len(loss)))]).to(totals)
    model.train(was_training)
    loss_sum, top1, top5, n = totals.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def _precise_bn_batches(cfg: TrainConfig, model: nn.Module) -> int:
    """``cfg.precise_bn``, or its default: on for plain nets (no shortcut), off for other models."""
    from ..models.plain_cnn import PlainCnn

    if cfg.precise_bn is not None:
        return cfg.precise_bn
    return DEFAULT_PRECISE_BN_BATCHES if isinstance(model, PlainCnn) else 0


def recalibrate_bn(
    model: nn.Module, loader: Any, accelerator: Any, num_batches: int, channels_last: bool = False
) -> int:
    """Precise BN in a (possibly distributed) run: recompute, then average the statistics over processes.

    Each process averages over its own shard of ``num_batches`` batches; the per-process results are
    then averaged (every process saw as many batches, so that is the mean over all of them).
    """

    def images_of(batch: Any) -> torch.Tensor:
        images = batch[0]
        return images.contiguous(memory_format=torch.channels_last) if channels_last else images

    with accelerator.autocast():
        used = recompute_bn_statistics(model, loader, num_batches, prepare=images_of)
    if accelerator.num_processes > 1:
        for layer in bn_layers(model):
            for buffer in (layer.running_mean, layer.running_var):
                buffer.copy_(accelerator.reduce(buffer.clone(), reduction="mean"))
    return used


@contextlib.contextmanager
def precise_bn_for_eval(
    model: nn.Module, loader: Any, accelerator: Any, num_batches: int, channels_last: bool = False
) -> Iterator[None]:
    """Recomputed BN statistics inside the block (evaluation, saving the evaluated weights), the
    training ones restored after it: evaluating never changes the state that training continues
    from, so a run resumed from any checkpoint ends exactly where an uninterrupted one does."""
    layers = bn_layers(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    recalibrate_bn(model, loader, accelerator, num_batches, channels_last)
    try:
        yield
    finally:
        for m, (mean, var, count) in zip(layers, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)


def _save_weights(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename: a crash never leaves a truncated file."""
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _available_trackers(names: Sequence[str] | None) -> list[str]:
    import accelerate.utils as au

    kept = []
    for name in names or ():
        check = getattr(au, f"is_{name}_available", None)
        if name == "all" or (check is not None and check()):
            kept.append(name)
        else:
            _log.warning("tracker %r is not installed (or unknown to accelerate): not logging to it", name)
    return kept


def _banner(lines: Sequence[str]) -> str:
    width = max(len(s) for s in lines) + 4
    bar = "*" * width
    return "\n".join([bar, *[f"* {s:<{width - 4}} *" for s in lines], bar])


def _cpu_only_multiprocess() -> bool:
    """Several processes launched on a machine without an accelerator (``CUDA_VISIBLE_DEVICES=``).

    Accelerate then sees each process as a lone one unless told to use the CPU, and every process
    would train its own copy into the same folder; with ``cpu=True`` they form a gloo group
    (``DistributedType.MULTI_CPU``).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    probe = getattr(torch, "accelerator", None)
    has_accelerator = probe.is_available() if probe is not None else torch.cuda.is_available()
    return not has_accelerator


def _check_run_folder(run_dir: Path, resume_path: Path | None) -> None:
    """Refuse to mix two timelines in one folder of rotating checkpoints.

    A fresh run into a folder that holds checkpoints, or a resume from a checkpoint older than the
    folder's newest, would interleave its checkpoints with the others, and a later ``--resume auto``
    would pick the wrong one.
    """
    existing = list_checkpoints(run_dir / "checkpoints")
    if not existing:
        return
    if resume_path is None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints ({existing[-1].name} is the newest): continue it with "
            f"--resume auto (and --experiment {run_dir.name}), or choose another --experiment"
        )
    if resume_path.resolve() != existing[-1].resolve() and _updates_of(resume_path) < _updates_of(
        existing[-1]
    ):
        raise ConfigError(
            f"resuming from {resume_path} would continue in {run_dir}, which holds the newer "
            f"{existing[-1].name}; pass --experiment NAME to branch into a new run folder"
        )


def _updates_of(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / MARKER).read_text())["updates"])


def _run_name(cfg: TrainConfig) -> str:
    method = "baseline" if cfg.baseline else ("ortho-mod" if cfg.modulation else "ortho")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{method}"


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) as ``cfg`` says; returns the summary (also in ``summary.json``) and the model.

    Must be called by every process of an ``accelerate launch``.
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed
    from timm.data import Mixup
    from timm.layers import convert_sync_batchnorm
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    from ..diagnostics import filter_correlation, layer_penalties
    from ..factory import create_ortho_optimizer
    from ..modulation import ErrorModulation
    from ..optim import OrthoModulated
    from ..targets import find_targets

    _validate(cfg)
    t_start = time.perf_counter()
    accelerator = Accelerator(
        cpu=_cpu_only_multiprocess(),
        # None leaves the choice to `accelerate launch --mixed_precision` / its config file.
        mixed_precision=({"float16": "fp16", "bfloat16": "bf16"}[cfg.amp_dtype] if cfg.amp else None),
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=_available_trackers(cfg.log_with) or None,
        step_scheduler_with_optimizer=False,
    )
    is_main = accelerator.is_main_process

    # --- the run folder: named once, on the main process ---------------------------------------
    run_dir: Path | None = None
    resume_path: Path | None = None
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
        name = [cfg.experiment or (_run_name(cfg) if is_main else None)]
        broadcast_object_list(name)
        run_dir = Path(cfg.output) / name[0]
    _check_run_folder(run_dir, resume_path)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.project_configuration.set_directories(str(run_dir))
    metrics = _JsonLines(run_dir / "metrics.jsonl" if is_main else None)

    # --- data ---------------------------------------------------------------------------------
    img_size = cfg.img_size or _default_img_size(cfg.model)
    data_cfg = cfg.data_config(img_size)
    datasets = build_datasets(data_cfg)
    if datasets.synthetic and is_main:
        _log.warning(
            "\n%s",
            _banner(
                [
                    "NO DATA DIRECTORY GIVEN: TRAINING ON THE EMBEDDED SYNTHETIC DATA SET",
                    datasets.description,
                    "Accuracy on it says nothing about ImageNet or CIFAR; pass --data-dir for real data.",
                ]
            ),
        )
    else:
        _log.info("data: %s", datasets.description)
    train_tf, eval_tf = build_transforms(data_cfg, datasets.mean, datasets.std, datasets.native_size)
    train_set = SeededTransform(datasets.train, train_tf, seed=cfg.seed)
    val_set = SeededTransform(datasets.val, eval_tf, seed=cfg.seed)
    pin = cfg.pin_memory if cfg.pin_memory is not None else accelerator.device.type == "cuda"
    train_loader = build_loader(
        train_set, cfg.batch_size, train=True, seed=cfg.seed, workers=cfg.workers, pin_memory=pin
    )
    val_loader = build_loader(
        val_set,
        cfg.validation_batch_size or cfg.batch_size,
        train=False,
        seed=cfg.seed,
        workers=cfg.workers,
        pin_memory=pin,
    )

    # --- model: created identically on every process (same seed), then per-process RNG ----------
    set_seed(cfg.seed)
    model, init_desc = _create_model(cfg, datasets.num_classes)
    if cfg.sync_bn:
        if accelerator.num_processes > 1 and accelerator.device.type != "cpu":
            model = convert_sync_batchnorm(model)
        else:
            _log.warning("--sync-bn ignored: it needs several processes on accelerators")
    model.to(accelerator.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # The EMA copy is taken before the modulation hooks exist, so it never carries them.
    ema = (
        ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
        if cfg.model_ema
        else None
    )
    n_params = sum(p.numel() for p in model.parameters())

    # --- optimizer: wrap with OrthoModulated BEFORE accelerator.prepare -------------------------
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum_steps
    if cfg.lr is not None:
        lr = cfg.lr
    else:
        ratio = global_batch / cfg.lr_base_size
        lr = cfg.lr_base * (ratio if cfg.lr_base_scale == "linear" else math.sqrt(ratio))
    opt_kwargs: dict[str, Any] = {"momentum": cfg.momentum}
    if cfg.opt_eps is not None:
        opt_kwargs["eps"] = cfg.opt_eps
    ortho: OrthoModulated | None = None
    # ``probe`` is the ErrorModulation whose statistics are logged: the method's own, or a
    # measure-only one (it changes no error) so that both sides of a comparison record Fig. 3's data.
    probe: ErrorModulation | None = None
    targets = [t for t in find_targets(model, exclude=cfg.ortho_exclude) if t.param.requires_grad]
    if cfg.baseline:
        optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, **opt_kwargs
        )
        method = f"baseline: {init_desc} init, L2 weight decay {cfg.weight_decay:g}, no modulation"
        if cfg.error_stats:
            probe = ErrorModulation(model, targets=targets, measure_only=True)
    else:
        if cfg.modulation:
            modulation: bool | dict[str, Any] = _modulation_options(cfg)
        else:
            modulation = {"measure_only": True} if cfg.error_stats else False
        # timm's parameter groups (no_weight_decay(), 1-D parameters), the targets without L2.
        ortho = create_ortho_optimizer(
            model,
            cfg.opt,
            lr=lr,
            weight_decay=cfg.weight_decay,
            ortho_decay=cfg.ortho_decay,
            form=cfg.ortho_form,
            modulation=modulation,
            max_grad_ratio=cfg.max_grad_ratio or None,
            target_kwargs={"exclude": cfg.ortho_exclude},
            **opt_kwargs,
        )
        optimizer = ortho
        targets = ortho.targets
        probe = ortho.modulation
        method = (
            f"{init_desc} init, orthonormality regularizer lambda={cfg.ortho_decay:g} on "
            f"{len(targets)} weights (no L2 on them), step bound "
            f"{f'|grad| <= {cfg.max_grad_ratio:g} |W| per layer' if cfg.max_grad_ratio else 'off'}, "
            f"modulation {_describe_modulation(cfg)}"
        )
    precise_bn = _precise_bn_batches(cfg, model)
    method += f", precise BN {f'over up to {precise_bn} batches' if precise_bn else 'off'}"
    if cfg.torchcompile:
        model = torch.compile(model, backend=cfg.torchcompile)

    # Its own loader (own order, own generator): recalibrating draws nothing from the training
    # loader or the global RNG, so a resumed run sees exactly the batches of an uninterrupted one.
    bn_loader = (
        build_loader(train_set, cfg.batch_size, train=True, seed=cfg.seed + 1, workers=cfg.workers)
        if precise_bn
        else None
    )
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader
    )
    if bn_loader is not None:
        bn_loader = accelerator.prepare(bn_loader)
    # Precise BN runs the model without DDP and without torch.compile: its cumulative averages
    # (momentum=None) would make a compiled model recompile and break its graph.
    eager_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    set_seed(cfg.seed, device_specific=True)  # per-process randomness (dropout, mixup) from here on

    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler, total_updates, epochs = _build_schedule(cfg, optimizer, updates_per_epoch)
    stop_at = min(total_updates, cfg.max_steps) if cfg.max_steps else total_updates

    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)
    if scheduler is not None:
        accelerator.register_for_checkpointing(scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    checkpoints = CheckpointManager(accelerator, run_dir / "checkpoints", keep=cfg.checkpoint_hist)

    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        _log.info(
            "resumed from %s: epoch %d, batch %d, update %d",
            resume_path,
            progress.epoch,
            progress.batch,
            progress.updates,
        )
        metrics.write({"type": "resume", "from": str(resume_path), **progress.state_dict()})
    elif scheduler is not None:
        scheduler.step_update(0)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if cfg.batch_size % 2:
            raise ConfigError(f"mixup/cutmix need an even --batch-size, got {cfg.batch_size}")
        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=cfg.smoothing,
            num_classes=datasets.num_classes,
        )
        train_loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    hparams = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v))
        for k, v in dataclasses.asdict(cfg).items()
    }
    accelerator.init_trackers(run_dir.name, config=hparams)
    header = {
        "type": "config",
        "time": time.time(),
        "run_dir": str(run_dir),
        "model": cfg.model,
        "params": n_params,
        "method": method,
        "data": datasets.description,
        "synthetic": datasets.synthetic,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "global_batch": global_batch,
        "lr": lr,
        "updates_per_epoch": updates_per_epoch,
        "total_updates": total_updates,
        "stop_at": stop_at,
        "epochs": epochs,
        "layers": [t.name for t in targets],
        "config": dataclasses.asdict(cfg),
    }
    metrics.write(header)
    if is_main:
        (run_dir / "config.json").write_text(json.dumps(header, indent=1, default=_jsonable))
    broken = sum(t.breaks_principle for t in targets)
    _log.info(
        "model %s (%.2fM params, %d target layers, %d with f_out > f_in); %s",
        cfg.model,
        n_params / 1e6,
        len(targets),
        broken,
        method,
    )
    _log.info(
        "%d process(es) on %s, mixed precision %s; global batch %d (%d x %d processes x %d accumulation), "
        "lr %.4g; %d updates per epoch, %d epochs, stopping after update %d; output %s",
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
        global_batch,
        cfg.batch_size,
        accelerator.num_processes,
        cfg.grad_accum_steps,
        lr,
        updates_per_epoch,
        epochs,
        stop_at,
        run_dir,
    )

    def log_step(epoch: int, loss_sum: torch.Tensor, count: int, seconds: float, samples: int) -> None:
        # The one place of the hot loop that reads values on the host (every --log-interval updates).
        loss = accelerator.reduce(loss_sum / max(count, 1), "mean").item()
        record: dict[str, Any] = {
            "type": "train",
            "epoch": epoch,
            "step": progress.updates,
            "loss": loss,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "samples_per_s": samples * accelerator.num_processes / max(seconds, 1e-9),
        }
        residuals = layer_penalties(targets)
        cosines = filter_correlation(targets)
        record["ortho_residual"] = float(residuals.sum())
        record["filter_cos"] = float(cosines.mean())
        if ortho is not None:
            record["ortho_penalty"] = float(ortho.penalty())
        layers: dict[str, Any] = {
            "type": "layers",
            "step": progress.updates,
            "ortho_residual": residuals.tolist(),
            "filter_cos": cosines.tolist(),
        }
        stats = probe.last_stats() if probe is not None else None
        if stats is not None:
            record.update({f"mod_{k}": v for k, v in stats.as_dict().items()})
            layers.update(
                names=list(stats.names),
                q_before=torch.as_tensor(stats.q_before).tolist(),
                q_after=torch.as_tensor(stats.q_after).tolist(),
                scale=torch.as_tensor(stats.scale).tolist(),
            )
        metrics.write(record)
        metrics.write(layers)
        accelerator.log(_scalars(record), step=progress.updates)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.3g}", refresh=False)

    def save_weights(name: str, epoch: int, evaluation: dict[str, float] | None) -> None:
        state = accelerator.get_state_dict(model)
        if is_main:
            payload: dict[str, Any] = {
                "state_dict": state,
                "arch": cfg.model,
                "epoch": epoch,
                "updates": progress.updates,
                "metric": evaluation,
                "num_classes": datasets.num_classes,
            }
            if ema is not None:
                payload["state_dict_ema"] = ema.module.state_dict()
            _save_weights(run_dir / name, payload)

    # --- the loop -------------------------------------------------------------------------------
    model.train()
    stopped = progress.updates >= stop_at
    samples_seen = 0
    train_seconds = 0.0
    evaluation: dict[str, float] | None = progress.last_eval
    ema_eval: dict[str, float] | None = None
    bar = None
    for epoch in range(progress.epoch, epochs):
        if stopped:
            break
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        if mixup_fn is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        start = progress.batch
        loader = accelerator.skip_first_batches(train_loader, start) if start else train_loader
        bar = tqdm(
            total=len(train_loader),
            initial=start,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        loss_sum = torch.zeros((), device=accelerator.device)
        count, interval_samples, t_interval = 0, 0, time.perf_counter()
        t_epoch = time.perf_counter()
        for images, labels in loader:
            if mixup_fn is not None:
                images, labels = mixup_fn(images, labels)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                loss = train_loss_fn(model(images), labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.clip_grad is not None:
                    if cfg.clip_mode == "norm":
                        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    else:
                        accelerator.clip_grad_value_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batch += 1
            loss_sum += loss.detach().float()
            count += 1
            interval_samples += images.shape[0]
            bar.update(1)
            if not accelerator.sync_gradients:
                continue
            progress.updates += 1
            if scheduler is not None:
                scheduler.step_update(progress.updates)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model), step=progress.updates)
            if progress.updates % cfg.log_interval == 0:
                now = time.perf_counter()
                log_step(epoch, loss_sum, count, now - t_interval, interval_samples)
                loss_sum.zero_()
                count, interval_samples, t_interval = 0, 0, time.perf_counter()
            if progress.updates >= stop_at:
                stopped = True
            if cfg.checkpoint_interval and progress.updates % cfg.checkpoint_interval == 0 and not stopped:
                checkpoints.save(progress.updates, {"epoch": epoch, "batch": progress.batch})
            if stopped:
                break
        bar.close()
        epoch_seconds = time.perf_counter() - t_epoch
        train_seconds += epoch_seconds
        samples_seen += (progress.batch - start) * cfg.batch_size * accelerator.num_processes
        finished_epoch = progress.batch >= len(train_loader)
        if finished_epoch:
            progress.epoch, progress.batch = epoch + 1, 0

        with contextlib.ExitStack() as evaluation_state:
            if bn_loader is not None:  # evaluated (and saved) with precise BN, trained on unchanged
                bn_loader.set_epoch(epoch)
                evaluation_state.enter_context(
                    precise_bn_for_eval(eager_model, bn_loader, accelerator, precise_bn, cfg.channels_last)
                )
                if ema is not None:
                    evaluation_state.enter_context(
                        precise_bn_for_eval(ema.module, bn_loader, accelerator, precise_bn, cfg.channels_last)
                    )
            evaluation = evaluate(model, val_loader, accelerator, cfg.channels_last)
            record = {
                "type": "eval",
                "epoch": epoch,
                "step": progress.updates,
                "epoch_seconds": epoch_seconds,
            }
            record.update({f"val_{k}": v for k, v in evaluation.items()})
            if ema is not None:
                ema_eval = evaluate(ema.module, val_loader, accelerator, cfg.channels_last)
                record.update({f"ema_val_{k}": v for k, v in ema_eval.items()})
            is_best = progress.best_top1 is None or evaluation["top1"] > progress.best_top1
            if is_best:
                progress.best_top1, progress.best_epoch = evaluation["top1"], epoch
            progress.last_eval = evaluation
            record.update(best_top1=progress.best_top1, best_epoch=progress.best_epoch)
            metrics.write(record)
            accelerator.log(_scalars(record), step=progress.updates)
            _log.info(
                "epoch %d/%d (update %d): val loss %.4f, top-1 %.2f%%, top-5 %.2f%%%s; "
                "best top-1 %.2f%% (epoch %d)",
                epoch + 1,
                epochs,
                progress.updates,
                evaluation["loss"],
                evaluation["top1"],
                evaluation["top5"],
                f"; EMA top-1 {ema_eval['top1']:.2f}%" if ema_eval else "",
                progress.best_top1,
                progress.best_epoch + 1,
            )
            save_weights("last.pth", epoch, evaluation)
            if is_best:
                save_weights("model_best.pth", epoch, evaluation)
        saved = checkpoints.save(progress.updates, {"epoch": progress.epoch, "batch": progress.batch})
        _log.info("checkpoint %s", saved)
        if progress.updates >= stop_at:
            stopped = True

    # --- the end ----------------------------------------------------------------------------------
    if bn_loader is not None and samples_seen > 0:  # the returned model carries what was evaluated
        for module in (eager_model, ema.module if ema is not None else None):
            if module is not None:
                bn_loader.set_epoch(epoch)
                recalibrate_bn(module, bn_loader, accelerator, precise_bn, cfg.channels_last)
    pngs: list[str] = []
    if probe is not None and is_main and samples_seen > 0:  # a backward ran in this process
        from .plots import plot_error_moments, plot_ratio_history

        # Moments of the last backward of this process: with modulation, what the same forward gives
        # without it and what the weight gradients saw; without, the measured moments.
        which = ("unmodulated", "after") if cfg.modulation else ("before",)
        title = f"{cfg.model}: error second moments at update {progress.updates}"
        moments_png = plot_error_moments(
            probe.last_stats(), run_dir / "error_moments.png", which=which, title=title
        )
        pngs.append(str(moments_png))
        history = _ratio_history(run_dir / "metrics.jsonl", unmodulated=cfg.modulation)
        if history:
            pngs.append(str(plot_ratio_history(history, run_dir / "bottom_top_ratio.png", title=cfg.model)))
    final_residual = float(layer_penalties(targets).sum())
    final_cos = float(filter_correlation(targets).mean())
    wall = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "type": "summary",
        "run_dir": str(run_dir),
        "model": cfg.model,
        "params": n_params,
        "method": method,
        "data": datasets.description,
        "synthetic": datasets.synthetic,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "updates": progress.updates,
        "epochs_done": progress.epoch + progress.batch / max(len(train_loader), 1),
        "final_eval": evaluation,
        "ema_eval": ema_eval,
        "best_top1": progress.best_top1,
        "best_epoch": progress.best_epoch,
        "ortho_residual": final_residual,
        "filter_cos": final_cos,
        "wall_seconds": wall,
        "train_samples_per_s": samples_seen / train_seconds if train_seconds > 0 else None,
        "plots": pngs,
    }
    metrics.write(summary)
    metrics.close()
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
        _log.info("\n%s", format_summary(summary))
    accelerator.end_training()
    if probe is not None:
        probe.remove()
    return TrainResult(
        summary=summary,
        model=accelerator.unwrap_model(model),
        run_dir=run_dir,
        ema_model=ema.module if ema is not None else None,
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run summary as the console shows it."""
    ev = summary.get("final_eval") or {}
    lines = [
        "=" * 78,
        f"run        {summary['run_dir']}",
        f"model      {summary['model']} ({summary['params'] / 1e6:.2f}M params)",
        f"method     {summary['method']}",
        f"data       {summary['data']}",
        f"hardware   {summary['processes']} process(es), mixed precision {summary['mixed_precision']}",
        f"trained    {summary['updates']} updates ({summary['epochs_done']:.2f} epochs) in "
        f"{summary['wall_seconds']:.1f} s"
        + (f", {summary['train_samples_per_s']:.0f} img/s" if summary.get("train_samples_per_s") else ""),
    ]
    if ev:
        lines.append(
            f"final      val loss {ev['loss']:.4f}, top-1 {ev['top1']:.2f}%, top-5 {ev['top5']:.2f}%"
            + (f"; best top-1 {summary['best_top1']:.2f}% (epoch {summary['best_epoch'] + 1})")
        )
    if summary.get("ema_eval"):
        lines.append(f"EMA        top-1 {summary['ema_eval']['top1']:.2f}%")
    lines.append(
        f"filters    sum ||WW^T-I||^2 = {summary['ortho_residual']:.4g}, "
        f"mean |cos| = {summary['filter_cos']:.4g}"
    )
    if summary.get("synthetic"):
        lines.append("NOTE       trained on the EMBEDDED SYNTHETIC data set (no --data-dir)")
    for png in summary.get("plots") or ():
        lines.append(f"plot       {png}")
    lines.append("=" * 78)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, preset: Preset = "imagenet") -> int:
    """Entry point of the scripts: parse flags, train, return the process exit code."""
    args = build_parser(preset).parse_args(argv)
    # Read the rank from the launcher's environment: creating accelerate's state here would fix its
    # settings before train() chooses them.
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Accelerate reports every file of every checkpoint at INFO; the trainer reports the checkpoint.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        cfg = config_from_args(args)
        train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
