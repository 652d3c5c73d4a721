"""Shared test settings: deterministic, single-threaded-friendly, no network."""

from __future__ import annotations

import collections
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


# ----------------------------------------------------------------------------------------------
# data in the real on-disk formats, for the data, training and experiment tests
# ----------------------------------------------------------------------------------------------
def _write_cifar(root: Path, per_batch: int = 4, test: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny ``cifar-10-batches-py`` in the release's format: channel-major rows, str keys and names.

    The release's python-2 pickles load with str keys under ``encoding="latin1"`` (what torchvision
    uses), so str keys here read the same way. Returns the images (N, 32, 32, 3) and labels of the
    train and test splits.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    out: dict[str, list[np.ndarray]] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for name, n, split in [
        *[(f"data_batch_{i}", per_batch, "train") for i in range(1, 6)],
        ("test_batch", test, "test"),
    ]:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
        with (folder / name).open("wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": rows, "filenames": []}, f)
        out[f"{split}_x"].append(images)
        out[f"{split}_y"].append(np.asarray(labels))
    return {k: np.concatenate(v) for k, v in out.items()}


def _write_image_folder(
    root: Path, classes=("cat", "dog", "emu"), per_class: int = 3, size: int = 20
) -> Path:
    """``root/train/<class>/*.png|jpg`` and ``root/val/<class>/*``: a tiny ImageNet-layout tree."""
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for ci, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                pixels[..., ci % 3] = 255  # a class-coloured channel
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(pixels).save(d / f"{split}_{name}_{i}.{ext}")
    return root


@pytest.fixture
def write_cifar():
    """``write_cifar(root, per_batch=4, test=6, seed=0)``: a tiny CIFAR-10 release under ``root``."""
    return _write_cifar


@pytest.fixture
def write_image_folder():
    """``write_image_folder(root, classes=..., per_class=3, size=20)``: a tiny ImageFolder tree."""
    return _write_image_folder


# ----------------------------------------------------------------------------------------------
# training runs in-process, for the training and bad-input tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerate(monkeypatch):
    """A new accelerate state per test (it is a process-wide singleton) and one thread per run."""
    from accelerate.state import AcceleratorState, GradientState

    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _tiny(tmp_path: Path, **overrides):
    from timm_ortho.train.config import TrainConfig

    values = dict(
        model="plain_cnn20",
        img_size=8,
        synthetic_size=32,
        synthetic_val_size=8,
        batch_size=4,
        epochs=1,
        workers=0,
        log_interval=1,
        output=str(tmp_path),
        experiment="run",
        lr=0.05,
        smoothing=0.0,
        sched="cosine",
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def tiny():
    """``tiny(tmp_path, **overrides)``: the TrainConfig of a few updates of plain_cnn20 on 8x8 images."""
    return _tiny


@pytest.fixture
def signal_at(monkeypatch):
    """``signal_at(signum, forward)``: this process gets ``signum`` during that training forward pass."""
    from signal_hook import send_signal_at

    from timm_ortho.train import build

    def arm(signum: int, forward: int) -> None:
        monkeypatch.setattr(build, "build_model", send_signal_at(build.build_model, signum, forward))

    return arm


# ----------------------------------------------------------------------------------------------
# cost: the aten ops a piece of code dispatches (a kernel launch each, on a GPU)
# ----------------------------------------------------------------------------------------------
class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def dispatched() -> Callable[[Callable[[], object]], collections.Counter[str]]:
    """``dispatched(fn)``: runs ``fn()`` and returns how many times each aten op was dispatched."""

    def count(fn: Callable[[], object]) -> collections.Counter[str]:
        with _CountOps() as counter:
            fn()
        return counter.ops

    return count
