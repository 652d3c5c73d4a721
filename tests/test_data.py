"""Data sets of the training scripts: synthetic, CIFAR-10 pickles, ImageFolder, seeding, errors."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from timm_ortho.train.data import (
    CIFAR_LAYOUT,
    Cifar10,
    CorruptImageError,
    DataConfig,
    DataError,
    EpochShuffleSampler,
    SeededTransform,
    SyntheticImages,
    build_datasets,
    build_loader,
    build_transforms,
    detect_dataset,
    skipped_images,
)


# ----------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_splits_differ():
    a = SyntheticImages(20, 5, 16, seed=7, split=0)
    b = SyntheticImages(20, 5, 16, seed=7, split=0)
    for i in (0, 3, 19):
        assert np.array_equal(a.render(i), b.render(i))
    # Reading out of order changes nothing: every sample is a function of (seed, split, index).
    assert np.array_equal(a.render(3), SyntheticImages(20, 5, 16, seed=7).render(3))
    assert not np.array_equal(a.render(3), SyntheticImages(20, 5, 16, seed=8).render(3))
    assert not np.array_equal(a.render(3), SyntheticImages(20, 5, 16, seed=7, split=1).render(3))
    image, label = a[6]
    assert isinstance(image, Image.Image) and image.size == (16, 16) and image.mode == "RGB"
    assert label == 6 % 5


@pytest.mark.parametrize(("size", "classes"), [(8, 2), (17, 3), (64, 1000)])
def test_synthetic_any_size_and_class_count(size, classes):
    ds = SyntheticImages(2 * classes, classes, size, seed=0)
    x = ds.render(len(ds) - 1)
    assert x.shape == (size, size, 3) and x.dtype == np.uint8
    assert np.bincount(ds.targets, minlength=classes).tolist() == [2] * classes
    assert x.std() > 5  # not a flat image


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticImages(10, 1, 16)
    with pytest.raises(ValueError, match="img_size"):
        SyntheticImages(10, 3, 2)
    with pytest.raises(IndexError):
        SyntheticImages(10, 3, 8).render(10)


def test_synthetic_is_learnable_by_an_independent_linear_classifier():
    """Class structure, not noise: ridge regression on raw pixels beats chance (10%) by far."""
    n, size, classes = 400, 16, 10
    train = SyntheticImages(n, classes, size, seed=3, split=0)
    val = SyntheticImages(200, classes, size, seed=3, split=1)
    x = np.stack([train.render(i) for i in range(n)]).reshape(n, -1) / 255.0
    xv = np.stack([val.render(i) for i in range(len(val))]).reshape(len(val), -1) / 255.0
    x, xv = np.c_[x, np.ones(len(x))], np.c_[xv, np.ones(len(xv))]
    w = np.linalg.solve(x.T @ x + 0.1 * np.eye(x.shape[1]), x.T @ np.eye(classes)[train.targets])
    accuracy = (np.argmax(xv @ w, 1) == np.asarray(val.targets)).mean()
    assert accuracy > 0.5


# ----------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# ----------------------------------------------------------------------------------------------
def test_cifar_reads_the_release_format(tmp_path, write_cifar):
    truth = write_cifar(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the folder itself
        train, test = Cifar10(root, train=True), Cifar10(root, train=False)
        assert len(train) == 20 and len(test) == 6
        assert train.classes[0] == "airplane" and len(train.classes) == 10
        for i in (0, 7, 19):
            image, label = train[i]
            assert np.array_equal(np.asarray(image), truth["train_x"][i])
            assert label == truth["train_y"][i]
        assert np.array_equal(np.asarray(test[5][0]), truth["test_x"][5])
    assert detect_dataset(tmp_path) == "cifar10"
    ds = build_datasets(DataConfig(data_dir=str(tmp_path), img_size=32))
    assert ds.kind == "cifar10" and ds.num_classes == 10 and ds.native_size == 32
    # The batch files in a folder of another name (torchvision alone wants cifar-10-batches-py).
    renamed = (tmp_path / "cifar-10-batches-py").rename(tmp_path / "my_cifar")
    assert np.array_equal(np.asarray(Cifar10(renamed, train=False)[5][0]), truth["test_x"][5])
    assert detect_dataset(renamed) == "cifar10"


def test_cifar_errors_name_the_path_and_layout(tmp_path, write_cifar):
    with pytest.raises(DataError) as e:
        Cifar10(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "data_batch_1" in str(e.value)

    write_cifar(tmp_path)
    with pytest.raises(DataError, match="10 classes"):
        build_datasets(DataConfig(data_dir=str(tmp_path), dataset="cifar10", num_classes=100))
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        Cifar10(tmp_path)

    with (folder / "test_batch").open("wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"\[N, 3072\]"):
        Cifar10(tmp_path, train=False)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1, 2]}, f)
    with pytest.raises(DataError, match="2 images but 3 labels"):
        Cifar10(tmp_path, train=False)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "targets": [0, 1]}, f)
    with pytest.raises(DataError) as e:
        Cifar10(tmp_path, train=False)
    assert "no 'labels' entry" in str(e.value) and str(folder / "test_batch") in str(e.value)

    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError) as e:
        Cifar10(tmp_path, train=False)
    assert str(folder / "test_batch") in str(e.value) and CIFAR_LAYOUT.splitlines()[0].strip() in str(e.value)


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------
def test_image_folder_through_timm(tmp_path, write_image_folder):
    write_image_folder(tmp_path)
    assert detect_dataset(tmp_path) == "imagefolder"
    cfg = DataConfig(data_dir=str(tmp_path), img_size=16, aa="rand-m9-mstd0.5", reprob=0.5)
    ds = build_datasets(cfg)
    assert ds.kind == "imagefolder" and ds.class_names == ["cat", "dog", "emu"]
    assert len(ds.train) == 9 and len(ds.val) == 9 and ds.native_size is None
    image, label = ds.train[4]
    assert isinstance(image, Image.Image) and label == 1
    train_tf, eval_tf = build_transforms(cfg, ds.mean, ds.std, ds.native_size)
    assert train_tf(image).shape == (3, 16, 16) and eval_tf(image).shape == (3, 16, 16)


def test_image_folder_errors_name_the_path_and_layout(tmp_path, write_image_folder):
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(data_dir=str(tmp_path / "missing")))
    assert str(tmp_path / "missing") in str(e.value) and "<data-dir>/train/<class name>" in str(e.value)

    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(data_dir=str(tmp_path)))
    assert "has no class folders" in str(e.value) and str(tmp_path / "train") in str(e.value)

    write_image_folder(tmp_path / "two")
    (tmp_path / "two" / "val" / "emu").rename(tmp_path / "two" / "val" / "yak")
    with pytest.raises(DataError, match="different class folders"):
        build_datasets(DataConfig(data_dir=str(tmp_path / "two")))

    write_image_folder(tmp_path / "three")
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(data_dir=str(tmp_path / "three"), val_split="validation"))
    assert str(tmp_path / "three" / "validation") in str(e.value)

    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="images"):
        build_datasets(DataConfig(data_dir=str(empty)))


def test_corrupt_images_are_counted_across_worker_processes(tmp_path, write_image_folder):
    """timm's ImageDataset would serve a neighbour silently; here each undecodable file is reported
    once by path, whichever worker process met it, and the batch keeps its shape."""
    write_image_folder(tmp_path, per_class=4)
    bad = [sorted((tmp_path / "train" / c).iterdir())[i] for c, i in (("cat", 0), ("emu", 3))]
    bad[0].write_bytes(b"garbage")
    bad[1].write_bytes(bad[1].read_bytes()[:40])  # a truncated JPEG/PNG
    cfg = DataConfig(data_dir=str(tmp_path), img_size=8, augment="none")
    ds = build_datasets(cfg)
    train_tf, _ = build_transforms(cfg, ds.mean, ds.std, ds.native_size)
    train_set = SeededTransform(ds.train, train_tf)
    assert skipped_images(train_set) == [] and skipped_images(SyntheticImages(4, 2, 8)) == []
    for _ in range(2):  # seen twice, counted once
        batches = [x.shape for x, _ in build_loader(train_set, 4, train=True, workers=2)]
        assert batches == [(4, 3, 8, 8)] * 3
    assert sorted(skipped_images(train_set)) == sorted(str(p) for p in bad)
    assert skipped_images(SeededTransform(ds.val, None)) == []

    strict = build_datasets(DataConfig(data_dir=str(tmp_path), strict_data=True))
    with pytest.raises(CorruptImageError) as e:
        for i in range(len(strict.train)):
            strict.train[i]
    assert str(bad[0]) in str(e.value) and "--strict-data" in str(e.value)
    # Re-raised by a loader worker, the message is still the one line, not the worker's traceback.
    wrapped = CorruptImageError(
        f"Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback:\n"
        f"  File x\ntimm_ortho.train.data.CorruptImageError: {e.value}"
    )
    assert str(wrapped) == str(e.value)


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "data").write_text("")
    with pytest.raises(DataError, match="is a file, not a directory"):
        detect_dataset(tmp_path / "data")


# ----------------------------------------------------------------------------------------------
# transforms, seeding and order
# ----------------------------------------------------------------------------------------------
def test_cifar_pipeline_normalizes_like_an_independent_computation():
    cfg = DataConfig(img_size=8, augment="none", mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _, eval_tf = build_transforms(cfg, cfg.mean, cfg.std, native_size=8)
    expected = (pixels.astype(np.float32) / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    got = eval_tf(Image.fromarray(pixels)).numpy().transpose(1, 2, 0)
    assert np.allclose(got, expected, atol=1e-6)


def test_seeded_transform_depends_only_on_seed_epoch_index():
    base = SyntheticImages(6, 3, 16, seed=0)
    cfg = DataConfig(img_size=12, aa="rand-m9-mstd0.5", reprob=0.5)
    train_tf, _ = build_transforms(cfg, (0.5,) * 3, (0.25,) * 3, native_size=16)
    a, b = SeededTransform(base, train_tf, seed=1), SeededTransform(base, train_tf, seed=1)
    first = [a[i][0] for i in range(6)]
    torch.manual_seed(123)
    random.seed(5)
    second = [b[i][0] for i in reversed(range(6))][::-1]  # other order, other global RNG state
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    b.set_epoch(1)
    assert not torch.equal(b[0][0], first[0])  # a new epoch draws new augmentations

    # The caller's RNG streams are left exactly where they were.
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    a[2]
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_epoch_shuffle_sampler():
    s = EpochShuffleSampler(50, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(50)) and e0 != list(range(50))
    assert list(EpochShuffleSampler(50, seed=3)) == e0
    s.set_epoch(1)
    assert list(s) != e0
    assert list(EpochShuffleSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_loader_leaves_the_global_rng_alone():
    ds = SeededTransform(
        SyntheticImages(16, 2, 8), build_transforms(DataConfig(img_size=8), (0.5,) * 3, (0.25,) * 3)[0]
    )
    loader = build_loader(ds, 4, train=True, seed=0)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    batches = list(loader)
    assert len(batches) == 4 and batches[0][0].shape == (4, 3, 8, 8)
    assert torch.equal(torch.rand(2), expected)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(ds, 32, train=True)


def test_worker_processes_load_the_same_batches():
    """Each sample's augmentation is keyed by (seed, epoch, index), not by the worker that loads it."""
    cfg = DataConfig(img_size=8, reprob=0.5)
    ds = SeededTransform(SyntheticImages(24, 3, 8), build_transforms(cfg, (0.5,) * 3, (0.25,) * 3)[0], seed=4)
    ds.set_epoch(2)
    serial = list(build_loader(ds, 4, train=True, seed=1, workers=0))
    parallel = list(build_loader(ds, 4, train=True, seed=1, workers=2))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, parallel, strict=True)
    )


