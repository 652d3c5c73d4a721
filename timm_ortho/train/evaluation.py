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

__all__ = ["TOPK", "evaluate", "precise_bn_for_eval", "recalibrate_bn", "trivial_topk"]

TOPK = (1, 5)
"""The top-k accuracies an evaluation measures, where they mean something (see :func:`trivial_topk`)."""


def trivial_topk(num_classes: int) -> list[int]:
    """The ``k`` of :data:`TOPK` that say nothing with ``num_classes`` classes: every label is among
    the top ``k`` when ``k >= num_classes``, so that accuracy is 100 % whatever the model."""
    return [k for k in TOPK if k >= num_classes]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, accelerator: Any, channels_last: bool = False
) -> dict[str, float]:
    """Loss and top-k accuracies (percent) over the whole split, gathered across processes.

    ``top1`` and ``top5`` (:data:`TOPK`), each only where it means something: with 5 classes or
    fewer, top-5 is 100 % whatever the model, and is left out. Every module's train/eval mode is as
    it was after the call.
    """
    from timm.utils import accuracy

    totals = torch.zeros(2 + len(TOPK), dtype=torch.float64, device=accelerator.device)  # loss, top-k, n
    classes = None
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
            classes = logits.shape[-1]
            hits = (torch.stack(accuracy(logits, targets, topk=TOPK)).double() * n / 100).round()
            loss = F.cross_entropy(logits, targets, reduction="sum").double()
            totals += torch.cat([loss[None], hits, hits.new_tensor([n])])
    loss_sum, *hits, n = totals.tolist()
    n = max(n, 1.0)
    trivial = trivial_topk(classes) if classes is not None else []
    topk = {f"top{k}": 100.0 * h / n for k, h in zip(TOPK, hits, strict=True) if k not in trivial}
    return {"loss": loss_sum / n, **topk}


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
