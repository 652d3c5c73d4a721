"""Small, exactly comparable training runs that measure the method's mechanism and trainability.

One :func:`run` trains a model for a fixed number of steps on an in-memory image tensor set (the
embedded synthetic set, scikit-learn's handwritten digits, or CIFAR-10 from disk) under one of four
regimes:

- ``"l2"``: MSRA init, SGD with L2 weight decay, no modulation (the baseline);
- ``"default"``: exactly what a user types, ``OrthoModulated(SGD(model.parameters(), lr, momentum),
  model)`` on the model's defaults, every other option the library's;
- ``"ortho"``: orthonormal init, ``OrthoModulated(SGD)`` with the orthonormality term, no modulation;
- ``"ortho_mod"``: ``"ortho"`` plus backward error modulation.

``act_layer``, ``max_grad_ratio`` (the wrapper's step bound), ``clip_grad`` (a user-side global
gradient-norm clip) and ``precise_bn`` (BN statistics recomputed before evaluation) switch the other
ingredients on and off for ablations.

Every ``record_every`` steps it records the training loss, the mean absolute cosine between filters
(averaged over layers, the paper's Fig. 2) and the bottom/top ratio of the error's second moment
(Fig. 3, measured on the same backward that produces the update). Runs of the same seed see the
same batches in the same order and start from the same RNG state, so differences come from the
regime alone.

This is a second, light training loop beside the trainer (:mod:`timm_ortho.train.loop`): it holds
the data in memory as tensors and uses no Accelerate, no data loader and no checkpoints, because
``scripts/reproduce.py`` and ``scripts/depth_suite.py`` run thousands of tiny runs with it, on one
device, where the trainer's start-up would cost more than the run. Its optimizers come from the same
factory as the trainer's (:func:`timm_ortho.create_optimizer`).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..defaults import DEFAULT_ORTHO_DECAY
from ..diagnostics import filter_correlation
from ..factory import create_optimizer
from ..modulation import ErrorModulation
from ..precise_bn import recompute_bn_statistics
from ..targets import find_targets

__all__ = ["RunConfig", "TensorData", "best_by_loss", "load_tensor_data", "run", "run_many"]

Method = Literal["l2", "default", "ortho", "ortho_mod"]
DatasetName = Literal["synthetic", "digits", "cifar10"]


@dataclass
class RunConfig:
    """One training run; every field is recorded with its result."""

    model: str = "plain_cnn44"
    method: Method = "ortho"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    """L2 coefficient of the ``"l2"`` regime (the other regimes use ``ortho_decay`` instead)."""
    ortho_decay: float = DEFAULT_ORTHO_DECAY
    modulation: dict[str, Any] = field(default_factory=dict)
    """ErrorModulation options for ``"ortho_mod"`` (empty: the library defaults)."""
    max_grad_ratio: float | None = None
    """The wrapper's step bound for ``"ortho"``/``"ortho_mod"`` (None: off)."""
    act_layer: str | None = None
    """The model's ``act_layer`` (None: the model's default)."""
    clip_grad: float | None = None
    """A user-side ``clip_grad_norm_`` on all parameters before every step (None: none)."""
    steps: int = 300
    batch_size: int = 32
    schedule: Literal["step", "cosine"] = "step"
    """``"step"``: lr / 10 at ``lr_drops``; ``"cosine"``: cosine decay to 0 over ``steps``."""
    lr_drops: tuple[float, ...] = (0.5, 0.75)
    """Fractions of ``steps`` where the lr is divided by 10 (the paper's 32k/48k of 64k)."""
    seed: int = 0
    record_every: int = 10
    init: str | None = None
    """Override the regime's init (``"msra"`` for l2, ``"orthonormal"`` otherwise)."""
    wrapper: dict[str, Any] = field(default_factory=dict)
    """For ``"default"``: :func:`timm_ortho.create_optimizer`'s options that differ from the library's
    (``ortho_decay``, ``modulation``, ``max_grad_ratio``, ``form``, ``target_kwargs``; ablations)."""
    precise_bn: int = 0
    """Batches of training data to recompute BN statistics with before the second evaluation
    (``val_acc_precise``); 0 for none."""