def test_loader_workers_persist_across_epochs_and_see_each_epoch():
    """Worker processes are started once (persistent_workers, as timm's loaders) and still draw each
    epoch's augmentation: their batches are those of a loader without workers, epoch by epoch."""
    cfg = DataConfig(img_size=8, reprob=0.5)
    ds = SeededTransform(SyntheticImages(16, 3, 8), build_transforms(cfg, (0.5,) * 3, (0.25,) * 3)[0], seed=4)
    assert not build_loader(ds, 4, train=True, workers=0).persistent_workers  # torch needs workers for it
    loader = build_loader(ds, 4, train=True, seed=1, workers=1)
    assert loader.persistent_workers
    serial = build_loader(ds, 4, train=True, seed=1, workers=0)
    pids = []
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        for each in (loader, serial):
            each.sampler.set_epoch(epoch)
        batches = list(loader)
        pids.append([w.pid for w in loader._iterator._workers])
        expected = list(serial)
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(batches, expected, strict=True)
        )
    assert pids[0] == pids[1] == pids[2]  # the same worker process in every epoch


def test_synthetic_is_the_default():
    ds = build_datasets(DataConfig(img_size=8, synthetic_size=12, synthetic_val_size=4, num_classes=3))
    assert ds.synthetic and "SYNTHETIC" in ds.description and ds.num_classes == 3
    assert len(ds.train) == 12 and len(ds.val) == 4
    assert detect_dataset(None) == "synthetic"
