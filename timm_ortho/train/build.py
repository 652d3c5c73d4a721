"""The pieces a training run is built from, each from its :class:`~timm_ortho.train.config.TrainConfig`.

:func:`timm_ortho.train.setup.setup` calls them in the order Accelerate asks for: the accelerator and
the run folder, the data, the model, the wrapped optimizer (before ``prepare``), the schedule and the
loss (after it, on the prepared optimizer and loaders); the optimizer and the schedule are
:mod:`timm_ortho.train.optimization`'s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from .config import DEFAULT_PRECISE_BN_BATCHES, ConfigError, TrainConfig
from .data import SeededTransform, build_datasets, build_loader, build_transforms, check_data
from .resume import check_run_folder, resume_point
from .tracking import JsonlTracker, banner
from .validation import check_model_arguments

__all__ = [
    "build_data",
    "build_loss",
    "build_model",
    "check_data",
    "check_writable",
    "create_model",
    "discard_failed_start",
    "make_accelerator",
    "precise_bn_loader",
    "run_folder",
]

_log = get_logger("timm_ortho.train")


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


def make_accelerator(cfg: TrainConfig) -> Any:
    """The run's ``Accelerator``: precision and processes from the launcher, trackers from ``--log-with``."""
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
        log_with=[JsonlTracker(), *installed],  # metrics.jsonl; its path is set with the run folder
        step_scheduler_with_optimizer=False,
    )
    if not accelerator.is_main_process:  # other processes report warnings only
        logging.getLogger().setLevel(logging.WARNING)
    for name in sorted(set(cfg.log_with or ()) - set(installed)):
        _log.warning("tracker %r is not installed (or unknown to accelerate): not logging to it", name)
    return accelerator


def check_writable(path: Path) -> None:
    """``path``, or the nearest folder above it that exists, takes new files (a ``ConfigError`` if not).

    Tried with a real (anonymous) file, which also catches read-only file systems and full disks
    that permission bits do not show.
    """
    existing = path.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"cannot create the run folder {path}: {existing} is a file; choose another --output"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot write into {existing} ({e.strerror or e}), where the run folder {path} goes; "
            "choose a writable --output"
        ) from e


def run_folder(cfg: TrainConfig, accelerator: Any) -> tuple[Path, Path | None]:
    """The run folder (named once, on the main process) and the checkpoint to resume from.

    Everything that can be checked without building the run is checked first (the data folder, the
    checkpoint's integrity and recipe, that the output takes files, that the folder holds one
    timeline), so that a start that fails on them creates no folder.
    """
    from accelerate.utils import broadcast_object_list

    check_data(cfg)
    resume_path, run_dir = resume_point(cfg, accelerator) if cfg.resume is not None else (None, None)
    if run_dir is None:
        method = (
            "baseline" if cfg.baseline else ("ortho" if cfg.modulation in (False, "auto") else "ortho-mod")
        )
        name = [cfg.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{method}"]
        broadcast_object_list(name)  # the main process's clock names the folder
        run_dir = Path(cfg.output) / name[0]
    check_writable(run_dir)
    check_run_folder(run_dir, resume_path)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.project_configuration.set_directories(str(run_dir))
    return run_dir, resume_path


def discard_failed_start(run_dir: Path) -> bool:
    """Remove ``run_dir`` if it holds nothing but what a start writes before training (main process).

    That is ``config.json`` and a ``metrics.jsonl`` of ``config`` records only: a start that failed
    before its first update then leaves no folder behind. Returns whether it was removed.
    """
    if not run_dir.is_dir() or any(p.name not in ("config.json", "metrics.jsonl") for p in run_dir.iterdir()):
        return False
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    try:
        if any(json.loads(line).get("type") != "config" for line in lines if line.strip()):
            return False
    except ValueError:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def build_data(cfg: TrainConfig, accelerator: Any) -> tuple[Any, SeededTransform, Any, Any]:
    """``(datasets, train_set, train_loader, val_loader)``; the loaders are not prepared yet."""
    from timm.models import get_pretrained_cfg

    size = getattr(get_pretrained_cfg(cfg.model), "input_size", None)  # None for an unknown model
    data_cfg = cfg.data_config(cfg.img_size or (int(size[-1]) if size else 224))
    datasets = build_datasets(data_cfg)
    if datasets.synthetic:
        title = "NO DATA DIRECTORY GIVEN: TRAINING ON THE EMBEDDED SYNTHETIC DATA SET"
        what = "Accuracy on it says nothing about ImageNet or CIFAR; pass --data-dir for real data."
        _log.warning("\n%s", banner([title, datasets.description, what]))
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


def create_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, str]:
    """The model and a description of its initialization.

    This package's architectures take ``init`` as a creation argument. Other models are initialized
    by the trainer: ``msra`` keeps the model's own (timm) initialization; ``orthonormal`` gives every
    conv/linear weight orthonormal filters (:func:`timm_ortho.init_weights_`, the model's biases kept).
    """
    import timm
    from timm.models import model_entrypoint

    from ..init import init_weights_
    from ..models.plain_cnn import StagedCnn

    kwargs: dict[str, Any] = {"num_classes": num_classes, **cfg.model_kwargs}
    rates = {"drop_rate": cfg.drop, "drop_path_rate": cfg.drop_path}  # None: the model's own default
    kwargs.update((name, rate) for name, rate in rates.items() if rate is not None)
    init = cfg.init or ("msra" if cfg.baseline else "orthonormal")
    # This package's architectures (all StagedCnn, registered from its own modules) take the
    # initialization as a creation argument; the signature says which other arguments they take.
    if not model_entrypoint(cfg.model).__module__.startswith(StagedCnn.__module__.rpartition(".")[0]):
        model = timm.create_model(cfg.model, **kwargs)
        if init == "msra":
            return model, "the model's own (timm) initialization"
        init_weights_(model, "orthonormal", zero_bias=False)
        return model, "orthonormal (applied by the trainer to every conv/linear weight)"
    check_model_arguments(cfg)
    return timm.create_model(cfg.model, init=init, **kwargs), init


def build_loss(cfg: TrainConfig, num_classes: int) -> tuple[Any, nn.Module]:
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


def precise_bn_loader(cfg: TrainConfig, model: nn.Module, train_set: Any) -> tuple[Any, int]:
    """``(loader, batches)`` of precise BN; ``(None, 0)`` when off.

    ``--precise-bn`` or its default: on for plain nets (a chain with no shortcut, whose running
    statistics lag the weights most), off for other models. The loader has its own order and
    generator: recalibrating draws nothing from the training loader or the global RNG, so a resumed
    run sees exactly the batches of an uninterrupted one.
    """
    from ..models.plain_cnn import PlainCnn

    batches = cfg.precise_bn
    if batches is None:
        batches = DEFAULT_PRECISE_BN_BATCHES if isinstance(model, PlainCnn) else 0
    if not batches:
        return None, 0
    return build_loader(
        train_set, cfg.batch_size, train=True, seed=cfg.seed + 1, workers=cfg.workers
    ), batches


def build_model(cfg: TrainConfig, accelerator: Any, num_classes: int) -> tuple[nn.Module, Any, str]:
    """``(model, EMA or None, init description)``: created identically on every process, on its device."""
    from accelerate.utils import set_seed
    from timm.layers import convert_sync_batchnorm
    from timm.utils import ModelEmaV3

    set_seed(cfg.seed)
    model, init = create_model(cfg, num_classes)
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
    return model, ema, init
