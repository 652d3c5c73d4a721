"""Data sets and loaders for the training scripts.

Three sources, one interface (a map-style data set of ``(PIL image, label)`` pairs and a transform
applied on top):

- an ImageNet-style ``ImageFolder`` tree (``<root>/train/<class>/*.jpg`` and ``<root>/val/...``),
  read and augmented through timm's data pipeline (``timm.data.create_transform``: random resized
  crop, flips, colour jitter, RandAugment via ``auto_augment``, random erasing);
- CIFAR-10 from a local ``cifar-10-batches-py`` directory (the python pickle release: ``data_batch_1``
  .. ``data_batch_5``, ``test_batch``, ``batches.meta``), read by ``torchvision.datasets.CIFAR10``;
  nothing is downloaded;
- an embedded synthetic set, :class:`~timm_ortho.train.synthetic.SyntheticImages`: procedurally
  generated, deterministic from a seed, learnable, at any image size and number of classes. It is
  what the scripts train on when no data directory is given, so that every command in the docs runs
  on a fresh machine.

The augmentation on top is :func:`~timm_ortho.train.transforms.build_transforms`'s.

Exact resume needs data that depend only on ``(seed, epoch, index)``, not on which worker process
loaded a sample or how many batches were skipped: :class:`EpochShuffleSampler` draws the order of an
epoch from ``(seed, epoch)`` and :class:`SeededTransform` runs each sample's random augmentation
under an RNG seeded from ``(seed, epoch, index)``.

A missing or malformed data directory raises :class:`DataError` naming the path and the layout
that was expected.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10

# One definition of the CIFAR-10 statistics: the models' pretrained_cfg and the data pipeline agree.
from ..constants import CIFAR10_MEAN, CIFAR10_STD
from .sampling import EpochShuffleSampler, SeededTransform
from .synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD, SyntheticImages
from .transforms import build_transforms

__all__ = [
    "CIFAR_LAYOUT",
    "Cifar10",
    "CorruptImageError",
    "DataConfig",
    "DataError",
    "Datasets",
    "EpochShuffleSampler",
    "SeededTransform",
    "SyntheticImages",
    "build_datasets",
    "build_loader",
    "build_transforms",
    "check_data",
    "detect_dataset",
    "skipped_images",
]

IMAGEFOLDER_LAYOUT = """\
  <data-dir>/train/<class name>/<image>.jpg|.jpeg|.png|...   (one folder per class)
  <data-dir>/val/<class name>/<image>.jpg|...                (the same class folders)"""

CIFAR_LAYOUT = """\
  <data-dir>/cifar-10-batches-py/   (or <data-dir> itself), the CIFAR-10 python version:
      data_batch_1 ... data_batch_5, test_batch, batches.meta
  (pickled dicts with 'data' uint8 [N, 3072] and 'labels'; from cifar-10-python.tar.gz)"""

# The release's file names, as torchvision knows them.
_CIFAR_DIRNAME = CIFAR10.base_folder  # cifar-10-batches-py
_CIFAR_TRAIN = tuple(name for name, _ in CIFAR10.train_list)  # data_batch_1 .. data_batch_5
_CIFAR_TEST = CIFAR10.test_list[0][0]  # test_batch
_CIFAR_META = CIFAR10.meta["filename"]  # batches.meta

DatasetKind = Literal["auto", "imagefolder", "cifar10", "synthetic"]
AugmentKind = Literal["timm", "cifar", "none"]


class DataError(ValueError):
    """A data directory that is missing or does not have the expected layout."""


class CorruptImageError(DataError):
    """Images that cannot be decoded, where the run cannot go on (``--strict-data``, or many in a row).

    Raised in a loader worker, it reaches the main process re-raised by torch with the worker's
    traceback in its message; only the original message is kept, so that the user reads one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith(f"Caught {type(self).__name__}"):  # the last line is "<class>: <message>"
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


