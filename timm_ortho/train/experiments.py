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

The regimes' models and optimizers are :mod:`timm_ortho.train.regimes`'s, the data
:mod:`timm_ortho.train.tensor_data`'s; :mod:`timm_ortho.train.many_runs` runs many configurations
in worker processes and over an lr grid.

This loop is not the trainer's (:mod:`timm_ortho.train.loop`), and the two share no step function,
for three reasons:

- *What a run costs.* ``scripts/reproduce.py``, ``depth_suite.py`` and ``convergence_suites.py``
  run thousands of runs of 300 to 1,500 steps on 8-32 px tensors held in memory, many at once in
  worker processes. A trainer run starts an ``Accelerator`` (process-wide state that a worker would
  have to reset between runs), a run folder, loaders with their samplers and worker processes,
  trackers and rotating checkpoints, each costing more than such a run, and none of them used.
- *What the step is.* The trainer's step is shaped by what these runs never have: accumulation
  windows under ``accelerator.accumulate``, the GradScaler's skipped steps, the window of
  non-finite losses to skip, clipping after unscaling. It lacks what they need: the logits (the
  warm-up watches the training error) and, for the bare-optimizer regimes, the step bound between
  the clip and the step. One function for both would take hooks from each side to share the five
  lines they have in common (forward, loss, backward, clip, step).
