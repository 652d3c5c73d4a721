"""The image transforms of a run: timm's training pipeline, the CIFAR one, or none.

``augment="timm"`` is ``timm.data.create_transform`` (random resized crop, flip, colour jitter,
RandAugment via ``auto_augment``, random erasing); ``"cifar"`` is He et al.'s pad-and-crop plus
horizontal flip (with timm's RandAugment and random erasing when asked for); ``"none"`` only resizes,
crops and normalizes. Their randomness is seeded per sample by
:class:`~timm_ortho.train.sampling.SeededTransform`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from timm.data import create_transform

if TYPE_CHECKING:  # data.py re-exports build_transforms: no import of it at run time
    from .data import DataConfig

__all__ = ["build_transforms"]


def build_transforms(
    cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...], native_size: int | None = None
) -> tuple[Callable[[Image.Image], torch.Tensor], Callable[[Image.Image], torch.Tensor]]:
    """``(train_transform, eval_transform)`` for PIL images, both ending in a normalized tensor.

    ``native_size`` is the side of the stored images when known; the ``cifar`` and ``none``
    pipelines resize only when it differs from ``cfg.img_size``.
    """
    if cfg.augment not in ("timm", "cifar", "none"):
        raise ValueError(f"augment must be 'timm', 'cifar' or 'none', got {cfg.augment!r}")
    size = cfg.img_size
    if cfg.augment == "timm":
        common = dict(interpolation=cfg.interpolation, mean=mean, std=std)
        eval_tf = create_transform(size, is_training=False, crop_pct=cfg.crop_pct, **common)
        train_tf = create_transform(
            size,
            is_training=True,
            scale=cfg.scale,
            ratio=cfg.ratio,
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,
            auto_augment=cfg.aa,
            re_prob=cfg.reprob,
            re_mode=cfg.remode,
            re_count=cfg.recount,
            **common,
        )
        return train_tf, eval_tf

    from torchvision import transforms as T

    # These pipelines keep the whole image: resize only when the run asks for another size.
    resize = [] if native_size == size else [T.Resize(size)]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    eval_tf = T.Compose([*resize, T.CenterCrop(size), *tail])
    if cfg.augment == "none":
        return eval_tf, eval_tf
    ops: list[Any] = [*resize, T.RandomCrop(size, padding=max(1, size // 8))]
    if cfg.hflip > 0:
        ops.append(T.RandomHorizontalFlip(cfg.hflip))
    if cfg.aa:
        from timm.data.auto_augment import rand_augment_transform

        if not cfg.aa.startswith("rand"):
            raise ValueError(
                f"the cifar pipeline supports RandAugment policies ('rand-...') only, got {cfg.aa!r}"
            )
        ops.append(rand_augment_transform(cfg.aa, {"translate_const": int(size * 0.45)}))
    ops += tail
    if cfg.reprob > 0:
        from timm.data.random_erasing import RandomErasing

        ops.append(RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device="cpu"))
    return T.Compose(ops), eval_tf
