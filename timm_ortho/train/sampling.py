"""Batches that depend only on ``(seed, epoch, index)``: the data order and every sample's augmentation.

:class:`EpochShuffleSampler` draws the order of an epoch from ``(seed, epoch)`` alone and
:class:`SeededTransform` seeds each sample's augmentation from ``(seed, epoch, index)``, so the
batches do not depend on the number of loader workers or processes, and a run resumed mid-epoch sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochShuffleSampler", "SeededTransform"]


@contextlib.contextmanager
def _seeded_rngs(seed: int, *key: int) -> Iterator[None]:
    """Run a block under RNGs seeded from ``(seed, *key)``; the caller's RNG states are restored.

    Augmentations draw from three generators: torch's CPU generator (torchvision), python's
    ``random`` and numpy's global generator (timm's auto-augment and random erasing).
    """
    words = np.random.SeedSequence([seed & 0xFFFFFFFF, *key]).generate_state(2)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(words[0]) << 32 | int(words[1]))
        random.seed(int(words[0]))
        np.random.seed(int(words[1]))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededTransform(Dataset):
    """Applies ``transform`` to ``dataset``'s images with an RNG keyed by ``(seed, epoch, index)``.

    The augmentation a sample receives therefore does not depend on the worker that loads it, on
    the number of workers, or on how many batches a resumed run skipped. Call :meth:`set_epoch` before
    each epoch, before the loader's iterator is created: the epoch is held in shared memory, so that
    the worker processes of a loader with ``persistent_workers`` (started once, kept across epochs)
    see the new value too.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any] | None, seed: int = 0):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        # Shared with the workers, which inherit it (a plain attribute would stay, in a persistent
        # worker, at the epoch the worker was started in).
        self._epoch = multiprocessing.get_context().RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.dataset[index]
        if self.transform is None:
            return image, target
        with _seeded_rngs(self.seed, self._epoch.value, int(index)):
            return self.transform(image), target


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``, the same on every process.

    Accelerate shards the batches of this sampler across processes; because every process draws
    the same permutation, the shards are disjoint. ``shuffle=False`` gives ``0..n-1``.
    """

    # Why not Accelerate's seedable sampler (DataLoaderConfiguration(use_seedable_sampler=True,
    # data_seed=...))? It keys the order by one data_seed per Accelerator, while a run draws two
    # independent orders (training, and the precise-BN recalibration with seed + 1); it seeds
    # epoch e with data_seed + e, so seed s at epoch 1 repeats seed s + 1 at epoch 0 and the runs
    # of a seed sweep share their orders, shifted by an epoch; and it exists only once the loader has
    # gone through accelerator.prepare, so a loader from build_loader (tests, single-process use)
    # would not be keyed by (seed, epoch) at all. This sampler keeps all three properties.

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        key = int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch]).generate_state(1)[0])
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(key)).tolist())