- *What has been recorded.* The measurements in docs/results.md come from this loop's arithmetic:
  its batch order (:func:`_epoch_batches`, not the trainer's epoch-seeded sampler) and its schedule
  (:func:`_lr_at`, not timm's). On the trainer's step every recorded number would change.

Everything below the loop is shared with the trainer: the models, the optimizer factory
(:func:`timm_ortho.create_optimizer`), the modulation probe, the diagnostics, precise BN's
:func:`~timm_ortho.precise_bn.recompute_bn_statistics` and the data readers (the synthetic set,
CIFAR-10).
"""

from __future__ import annotations

import functools
import math
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..defaults import DEFAULT_ORTHO_DECAY
from ..diagnostics import filter_correlation
from ..modulation import ErrorModulation
from ..modulation_rule import ModulationStats
from ..precise_bn import recompute_bn_statistics
from ..step_bound import bound_gradients_
from ..targets import FilterBank, find_targets
from .regimes import baseline_bound, regime_model, regime_optimizer
from .tensor_data import TensorData, load_tensor_data

__all__ = [
    "WARMUP_DEPTH",
    "RunConfig",
    "TensorData",
    "best_by_loss",
    "code_version",
    "load_tensor_data",
    "run",
]

Method = Literal["l2", "none", "default", "ortho", "ortho_mod"]

WARMUP_DEPTH = 56
"""Residual twins of this depth or more train with ``warmup=True`` in every suite. He et al. warmed
up their 110-layer ResNet; giving the warm-up from 56 layers on leaves no deep twin without it."""


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
    for the model, ``1/L`` on plain chains and off elsewhere)."""
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

    The error is the mean over the last 10 training batches; the warm-up lasts until that error is
    below 80 % and at least 1 % of the steps, and ends for good once left. At a short budget it may
    never end (``cifar_resnet1202`` in 300 steps): the run is then at lr 0.01 throughout, whatever
    lr it was given.
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


def run(cfg: RunConfig, data: TensorData, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train one configuration and return its record (config, history, final values, timing)."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = regime_model(cfg, data).to(device)
    opt = regime_optimizer(cfg, model)
    # The modulation that measures (or modulates) the error moments.
    targets = find_targets(model)  # found once: the diagnostics keep one engine per target list
    probe = getattr(opt, "modulation", None) or _RecordStepProbe(model, targets)
    trained = _train(cfg, data, device, model, opt, probe, targets)
    final = _final_values(cfg, data, device, model, probe, trained)
    probe.remove()
    return {
        "config": asdict(cfg),
        "history": trained.history,
        "final": final,
        "seconds": trained.seconds,
        "code": code_version(),
    }


@functools.cache
def code_version() -> str:
    """The code a run's record comes from: ``timm_ortho <version>``, and the git commit when the
    package runs from a checkout (``+ uncommitted changes`` if its code differs from the commit).

    A suite's JSON collects runs from many calls; a later change to the arithmetic (a float32 state
    kept as Python floats, a different summation order) changes the runs that follow it, and this
    field tells which recorded rows a rerun would reproduce bit for bit.
    """
    version = f"timm_ortho {__version__}"
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return version  # an installed package: no commit to name
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", "timm_ortho", "scripts"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}, commit {commit}" + (" + uncommitted changes" if changed else "")


class _RecordStepProbe:
    """A measure-only :class:`ErrorModulation`, hooked on the steps whose statistics are recorded only.

    It changes no error, so a step without it is the same arithmetic; its hooks cost about 90 µs per
    layer per step on one CPU thread (a tenth of a 110-layer step at batch 32), and only one step in
    ``record_every`` is read (:func:`_train`'s history and, at the last step, the final per-layer
    record). :meth:`record` before a step's forward puts the hooks on or takes them off.
    """

    def __init__(self, model: nn.Module, targets: list[FilterBank]) -> None:
        self.model, self.targets = model, targets
        self.probe: ErrorModulation | None = None
        self.hooked = False

    def record(self, on: bool) -> None:
        if on and not self.hooked:
            self.probe = ErrorModulation(self.model, measure_only=True, targets=self.targets)
        elif not on and self.hooked:
            self.probe.remove()  # its statistics stay readable
        self.hooked = on

    def last_stats(self) -> ModulationStats:
        if self.probe is None:
            raise RuntimeError("no step has been recorded yet")
        return self.probe.last_stats()

    def remove(self) -> None:
        if self.hooked:
            self.probe.remove()
            self.hooked = False


@dataclass
class _Trained:
    """What the steps of one run leave for its record."""

    history: list[dict[str, float]]
    losses: list[Tensor]
    """Every step's training loss (on the device)."""
    diverged: bool
    order: Tensor | None
    """The order of the epoch the last batch came from (precise BN draws its batches from it)."""
    warmup_steps: int | None
    seconds: float


def _train(
    cfg: RunConfig,
    data: TensorData,
    device: torch.device,
    model: nn.Module,
    opt: Any,
    probe: ErrorModulation | _RecordStepProbe,
    targets: list[FilterBank],
) -> _Trained:
    """The steps of one run; every ``record_every`` steps a point of the history. A non-finite
    window of losses ends the run (diverged)."""
    bound = baseline_bound(cfg, model, targets)
    warmup = _Warmup(cfg.steps) if cfg.warmup else None
    base_lrs = [group["lr"] for group in opt.param_groups]
    batches = _epoch_batches(len(data.y_train), cfg.batch_size, seed=10_000 + cfg.seed)
    history: list[dict[str, float]] = []
    losses: list[Tensor] = []
    diverged, perm = False, None
    start = time.perf_counter()
    for step in range(cfg.steps):
        warming = warmup is not None and warmup.on
        for group, lr in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = WARMUP_LR if warming else _lr_at(cfg, step, lr)
        recording = (step + 1) % cfg.record_every == 0 or step == cfg.steps - 1
        if isinstance(probe, _RecordStepProbe):
            probe.record(recording)
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
        if recording:
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
    warmup_steps = None if warmup is None else (warmup.steps if not warmup.on else cfg.steps)
    return _Trained(history, losses, diverged, perm, warmup_steps, seconds)


def _final_values(
    cfg: RunConfig,
    data: TensorData,
    device: torch.device,
    model: nn.Module,
    probe: ErrorModulation | _RecordStepProbe,
    trained: _Trained,
) -> dict[str, Any]:
    """The final values: losses, error moments per layer, validation (also after precise BN).

    Two training losses, kept apart: ``step_loss``, the mean of the last tenth of the steps' losses
    (train mode, the batches the optimizer saw), and ``train_loss``, the loss over the whole training
    set in eval mode with the final weights and BN statistics (the one :func:`best_by_loss` compares,
    and the one that sits beside ``val_loss`` in the generalization gap)."""
    stats, losses, diverged = probe.last_stats(), trained.losses, trained.diverged
    tail = max(1, len(losses) // 10)
    final = {
        "step_loss": torch.stack(losses[-tail:]).mean().item(),
        "diverged": diverged,
        "layer_names": stats.names,
        "layer_moments": stats.q_after.double().cpu().tolist(),
        "layer_scales": stats.scale.double().cpu().tolist(),
        **_evaluate(model, data, device, diverged),
        **_evaluate(model, data, device, diverged, split="train"),
        "warmup_steps": trained.warmup_steps,
    }
    if cfg.precise_bn:
        if not diverged:
            # The first batches of the last epoch's order: training data, drawn without new randomness.
            bn_batches = (data.x_train[i].to(device) for i in trained.order.split(cfg.batch_size))
            recompute_bn_statistics(model, bn_batches, cfg.precise_bn)
        for split in ("val", "train"):
            final.update(
                {f"{k}_precise": v for k, v in _evaluate(model, data, device, diverged, split).items()}
            )
    return final


def best_by_loss(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The record with the lowest final training loss, ``final["train_loss"]``: the whole training
    set's loss in eval mode at the end of the run (diverged runs count as +inf). No held-out image is
    read to choose."""

    def key(r: dict[str, Any]) -> float:
        value = r["final"]["train_loss"]
        return float("inf") if r["final"]["diverged"] or not math.isfinite(value) else value

    return min(records, key=key)
