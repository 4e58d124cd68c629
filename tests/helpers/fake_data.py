"""Tiny fake data sets laid out exactly like the real CIFAR-10/100 and Imagenette folders (no download)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

TRAIN_PER_BATCH = 4  # CIFAR-10 has 5 training batches: 20 fake training images
TEST_IMAGES = 8
IMAGENETTE_WNIDS = sorted(torchvision.datasets.Imagenette._WNID_TO_CLASS)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    # CIFAR's layout: one row of 3072 uint8 per image, the red plane, then green, then blue
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """A root with fake ``cifar-10-batches-py``, ``cifar-100-python`` and ``imagenette2-160`` folders."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    c10 = root / "cifar-10-batches-py"
    c10.mkdir()
    for i in range(1, 6):
        labels = rng.integers(0, 10, TRAIN_PER_BATCH).tolist()
        _dump(c10 / f"data_batch_{i}", {"data": _images(rng, TRAIN_PER_BATCH), "labels": labels})
    _dump(c10 / "test_batch", {"data": _images(rng, TEST_IMAGES), "labels": list(range(TEST_IMAGES))})
    _dump(c10 / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    c100 = root / "cifar-100-python"
    c100.mkdir()
    for split, n in (("train", 5 * TRAIN_PER_BATCH), ("test", TEST_IMAGES)):
        fine = rng.integers(0, 100, n).tolist()
        _dump(
            c100 / split,
            {"data": _images(rng, n), "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]},
        )
    _dump(c100 / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)]})
    # Imagenette: <root>/imagenette2-160/{train,val}/<wnid>/*.JPEG; torchvision only checks that the
    # size folder exists, lists the class folders and reads files ending in .jpeg (any case).
    for split, per_class in (("train", 2), ("val", 1)):
        for wnid in IMAGENETTE_WNIDS:
            folder = root / "imagenette2-160" / split / wnid
            folder.mkdir(parents=True)
            for j in range(per_class):
                pixels = rng.integers(0, 256, size=(40 + 8 * j, 56, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{j}.JPEG")
    return root


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks the md5 sums of the real CIFAR files; the fake ones cannot match them.

    ``CIFAR10._check_integrity`` (inherited by CIFAR100) checks the batches and ``cifar.check_integrity``
    the meta file, so both are patched to accept the fake files.
    """
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