@dataclass
class TensorData:
    """Normalized images and labels held in memory (train and held-out)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    num_classes: int
    source: str


def _digits(img_size: int, n_train: int, seed: int) -> tuple[list[np.ndarray], list[Tensor], str]:
    """scikit-learn's 1,797 handwritten digits (8x8, grey levels 0-16) as RGB uint8, fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # an optional dependency: the experiments extra
        raise ImportError(
            "the digits data set needs scikit-learn: pip install 'timm_ortho[experiments]'"
        ) from e
    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)  # the models' stems take 3 channels
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).numpy()
    n_train = min(n_train, len(images) - 297)
    split = [order[:n_train], order[len(images) - 297 :]]
    arrays = [images[i] for i in split]
    labels = [torch.from_numpy(bunch.target[i]).long() for i in split]
    source = f"scikit-learn digits ({n_train} train / 297 test, 8px -> {img_size}px, split seed {seed})"
    return arrays, labels, source


def load_tensor_data(
    data_dir: str | Path | None = None,
    img_size: int = 16,
    n_train: int = 4096,
    n_val: int = 1024,
    num_classes: int = 10,
    seed: int = 0,
    dataset: DatasetName | None = None,
) -> TensorData:
    """The embedded synthetic set, scikit-learn's digits or CIFAR-10's python batches, as tensors.

    ``dataset`` defaults to ``"cifar10"`` when ``data_dir`` is given and ``"synthetic"`` otherwise.
    Images are resized to ``img_size`` when it differs and normalized per channel with the training
    split's mean and standard deviation.
    """
    from .data import Cifar10, SyntheticImages

    dataset = dataset or ("cifar10" if data_dir is not None else "synthetic")
    if dataset not in ("synthetic", "digits", "cifar10"):
        raise ValueError(f"dataset must be 'synthetic', 'digits' or 'cifar10', got {dataset!r}")
    if dataset == "cifar10" and data_dir is None:
        raise ValueError("dataset='cifar10' needs data_dir (a cifar-10-batches-py folder)")
    if dataset == "digits":
        arrays, labels, source = _digits(img_size, n_train, seed)
    elif dataset == "synthetic":
        train = SyntheticImages(n_train, num_classes, img_size, seed=seed, split=0)
        val = SyntheticImages(n_val, num_classes, img_size, seed=seed, split=1)
        arrays = [np.stack([d.render(i) for i in range(len(d))]) for d in (train, val)]
        labels = [torch.tensor(d.targets[: len(d)]) for d in (train, val)]
        source = f"embedded synthetic set ({num_classes} classes, {img_size}px, seed {seed})"
    else:
        train, val = Cifar10(data_dir, train=True), Cifar10(data_dir, train=False)
        n_train, n_val = min(n_train, len(train)), min(n_val, len(val))
        arrays = [train.data[:n_train], val.data[:n_val]]  # (N, 32, 32, 3) uint8
        labels = [torch.tensor(train.targets[:n_train]), torch.tensor(val.targets[:n_val])]
        source = f"CIFAR-10 from {data_dir} ({n_train} train / {n_val} test images)"
    # contiguous: an NHWC-strided batch would send every conv and BN down the channels-last path.
    tensors = [torch.from_numpy(a).permute(0, 3, 1, 2).float().div_(255.0).contiguous() for a in arrays]
    if tensors[0].shape[-1] != img_size:
        tensors = [F.interpolate(t, size=img_size, mode="bilinear", antialias=True) for t in tensors]
    mean = tensors[0].mean(dim=(0, 2, 3), keepdim=True)
    std = tensors[0].std(dim=(0, 2, 3), keepdim=True)
    x_train, x_val = ((t - mean) / std for t in tensors)
    num_classes = num_classes if dataset == "synthetic" else 10  # digits and CIFAR-10 have ten
    return TensorData(x_train, labels[0], x_val, labels[1], num_classes, source)


