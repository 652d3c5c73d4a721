"""Evaluation of a (possibly distributed) run: exact metrics over the whole split, and the model's BN
statistics recomputed with its current weights (precise BN) for the time of an evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..precise_bn import bn_layers, modes_restored, recompute_bn_statistics

__all__ = ["evaluate", "precise_bn_for_eval", "recalibrate_bn"]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, accelerator: Any, channels_last: bool = False
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (percent) over the whole split, gathered across processes.

    Every module's train/eval mode is as it was after the call.
    """
    from timm.utils import accuracy

    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top-1, top-5, samples
    with modes_restored(model):
        model.eval()
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
    loss_sum, top1, top5, n = totals.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def recalibrate_bn(model: nn.Module, run: Any) -> int:
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
def precise_bn_for_eval(model: nn.Module, run: Any) -> Iterator[None]:
    """Recomputed BN statistics inside the block (evaluation, saving the evaluated weights), the
    training ones restored after it: evaluating never changes the state that training continues
    from, so a run resumed from any checkpoint ends exactly where an uninterrupted one does."""
    buffers = [b for m in bn_layers(model) for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
    saved = [b.clone() for b in buffers]
    recalibrate_bn(model, run)
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)
