"""Evaluation of a (possibly distributed) run: exact metrics over the whole split, and the model's BN
statistics recomputed with its current weights (precise BN) for the time of an evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..precise_bn import bn_layers, modes_restored, recompute_bn_statistics

__all__ = ["TOPK", "PreciseBN", "evaluate", "trivial_topk"]

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


@dataclass
class PreciseBN:
    """Precise BN in a (possibly distributed) run: BN statistics recomputed over ``batches`` batches of
    its own ``loader`` (own order and generator, see :func:`~timm_ortho.train.build.precise_bn_loader`)."""

    loader: Any
    batches: int
    channels_last: bool = False

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def recalibrate(self, model: nn.Module, accelerator: Any) -> int:
        """Recompute ``model``'s statistics, then average them over the processes; returns the batches used.

        Each process averages over its own shard of ``batches`` batches; the per-process results
        are then averaged (every process saw as many batches, so that is the mean over all of them).
        """
        from timm.utils import distribute_bn

        def images_of(batch: Any) -> torch.Tensor:
            return batch[0].contiguous(memory_format=torch.channels_last) if self.channels_last else batch[0]

        with accelerator.autocast():
            used = recompute_bn_statistics(model, self.loader, self.batches, prepare=images_of)
        if accelerator.num_processes > 1:
            # timm's all-reduce (a sum divided by the process count, in place) of every buffer named
            # running_mean / running_var: the same arithmetic as accelerator.reduce(..., "mean"), on
            # the buffers bn_layers() holds (and on those of any other layer so named, which DDP
            # keeps equal on every process already). It calls torch.distributed itself: the
            # launchers the trainer supports (multi-GPU, gloo on CPUs) all initialize it.
            distribute_bn(model, accelerator.num_processes, reduce=True)
        return used

    @contextlib.contextmanager
    def for_eval(self, model: nn.Module, accelerator: Any) -> Iterator[None]:
        """Recomputed BN statistics inside the block (evaluation, saving the evaluated weights), the
        training ones restored after it: evaluating never changes the state that training continues
        from, so a run resumed from any checkpoint ends exactly where an uninterrupted one does."""
        layers = bn_layers(model)
        buffers = [b for m in layers for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
        saved = [b.clone() for b in buffers]
        self.recalibrate(model, accelerator)
        try:
            yield
        finally:
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
