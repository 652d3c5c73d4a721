"""Precise BatchNorm: recompute the running statistics with the final weights before evaluating.

During training a BatchNorm layer keeps an exponential moving average of the batch statistics it
saw, each computed under the weights *of its step*. In a deep plain chain every layer's input
distribution moves with all the layers below it, so the averages lag the weights that are finally
evaluated, and the error compounds over depth: a 110-layer net can evaluate near chance with
statistics that are off, while the same weights evaluate far better with recomputed ones (measured
in ``docs/results.md``). The fix (precise BN) runs the final model in training mode over ``N``
batches with the weights frozen and sets every layer's statistics to the *equal-weight* average of
the per-batch statistics:

    mu_l = (1/N) sum_b mean_b(x_l),     var_l = (1/N) sum_b var_b(x_l)     (unbiased per batch)

which is what PyTorch's BatchNorm accumulates with ``momentum=None`` after ``reset_running_stats()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["bn_layers", "modes_restored", "recompute_bn_statistics"]


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers of ``model`` that track running statistics (those precise BN recomputes)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def modes_restored(model: nn.Module) -> Iterator[None]:
    """After the block, every module of ``model`` has its own train/eval mode back.

    ``model.train(was_training)`` would copy the root's mode onto every module, and a part held in
    eval while the rest trains (a frozen BN, a dropout switched off) would come back in train.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        model.train(modes[0][1])  # what a model's own train() override does beyond the flags
        for m, training in modes:
            m.training = training


def _first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and "pixel_values" in batch:
        return batch["pixel_values"]
    raise TypeError(
        f"cannot find the input in a batch of type {type(batch).__name__}: pass batches that are a "
        "tensor, an (input, target) pair, or give prepare=lambda batch: input"
    )


@torch.no_grad()
def recompute_bn_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 200,
    prepare: Callable[[Any], torch.Tensor] | None = None,
) -> int:
    """Replace every BatchNorm's running statistics by their average over up to ``num_batches``.

    Args:
        model: the model; its weights are not changed and every module's train/eval mode is
            restored (a part held in eval, such as a frozen BN, stays in eval).
        batches: an iterable of batches (a data loader): tensors, ``(input, target)`` pairs, or
            anything ``prepare`` turns into the model's input.
        num_batches: how many batches to average over (fewer if ``batches`` ends first).
        prepare: maps a batch to the model's input (moving it to the device, for example).

    Returns the number of batches used. Raises ``ValueError`` when ``batches`` yields none (the
    statistics are then left as they were). Layers in training mode see the batches the way they do
    in training (dropout included, as precise BN prescribes); gradients are not tracked.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    layers = bn_layers(model)
    if not layers:
        return 0
    saved = [
        (m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    ]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
    used = 0
    try:
        with modes_restored(model):
            model.train()
            for batch in batches:
                if used >= num_batches:
                    break
                model(prepare(batch) if prepare is not None else _first_tensor(batch))
                used += 1
    finally:
        for m, momentum, *_ in saved:
            m.momentum = momentum
    if used == 0:
        for m, _, mean, var, count in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        raise ValueError("recompute_bn_statistics got no batch: the iterable was empty")
    return used