_log = logging.getLogger(__name__)
_MAX_CONSECUTIVE_BAD = 10  # as timm's ImageDataset: more in a row means a broken tree, not a bad file


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Everything that decides which images a run sees and how they are augmented."""

    data_dir: str | None = None
    """Root of the data; ``None`` selects the embedded synthetic set."""
    dataset: DatasetKind = "auto"
    """``auto`` reads the layout of ``data_dir`` (a CIFAR pickle directory or an ImageFolder tree)."""
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 224
    num_classes: int | None = None
    """Checked against the data on disk; chooses the class count of the synthetic set (default 10)."""
    synthetic_size: int = 5000
    synthetic_val_size: int = 1000
    augment: AugmentKind = "timm"
    """``timm``: timm's training transform (random resized crop, flip, colour jitter, ...);
    ``cifar``: pad-and-crop plus horizontal flip (He et al.'s CIFAR augmentation); ``none``."""
    aa: str | None = None
    """timm auto-augment policy, e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment)."""
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    hflip: float = 0.5
    color_jitter: float = 0.4
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    mean: tuple[float, float, float] | None = None
    """Normalization; ``None`` picks the data set's own (ImageNet, CIFAR-10 or synthetic)."""
    std: tuple[float, float, float] | None = None
    seed: int = 42
    strict_data: bool = False
    """Stop at the first image that cannot be decoded; otherwise it is skipped, counted and reported."""


@dataclass
class Datasets:
    """The two splits, untransformed (samples are ``(PIL image, label)``), and what they are."""

    train: Dataset
    val: Dataset
    kind: Literal["imagefolder", "cifar10", "synthetic"]
    num_classes: int
    class_names: list[str]
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int | None
    """Side of every stored image when they all share one (CIFAR, synthetic), else ``None``."""

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"


# ----------------------------------------------------------------------------------------------
# CIFAR-10 from the python pickle release, read by torchvision
# ----------------------------------------------------------------------------------------------
def cifar_folder(root: str | Path) -> Path:
    """The folder of the batch files (``root`` or ``root/cifar-10-batches-py``), checked for every file.

    Reads nothing: a :class:`DataError` names the missing files (all of them where ``root`` does not
    exist) and the expected layout.
    """
    root = Path(root).expanduser()
    folder = root / _CIFAR_DIRNAME if (root / _CIFAR_DIRNAME).is_dir() else root
    missing = [n for n in (*_CIFAR_TRAIN, _CIFAR_TEST, _CIFAR_META) if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"{folder} is not a CIFAR-10 pickle directory: missing {', '.join(missing)}. "
            f"Expected layout:\n{CIFAR_LAYOUT}"
        )
    return folder


class Cifar10(CIFAR10):
    """``torchvision.datasets.CIFAR10`` on a local copy; samples are ``(PIL image, label)``.

    ``root`` is the folder of the batch files or its parent (torchvision accepts the parent only,
    and only under the release's folder name). Nothing is downloaded. A missing or unreadable copy
    raises :class:`DataError` naming the path and the expected layout, not torchvision's
    "Dataset not found or corrupted".
    """

    # Presence, not the release's MD5 sums, as this reader has always checked: a copy re-packed in
    # the release's format is accepted, and no 180 MB are hashed at every start.
    train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in CIFAR10.train_list]
    test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in CIFAR10.test_list]
    meta: ClassVar[dict[str, str | None]] = {**CIFAR10.meta, "md5": None}

    def __init__(self, root: str | Path, train: bool = True):
        folder = cifar_folder(root)
        self.base_folder = folder.name  # the batch files may sit in a folder of any name
        files = ", ".join(
            str(folder / n) for n in (*(_CIFAR_TRAIN if train else (_CIFAR_TEST,)), _CIFAR_META)
        )
        try:
            super().__init__(folder.parent, train=train, download=False)
        except KeyError as e:  # torchvision looks for CIFAR-100's 'fine_labels' when 'labels' is absent
            key = "labels" if e.args[0] == "fine_labels" else e.args[0]
            raise DataError(f"{files}: no {key!r} entry. Expected layout:\n{CIFAR_LAYOUT}") from e
        except ValueError as e:  # numpy cannot reshape the rows into images
            raise DataError(
                f"{files}: the data are not [N, 3072] uint8 rows ({e}). Expected layout:\n{CIFAR_LAYOUT}"
            ) from e
        except Exception as e:  # a truncated or foreign file
            raise DataError(f"cannot read {files} ({e}). Expected layout:\n{CIFAR_LAYOUT}") from e
        if len(self.data) != len(self.targets):
            raise DataError(
                f"{files}: {len(self.data)} images but {len(self.targets)} labels, expected [N, 3072] "
                f"uint8 rows and N labels. Expected layout:\n{CIFAR_LAYOUT}"
            )
        if self.targets and not 0 <= min(self.targets) <= max(self.targets) < len(self.classes):
            raise DataError(f"{folder}: labels outside 0..{len(self.classes) - 1} of batches.meta")
        self.folder = folder


