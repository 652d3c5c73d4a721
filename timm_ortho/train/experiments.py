"""Small, exactly comparable training runs that measure the method's mechanism and trainability.

One :func:`run` trains a model for a fixed number of steps on an in-memory image tensor set (the
embedded synthetic set, scikit-learn's handwritten digits, or CIFAR-10 from disk) under one of five
regimes:

- ``"l2"``: MSRA init, the bare optimizer with L2 weight decay, no modulation (the baseline);
- ``"none"``: MSRA init, the bare optimizer without any regularizer;
- ``"default"``: exactly what a user types, ``OrthoModulated(SGD(model.parameters(), lr, momentum),
  model)`` on the model's defaults, every other option the library's;
- ``"ortho"``: orthonormal init, ``OrthoModulated(SGD)`` with the orthonormality term, no modulation;
- ``"ortho_mod"``: ``"ortho"`` plus backward error modulation.

``act_layer``, ``max_grad_ratio`` (the step bound: the wrapper's, or for ``"l2"`` and ``"none"`` the
same bound applied by :func:`timm_ortho.step_bound.bound_gradients_` to the same weights; ``"auto"``
is the wrapper's choice for the model), ``clip_grad`` (a user-side global gradient-norm clip),
``warmup`` (He et al.'s: lr 0.01 until the training error is below 80 %) and ``precise_bn`` (BN
statistics recomputed before evaluation) switch the other ingredients on and off for ablations.

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
from dataclasses import asdict, dataclass, field, replace
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
from ..step_bound import auto_max_grad_ratio, bound_gradients_
from ..targets import find_targets

__all__ = [
    "GridResult",
    "RunConfig",
    "TensorData",
    "best_by_loss",
    "load_tensor_data",
    "run",
    "run_lr_grid",
    "run_many",
]

Method = Literal["l2", "none", "default", "ortho", "ortho_mod"]
DatasetName = Literal["synthetic", "digits", "cifar10"]


@dataclass
class RunConfig:
    """One training run; every field is recorded with its result."""

    model: str = "plain_cnn44"
    method: Method = "ortho"
    lr: float = 0.1
    momentum: float = 0.9
    opt: str = "momentum"
    """The base optimizer, a timm name (``"momentum"``: torch's SGD without Nesterov)."""
    weight_decay: float = 1e-4
    """L2 coefficient of the ``"l2"`` regime (the other regimes use ``ortho_decay`` instead)."""
    ortho_decay: float = DEFAULT_ORTHO_DECAY
    modulation: dict[str, Any] = field(default_factory=dict)
    """ErrorModulation options for ``"ortho_mod"`` (empty: the library defaults)."""
    max_grad_ratio: float | Literal["auto"] | None = None
    """The step bound for every regime but ``"default"`` (None: off; ``"auto"``: the wrapper's choice
    for the model, ``min(0.01, 1/L)`` on plain chains and off elsewhere)."""
    act_layer: str | None = None
    """The model's ``act_layer`` (None: the model's default)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further ``timm.create_model`` arguments (e.g. a ViT's ``img_size`` and ``patch_size``)."""
    warmup: bool = False
    """He et al.'s warm-up for deep residual nets: lr 0.01 until the training error (mean of the last
    10 batches) is below 80 %, for at least 1 % of the steps; then the schedule."""
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
    label_noise: float = 0.0,
) -> TensorData:
    """The embedded synthetic set, scikit-learn's digits or CIFAR-10's python batches, as tensors.

    ``dataset`` defaults to ``"cifar10"`` when ``data_dir`` is given and ``"synthetic"`` otherwise.
    Images are resized to ``img_size`` when it differs and normalized per channel with the training
    split's mean and standard deviation. ``label_noise``: the fraction of *training* labels replaced
    by a different class drawn uniformly (fixed by ``seed``); the held-out labels stay clean.
    """
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be a fraction in [0, 1), got {label_noise!r}")
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
    if label_noise:
        labels[0] = _noisy(labels[0], label_noise, num_classes, seed)
        source += f", {label_noise:.0%} of the training labels replaced"
    return TensorData(x_train, labels[0], x_val, labels[1], num_classes, source)