def _optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The regime's optimizer; every wrapped one comes from :func:`timm_ortho.create_optimizer`.

    timm's ``"momentum"`` is torch's SGD without Nesterov and, with ``weight_decay=0``, takes
    ``model.parameters()`` as its one group: ``"default"`` is therefore exactly the user's
    ``OrthoModulated(torch.optim.SGD(model.parameters(), lr, momentum=0.9), model)``.
    """
    if cfg.method == "l2":  # the baseline is a bare optimizer
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.method == "default":  # the library's defaults; ablations change one option in cfg.wrapper
        options = cfg.wrapper
    else:
        modulation = (dict(cfg.modulation) or True) if cfg.method == "ortho_mod" else False
        options = dict(ortho_decay=cfg.ortho_decay, max_grad_ratio=cfg.max_grad_ratio, modulation=modulation)
    return create_optimizer(model, "momentum", lr=cfg.lr, weight_decay=0.0, momentum=cfg.momentum, **options)


@torch.no_grad()
def _evaluate(model: nn.Module, data: TensorData, device: torch.device, diverged: bool) -> dict[str, float]:
    """Held-out loss and accuracy; NaN and 0 for a diverged run, which is not evaluated."""
    if diverged:
        return {"val_loss": float("nan"), "val_acc": 0.0}
    model.eval()
    correct, loss = 0.0, 0.0
    for i in range(0, len(data.y_val), 256):
        x, y = data.x_val[i : i + 256].to(device), data.y_val[i : i + 256].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return {"val_loss": loss / len(data.y_val), "val_acc": correct / len(data.y_val)}


def _epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(epoch order, index batch): a permutation per epoch drawn from one generator, the incomplete
    batch dropped.

    torch's ``BatchSampler(RandomSampler(...), drop_last=True)`` gives the same epochs but draws one
    more, discarded, permutation at the end of each, which would change the batches of every run
    recorded so far.
    """
    generator = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(n, generator=generator), 0
    while True:
        if cursor + batch_size > n:
            perm, cursor = torch.randperm(n, generator=generator), 0
        cursor += batch_size
        yield perm, perm[cursor - batch_size : cursor]


def _set_lr(opt: torch.optim.Optimizer, cfg: RunConfig, step: int, base_lrs: list[float]) -> None:
    """The schedule of ``cfg`` at ``step``: a tenth at each drop, or cosine decay to 0.

    Not timm's ``MultiStepLRScheduler``: it computes ``lr * 0.1 ** k``, which differs from the
    recorded runs' ``lr * 0.1 * 0.1`` in the last bit for some learning rates (0.01, 0.3, ...).
    """
    if cfg.schedule == "step" and step in {int(f * cfg.steps) for f in cfg.lr_drops}:
        for group in opt.param_groups:
            group["lr"] *= 0.1
    elif cfg.schedule == "cosine":
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / cfg.steps))


