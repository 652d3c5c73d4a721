"""The embedded synthetic data set: what the training scripts train on when no data directory is given.

:class:`SyntheticImages` is procedurally generated, deterministic from a seed, learnable (each class
has its own oriented grating, colours and blob), at any image size and number of classes, so that
every command in the docs runs on a fresh machine, and the measurement runs
(:mod:`timm_ortho.train.experiments`) have a set that needs no download.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["SYNTHETIC_MEAN", "SYNTHETIC_STD", "SyntheticImages"]

# The synthetic images are built around mid-grey with colours spread over [0, 1].
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.25, 0.25, 0.25)


class SyntheticImages(Dataset):
    """Procedural images with class-dependent structure, deterministic from ``(seed, split, index)``.

    Every class owns a prototype drawn once from ``seed``: a sinusoidal grating (orientation and
    spatial frequency) between two colours, and a soft blob (position, radius and colour). A sample
    renders its class prototype with per-sample jitter of every parameter, a random grating phase,
    contrast and brightness changes and pixel noise. Colour, orientation and layout all carry the
    label, so a small CNN learns the set in a few epochs, yet no single pixel does.

    Args:
        num_samples: length of the split.
        num_classes: classes; labels are ``index % num_classes`` (balanced).
        img_size: square image side in pixels; the prototypes are defined in relative coordinates,
            so the same seed gives the same classes at every size.
        seed: chooses the class prototypes and, with ``split``, every sample.
        split: samples of different splits never coincide (``0`` train, ``1`` validation).
    """

    def __init__(self, num_samples: int, num_classes: int, img_size: int, seed: int = 0, split: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if img_size < 4:
            raise ValueError(f"img_size must be at least 4 pixels, got {img_size}")
        self.num_samples, self.num_classes, self.img_size = num_samples, num_classes, img_size
        self.seed, self.split = seed, split
        proto = np.random.default_rng([seed, 0x5EED, num_classes])
        self._theta = proto.uniform(0.0, np.pi, num_classes)
        self._freq = proto.uniform(1.5, 5.0, num_classes)  # cycles per image side
        self._colour_a = proto.uniform(0.0, 1.0, (num_classes, 3))
        self._colour_b = proto.uniform(0.0, 1.0, (num_classes, 3))
        self._blob_xy = proto.uniform(0.25, 0.75, (num_classes, 2))
        self._blob_r = proto.uniform(0.10, 0.22, num_classes)
        self._blob_colour = proto.uniform(0.0, 1.0, (num_classes, 3))
        coords = (np.arange(img_size, dtype=np.float32) + 0.5) / img_size
        self._yy, self._xx = np.meshgrid(coords, coords, indexing="ij")
        self.classes = [f"synthetic_{c:04d}" for c in range(num_classes)]
        self.targets = [i % num_classes for i in range(num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def render(self, index: int) -> np.ndarray:
        """Sample ``index`` as a ``(img_size, img_size, 3)`` uint8 array."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        c = index % self.num_classes
        rng = np.random.default_rng([self.seed, self.split, index])
        theta = self._theta[c] + rng.normal(0.0, 0.12)
        freq = self._freq[c] * np.exp(rng.normal(0.0, 0.12))
        phase = rng.uniform(0.0, 2.0 * np.pi)
        u = self._xx * np.cos(theta) + self._yy * np.sin(theta)
        g = (0.5 + 0.5 * np.sin(2.0 * np.pi * freq * u + phase))[..., None]
        colour_a = np.clip(self._colour_a[c] + rng.normal(0.0, 0.2, 3), 0.0, 1.0)
        colour_b = np.clip(self._colour_b[c] + rng.normal(0.0, 0.2, 3), 0.0, 1.0)
        img = colour_b * (1.0 - g) + colour_a * g
        cx, cy = self._blob_xy[c] + rng.normal(0.0, 0.06, 2)
        radius = self._blob_r[c] * np.exp(rng.normal(0.0, 0.15))
        blob = np.exp(-((self._xx - cx) ** 2 + (self._yy - cy) ** 2) / (2.0 * radius**2))[..., None]
        img = img * (1.0 - blob) + self._blob_colour[c] * blob
        img = (img - 0.5) * rng.uniform(0.6, 1.0) + 0.5 + rng.normal(0.0, 0.05)
        img = img + rng.normal(0.0, 0.10, img.shape)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.render(index)), self.targets[index]