def _noisy(labels: Tensor, fraction: float, num_classes: int, seed: int) -> Tensor:
    """``labels`` with ``round(fraction * n)`` of them (a seeded choice) moved to another class."""
    generator = torch.Generator().manual_seed(0x7A1 + seed)
    chosen = torch.randperm(len(labels), generator=generator)[: round(fraction * len(labels))]
    shift = torch.randint(1, num_classes, (len(chosen),), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


def _optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The regime's optimizer; every wrapped one comes from :func:`timm_ortho.create_optimizer`.

    timm's ``"momentum"`` is torch's SGD without Nesterov and, with ``weight_decay=0``, takes
    ``model.parameters()`` as its one group: ``"default"`` is therefore exactly the user's
    ``OrthoModulated(torch.optim.SGD(model.parameters(), lr, momentum=0.9), model)``.
    """
    if cfg.method in ("l2", "none"):  # the baselines are a bare optimizer
        weight_decay = cfg.weight_decay if cfg.method == "l2" else 0.0
        if cfg.opt == "momentum":  # every parameter decayed, as He et al.
            return torch.optim.SGD(
                model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=weight_decay
            )
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(
            model, cfg.opt, lr=cfg.lr, weight_decay=weight_decay, momentum=cfg.momentum
        )
    if cfg.method == "default":  # the library's defaults; ablations change one option in cfg.wrapper
        options = cfg.wrapper
    else:
        modulation = (dict(cfg.modulation) or True) if cfg.method == "ortho_mod" else False
        options = dict(ortho_decay=cfg.ortho_decay, max_grad_ratio=cfg.max_grad_ratio, modulation=modulation)
    return create_optimizer(model, cfg.opt, lr=cfg.lr, weight_decay=0.0, momentum=cfg.momentum, **options)


@torch.no_grad()
def _evaluate(
    model: nn.Module, data: TensorData, device: torch.device, diverged: bool, split: str = "val"
) -> dict[str, float]:
    """Loss and accuracy on the held-out (``"val"``) or training (``"train"``) images, in eval mode;
    NaN and 0 for a diverged run, which is not evaluated."""
    if diverged:
        return {f"{split}_loss": float("nan"), f"{split}_acc": 0.0}
    images, labels = (data.x_val, data.y_val) if split == "val" else (data.x_train, data.y_train)
    model.eval()
    correct, loss = 0.0, 0.0
    for i in range(0, len(labels), 256):
        x, y = images[i : i + 256].to(device), labels[i : i + 256].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return {f"{split}_loss": loss / len(labels), f"{split}_acc": correct / len(labels)}


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


def _lr_at(cfg: RunConfig, step: int, base_lr: float) -> float:
    """The schedule of ``cfg`` at ``step``: a tenth after each drop, or cosine decay to 0.

    Not timm's ``MultiStepLRScheduler``: it computes ``lr * 0.1 ** k``, which differs from the
    recorded runs' ``lr * 0.1 * 0.1`` in the last bit for some learning rates (0.01, 0.3, ...).
    """
    if cfg.schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / cfg.steps))
    lr = base_lr
    for fraction in cfg.lr_drops:
        if step >= int(fraction * cfg.steps):
            lr *= 0.1
    return lr


WARMUP_LR = 0.01
WARMUP_ERROR = 0.8


class _Warmup:
    """He et al.'s warm-up (ResNet-110 on CIFAR-10): lr 0.01 until the training error is below 80 %.

    The error is the mean over the last 10 training batches; the warm-up lasts at least 1 % of the
    steps (the issue that set the protocol: "the first 1 % of steps or until the training error is
    below 80 %", whichever is later) and ends for good once left.
    """

    def __init__(self, steps: int) -> None:
        self.min_steps = max(1, math.ceil(0.01 * steps))
        self.errors: list[Tensor] = []
        self.on = True
        self.steps = 0

    def update(self, step: int, logits: Tensor, y: Tensor) -> None:
        if not self.on:
            return
        self.errors = [*self.errors[-9:], (logits.detach().argmax(1) != y).float().mean()]
        if step + 1 >= self.min_steps and torch.stack(self.errors).mean().item() < WARMUP_ERROR:
            self.on, self.steps = False, step + 1


def _model(cfg: RunConfig, data: TensorData) -> nn.Module:
    """The regime's model: MSRA init for the baselines, orthonormal for the method's regimes, the
    model as created for ``"default"`` (unless ``cfg.init`` says otherwise).

    This package's nets take ``init`` (and ``act_layer``) as creation arguments. Any other timm model
    keeps its own initialization for ``"msra"`` (timm's ResNets: He et al.'s) and gets orthonormal
    filters from :func:`timm_ortho.init_weights_` (biases kept) for ``"orthonormal"``, as the trainer.
    """
    from timm.models import model_entrypoint

    from ..init import init_weights_

    init = cfg.init or {"l2": "msra", "none": "msra", "default": None}.get(cfg.method, "orthonormal")
    kwargs = dict(in_chans=data.x_train.shape[1], act_layer=cfg.act_layer, **cfg.model_kwargs)
    own = model_entrypoint(cfg.model).__module__.startswith(__package__.rpartition(".")[0] + ".models")
    if own:
        kwargs["init"] = init
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = timm.create_model(cfg.model, num_classes=data.num_classes, **kwargs)
    if not own and init == "orthonormal":
        init_weights_(model, "orthonormal", zero_bias=False)
    return model


def run(cfg: RunConfig, data: TensorData, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train one configuration and return its record (config, history, final values, timing)."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = _model(cfg, data).to(device)
    opt = _optimizer(cfg, model)
    # The modulation that measures (or modulates) the error moments.
    probe = getattr(opt, "modulation", None) or ErrorModulation(model, measure_only=True)
    targets = find_targets(model)  # found once: the diagnostics keep one engine per target list
    bound = _baseline_bound(cfg, model, targets)
    warmup = _Warmup(cfg.steps) if cfg.warmup else None
    base_lrs = [group["lr"] for group in opt.param_groups]
    batches = _epoch_batches(len(data.y_train), cfg.batch_size, seed=10_000 + cfg.seed)
    history: list[dict[str, float]] = []
    losses: list[Tensor] = []
    diverged = False
    start = time.perf_counter()
    for step in range(cfg.steps):
        warming = warmup is not None and warmup.on
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = WARMUP_LR if warming else _lr_at(cfg, step, lr)
        perm, idx = next(batches)
        x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        if bound is not None:
            bound_gradients_(*bound)
        opt.step()
        if warmup is not None:
            warmup.update(step, logits, y)
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
        **_evaluate(model, data, device, diverged, split="train"),
        "warmup_steps": None if warmup is None else (warmup.steps if not warmup.on else cfg.steps),
    }
    if cfg.precise_bn:
        if not diverged:
            # The first batches of the last epoch's order: training data, drawn without new randomness.
            bn_batches = (data.x_train[i].to(device) for i in perm.split(cfg.batch_size))
            recompute_bn_statistics(model, bn_batches, cfg.precise_bn)
        for split in ("val", "train"):
            final.update(
                {f"{k}_precise": v for k, v in _evaluate(model, data, device, diverged, split).items()}
            )
    probe.remove()
    return {"config": asdict(cfg), "history": history, "final": final, "seconds": seconds}


def _baseline_bound(cfg: RunConfig, model: nn.Module, targets: list) -> tuple[list, float] | None:
    """For the bare-optimizer regimes: the step bound the wrapper would apply, as ``(weights, ratio)``."""
    if cfg.method not in ("l2", "none") or cfg.max_grad_ratio is None:
        return None
    weights = [t.param for t in targets]
    ratio = auto_max_grad_ratio(model, len(weights)) if cfg.max_grad_ratio == "auto" else cfg.max_grad_ratio
    return None if ratio is None else (weights, ratio)


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


@dataclass
class GridResult:
    """One cell of a suite run over a learning-rate grid (see :func:`run_lr_grid`)."""

    lr: float
    """The grid's lr with the lowest final training loss on the first seed."""
    seeds: list[dict[str, Any] | None]
    """The records at that lr, one per seed (the first seed's from the grid); None: not run (deadline)."""
    grid: list[dict[str, Any] | None]
    """The first seed's records at every lr of the grid, in grid order."""


def run_lr_grid(
    cells: Sequence[tuple[RunConfig, dict[str, Any]]],
    lrs: Sequence[float],
    seeds: Sequence[int],
    device: str = "cpu",
    jobs: int = 1,
    *,
    deadline: float | None = None,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[GridResult]:
    """Every cell ``(config, data_kwargs)`` at each lr of ``lrs`` on the first seed, then the other seeds
    at the lr whose final training loss was lowest (diverged runs count as +inf).

    The selection reads no held-out data. Both phases run every cell's runs together in ``jobs``
    processes; ``on_result(cell index, record)`` is called as each run finishes. ``deadline``: seconds
    from now after which no run starts (its record is None; a cell whose grid did not finish runs no
    further seeds).
    """
    if not lrs or not seeds:
        raise ValueError("run_lr_grid needs at least one lr and one seed")
    stop_at = None if deadline is None else time.time() + deadline

    def left() -> float | None:
        return None if stop_at is None else max(0.0, stop_at - time.time())

    def phase(plan: list[tuple[int, RunConfig]]) -> list[dict[str, Any] | None]:
        def finished(index: int, record: dict[str, Any]) -> None:
            if on_result is not None:
                on_result(plan[index][0], record)

        return run_many(
            [cfg for _, cfg in plan],
            [cells[i][1] for i, _ in plan],
            device,
            jobs,
            deadline=left(),
            on_result=finished,
        )

    first = [(i, replace(cfg, lr=lr, seed=seeds[0])) for i, (cfg, _) in enumerate(cells) for lr in lrs]
    grid = phase(first)
    per_cell = [grid[i * len(lrs) : (i + 1) * len(lrs)] for i in range(len(cells))]
    best = [
        None if any(r is None for r in records) else records.index(best_by_loss(records))  # type: ignore[arg-type]
        for records in per_cell
    ]
    rest = [
        (i, replace(cfg, lr=lrs[b], seed=seed))
        for i, ((cfg, _), b) in enumerate(zip(cells, best, strict=True))
        if b is not None
        for seed in seeds[1:]
    ]
    more = iter(phase(rest))
    results = []
    for records, b in zip(per_cell, best, strict=True):
        if b is None:
            results.append(GridResult(float("nan"), [None] * len(seeds), records))
            continue
        results.append(GridResult(lrs[b], [records[b], *(next(more) for _ in seeds[1:])], records))
    return results