# ----------------------------------------------------------------------------------------------
# ImageFolder through timm
# ----------------------------------------------------------------------------------------------
class CheckedImages(ImageDataset):
    """An ImageFolder split (timm's ``ImageDataset``) that counts the images it cannot decode.

    timm's own ``__getitem__`` silently serves the next image instead. Here it is still replaced
    (the batch keeps its shape), but marked in flags shared with the loader's worker processes, which
    :func:`skipped_images` reads; with ``strict=True`` the first one raises :class:`CorruptImageError`.
    ``folder`` is one split of a tree that :func:`check_data` has passed.
    """

    def __init__(self, folder: Path, strict: bool = False) -> None:
        try:
            super().__init__(str(folder))
        except Exception as e:  # timm raises a bare RuntimeError when a tree holds no image
            raise DataError(
                f"cannot read images under {folder} ({e}). Expected layout:\n{IMAGEFOLDER_LAYOUT}"
            ) from e
        self.strict = strict
        self.classes = sorted(self.reader.class_to_idx, key=self.reader.class_to_idx.get)
        # One byte per image, in shared memory: worker processes inherit it and mark what they skip.
        self._bad = multiprocessing.get_context().RawArray("b", len(self))

    def path(self, index: int) -> str:
        return str(self.filename(index, absolute=True))

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        for attempt in range(_MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % len(self)
            try:
                file, target = self.reader[i]
                with file:
                    return Image.open(file).convert("RGB"), target  # convert() decodes every pixel
            except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for broken files
                # PIL's "cannot identify" message repeats the path inside a file object's repr.
                why = "no image format recognized" if isinstance(e, UnidentifiedImageError) else e
                if self.strict:
                    raise CorruptImageError(
                        f"cannot decode image {self.path(i)} ({why}); --strict-data stops here"
                    ) from e
                if not self._bad[i]:
                    _log.warning("skipping undecodable image %s (%s)", self.path(i), why)
                self._bad[i] = 1
        raise CorruptImageError(
            f"{_MAX_CONSECUTIVE_BAD} consecutive images from {self.path(index)} on cannot be decoded: "
            "is the data tree intact?"
        )


def skipped_images(dataset: Any, accelerator: Any = None) -> list[str]:
    """Paths of the images skipped as undecodable so far; empty for sources that cannot have any.

    ``dataset`` may be wrapped in :class:`SeededTransform`. With an ``accelerator`` of several
    processes the flags of all processes are combined (a collective: every process must call it).
    """
    while isinstance(dataset, SeededTransform):
        dataset = dataset.dataset
    if not isinstance(dataset, CheckedImages):
        return []
    flags = torch.from_numpy(np.frombuffer(dataset._bad, dtype=np.int8).astype(np.int32))
    if accelerator is not None and accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), "sum").cpu()
    return [dataset.path(i) for i in torch.nonzero(flags).flatten().tolist()]


# ----------------------------------------------------------------------------------------------
# choosing a source
# ----------------------------------------------------------------------------------------------
def detect_dataset(data_dir: str | Path | None) -> Literal["imagefolder", "cifar10", "synthetic"]:
    """The kind of data under ``data_dir``: ``synthetic`` when none is given."""
    if data_dir is None or str(data_dir) == "":
        return "synthetic"
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        problem = "is a file, not a directory" if root.exists() else "does not exist"
        raise DataError(
            f"data directory {root} {problem}. Expected either an ImageFolder tree:\n"
            f"{IMAGEFOLDER_LAYOUT}\nor a CIFAR-10 directory:\n{CIFAR_LAYOUT}"
        )
    if root.name == _CIFAR_DIRNAME or (root / _CIFAR_DIRNAME).is_dir() or (root / _CIFAR_META).is_file():
        return "cifar10"
    return "imagefolder"