def run(cfg: RunConfig, data: TensorData, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train one configuration and return its record (config, history, final values, timing)."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    # "default" is the model as created, unless an ablation sets init.
    init = cfg.init or {"l2": "msra", "default": None}.get(cfg.method, "orthonormal")
    model_kwargs = dict(in_chans=data.x_train.shape[1], act_layer=cfg.act_layer, init=init)
    model_kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
    model = timm.create_model(cfg.model, num_classes=data.num_classes, **model_kwargs).to(device)
    opt = _optimizer(cfg, model)
    # The modulation that measures (or modulates) the error moments.
    probe = getattr(opt, "modulation", None) or ErrorModulation(model, measure_only=True)
    targets = find_targets(model)  # found once: the diagnostics keep one engine per target list
    base_lrs = [group["lr"] for group in opt.param_groups]
    batches = _epoch_batches(len(data.y_train), cfg.batch_size, seed=10_000 + cfg.seed)
    history: list[dict[str, float]] = []
    losses: list[Tensor] = []
    diverged = False
    start = time.perf_counter()
    for step in range(cfg.steps):
        _set_lr(opt, cfg, step, base_lrs)
        perm, idx = next(batches)
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        losses.append(loss.detach())
        if (step + 1) % cfg.record_every == 0 or step == cfg.steps - 1:
            window = torch.stack(losses[-cfg.record_every :]).mean().item()
            history.append(
                {
                    "step": step + 1,
                    "loss": window,
                    "cosine": filter_correlation(targets).mean().item(),
                    "bottom_top_ratio": probe.last_stats().bottom_top_ratio("after").item(),
                    "lr": opt.param_groups[0]["lr"],
                }
            )
            if not math.isfinite(window):
                diverged = True
                break
    seconds = time.perf_counter() - start
    # The final values: losses, error moments per layer, validation (also after precise BN).
    stats = probe.last_stats()
    tail = max(1, len(losses) // 10)
    final = {
        "train_loss": torch.stack(losses[-tail:]).mean().item(),
        "diverged": diverged,
        "layer_names": stats.names,
        "layer_moments": stats.q_after.double().cpu().tolist(),
        "layer_scales": stats.scale.double().cpu().tolist(),
        **_evaluate(model, data, device, diverged),
    }
    if cfg.precise_bn:
        if not diverged:
            # The first batches of the last epoch's order: training data, drawn without new randomness.
            bn_batches = (data.x_train[i].to(device) for i in perm.split(cfg.batch_size))
            recompute_bn_statistics(model, bn_batches, cfg.precise_bn)
        final.update({f"{k}_precise": v for k, v in _evaluate(model, data, device, diverged).items()})
    probe.remove()
    return {"config": asdict(cfg), "history": history, "final": final, "seconds": seconds}


def best_by_loss(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The record with the lowest final training loss (diverged runs count as +inf)."""

    def key(r: dict[str, Any]) -> float:
        value = r["final"]["train_loss"]
        return float("inf") if r["final"]["diverged"] or not math.isfinite(value) else value

    return min(records, key=key)


# Each process's data sets, loaded once and kept for the runs that follow.
_cached_data = functools.cache(load_tensor_data)


def _run_job(
    cfg: RunConfig, data_kwargs: dict[str, Any], device: str, deadline_at: float | None, threads: int | None
) -> dict[str, Any] | None:
    """One run on the data ``data_kwargs`` describe; None past the deadline. ``threads``: a worker
    process's share of the cores (None: this process, its threads left as they are)."""
    if deadline_at is not None and time.time() >= deadline_at:
        return None
    if threads is not None:
        torch.set_num_threads(threads)
    return run(cfg, _cached_data(**data_kwargs), device)


def run_many(
    configs: Sequence[RunConfig],
    data_kwargs: dict[str, Any] | Sequence[dict[str, Any]],
    device: str = "cpu",
    jobs: int = 1,
    *,
    deadline: float | None = None,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any] | None]:
    """Run independent configurations, in ``jobs`` worker processes when > 1; records in ``configs`` order.

    Args:
        configs: the runs.
        data_kwargs: the arguments of :func:`load_tensor_data`, one dict for every run or one per run;
            each process loads each data set once and keeps it.
        device: where every run trains; worker processes share it (on a CPU each gets an equal share
            of the cores as threads).
        jobs: worker processes (spawned); 1 runs everything in this process.
        deadline: seconds from now after which no run starts; a run not started gives ``None``.
        on_result: ``on_result(index, record)`` as each run finishes, in the order they finish (to
            save what finished if the whole is cut short, or to advance a progress bar).
    """
    per_run = [data_kwargs] * len(configs) if isinstance(data_kwargs, dict) else list(data_kwargs)
    if len(per_run) != len(configs):
        raise ValueError(f"{len(per_run)} data_kwargs for {len(configs)} configs")
    deadline_at = None if deadline is None else time.time() + deadline
    records: list[dict[str, Any] | None] = [None] * len(configs)

    def finished(index: int, record: dict[str, Any] | None) -> None:
        records[index] = record
        if record is not None and on_result is not None:
            on_result(index, record)

    if jobs <= 1:
        for i, (cfg, kwargs) in enumerate(zip(configs, per_run, strict=True)):
            finished(i, _run_job(cfg, kwargs, device, deadline_at, None))
        return records
    import concurrent.futures
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // jobs) if device == "cpu" else 1
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {
            pool.submit(_run_job, cfg, kwargs, device, deadline_at, threads): i
            for i, (cfg, kwargs) in enumerate(zip(configs, per_run, strict=True))
        }
        for future in concurrent.futures.as_completed(futures):
            finished(futures[future], future.result())
    return records
