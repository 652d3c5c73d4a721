"""Image data sets held in memory as tensors, for the measurement runs of
:mod:`timm_ortho.train.experiments`: the embedded synthetic set, scikit-learn's handwritten digits,
or CIFAR-10 from disk, normalized, optionally with a fraction of the training labels replaced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DatasetName", "TensorData", "load_tensor_data"]

DatasetName = Literal["synthetic", "digits", "cifar10"]


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
    from .data import Cifar10
    from .synthetic import SyntheticImages

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