def check_data(cfg: DataConfig) -> Literal["imagefolder", "cifar10", "synthetic"]:
    """The kind of data ``cfg`` names, its layout checked without reading an image or a pickle.

    The data folder exists; a CIFAR-10 folder holds every batch file; an ImageFolder tree has both
    splits, each with class folders. Cheap enough to run before a run folder is created.
    """
    kind = detect_dataset(cfg.data_dir) if cfg.dataset == "auto" else cfg.dataset
    if kind == "synthetic":
        return kind
    if kind not in ("imagefolder", "cifar10"):
        raise ValueError(f"unknown dataset {kind!r}; choose auto, imagefolder, cifar10 or synthetic")
    if cfg.data_dir is None:
        raise DataError(f"dataset {kind!r} needs --data-dir")
    root = Path(cfg.data_dir).expanduser()
    detect_dataset(root)  # raises unless it is an existing folder
    if kind == "cifar10":
        cifar_folder(root)
    for folder in (root / cfg.train_split, root / cfg.val_split) if kind == "imagefolder" else ():
        if not folder.is_dir():
            raise DataError(
                f"ImageFolder split {folder} does not exist (data dir {root}). "
                f"Expected layout:\n{IMAGEFOLDER_LAYOUT}"
            )
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{folder} has no class folders. Expected layout:\n{IMAGEFOLDER_LAYOUT}")
        if len(classes) == 1:
            raise DataError(_one_class(folder, classes))
    return kind


def _one_class(where: Path | str, classes: list[str]) -> str:
    # Every prediction of a one-class model is right: a run on it reports 100 % and means nothing.
    return (
        f"{where} holds only one class ({', '.join(classes)}): a classifier needs at least two (one class "
        "folder per class, each with images)"
    )


def build_datasets(cfg: DataConfig) -> Datasets:
    """Open (or generate) the train and validation splits described by ``cfg``."""
    kind = check_data(cfg)
    root = Path(cfg.data_dir or ".").expanduser()
    if kind == "synthetic":
        n, size = cfg.num_classes or 10, cfg.img_size
        train = SyntheticImages(cfg.synthetic_size, n, size, cfg.seed, split=0)
        val = SyntheticImages(cfg.synthetic_val_size, n, size, cfg.seed, split=1)
        source = f"EMBEDDED SYNTHETIC data set of gratings and blobs ({size}x{size} px, seed {cfg.seed})"
        mean, std, native = SYNTHETIC_MEAN, SYNTHETIC_STD, size
    elif kind == "cifar10":
        train, val = Cifar10(root, train=True), Cifar10(root, train=False)
        source = f"CIFAR-10 from {train.folder}"
        mean, std, native = CIFAR10_MEAN, CIFAR10_STD, 32
    else:
        train = CheckedImages(root / cfg.train_split, cfg.strict_data)
        val = CheckedImages(root / cfg.val_split, cfg.strict_data)
        if val.classes != train.classes:
            raise DataError(
                f"{root / cfg.train_split} and {root / cfg.val_split} have different class folders "
                f"({len(train.classes)} vs {len(val.classes)}). Expected layout:\n{IMAGEFOLDER_LAYOUT}"
            )
        source = f"ImageFolder {root}"
        mean, std, native = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, None
    classes = list(train.classes)
    if len(classes) < 2:  # class folders without images are no classes
        raise DataError(_one_class(root / cfg.train_split if kind == "imagefolder" else source, classes))
    if cfg.num_classes not in (None, len(classes)):
        raise DataError(f"--num-classes {cfg.num_classes} but {cfg.data_dir} holds {len(classes)} classes")
    return Datasets(
        train=train,
        val=val,
        kind=kind,
        num_classes=len(classes),
        class_names=classes,
        description=f"{source}: {len(classes)} classes, {len(train)} train / {len(val)} val images",
        mean=tuple(cfg.mean or mean),
        std=tuple(cfg.std or std),
        native_size=native,
    )


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A plain ``DataLoader`` for ``accelerator.prepare``: shuffled per epoch and full batches in training.

    The loader gets its own generator so that creating an iterator draws nothing from the global
    RNG (whose state a checkpoint saves and a resume restores). Its worker processes, if any, are
    kept between epochs (``persistent_workers``, as timm's loaders do): no start-up cost per epoch,
    and a :class:`SeededTransform` shares its epoch with them.
    """
    if train and len(dataset) < batch_size:
        raise DataError(f"the training split has {len(dataset)} images, fewer than one batch of {batch_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed=seed, shuffle=train),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
    )
