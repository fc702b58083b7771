"""`ImageDataset`: a whole dataset as uint8 tensors, and `load_dataset` to get one by name."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lvat.data import formats
from lvat.data.catalog import DATASETS, locate
from lvat.errors import DatasetError

USER_TEST_FRACTION = 0.2  # share of a user's single-pool dataset (x, y) kept as its test set


@dataclass(eq=False)
class ImageDataset:
    """Train and test images (N, C, H, W) uint8 and labels (N,) int64, on the CPU."""

    name: str
    classes: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    flip: bool = False  # default for random horizontal flips when augmenting
    source: str = ""  # the folder or file it was read from
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
                raise DatasetError(f"{self.name}: {split} must be uint8 (N, C, H, W) with N labels")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                k = len(self.classes)
                raise DatasetError(f"{self.name}: {split} labels outside 0..{k - 1}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DatasetError(f"{self.name}: train and test images differ in shape")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the training images and labels: a saved split is only valid for these."""
        h = hashlib.blake2b(digest_size=16)
        h.update(str(tuple(self.x_train.shape)).encode())
        h.update(self.x_train.contiguous().numpy().tobytes())
        h.update(self.y_train.numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def class_counts(self, split: str) -> list[int]:
        y = getattr(self, f"y_{split}")
        return torch.bincount(y, minlength=self.num_classes).tolist()

    def padded(self, size: int) -> ImageDataset:
        """Zero-pad images (centred) to size x size; e.g. 28 -> 32 for VAE and Glow levels."""
        _, h, w = self.image_shape
        if size == 0 or (h, w) == (size, size):
            return self
        if size < h or size < w:
            raise DatasetError(f"data.pad_to={size} is smaller than the images ({h}x{w})")
        top, left = (size - h) // 2, (size - w) // 2
        pad = (left, size - w - left, top, size - h - top)
        return ImageDataset(
            self.name, self.classes, F.pad(self.x_train, pad), self.y_train,
            F.pad(self.x_test, pad), self.y_test, self.flip, self.source,
        )  # fmt: skip


def _stratified_holdout(y: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of a fixed (seed 0), class-stratified test share of a single pool."""
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(len(idx) * fraction))]] = True
    return test


def _from_arrays(name: str, arrays, classes, source: str, flip: bool = False) -> ImageDataset:
    x_tr, y_tr, x_te, y_te = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return ImageDataset(name, list(classes), x_tr, y_tr, x_te, y_te, flip, source)


def _first_missing(present: np.ndarray, k: int, n: int = 3) -> list[int]:
    """The first `n` of 0..k-1 absent from the sorted unique labels `present`."""
    out, j = [], 0
    for i in range(k):
        if len(out) == min(n, k - len(present)):
            break
        if j < len(present) and present[j] == i:
            j += 1
        else:
            out.append(i)
    return out


def _check_classes(where: str, classes: list[str], labels: np.ndarray) -> None:
    """Every class must have at least one image (train and test together)."""
    present = np.unique(labels)
    if len(present) == len(classes):
        return
    k = len(classes)
    missing = _first_missing(present, k)
    if [str(i) for i in range(k)] == classes:  # classes numbered by the labels (.npz)
        raise DatasetError(
            f"{where}: labels run 0..{k - 1} but {k - len(present)} of those {k} classes have no "
            f"image (e.g. {', '.join(map(str, missing))}); labels must be 0..K-1 with every "
            f"class present, so renumber them (e.g. np.unique(y, return_inverse=True)[1])"
        )
    names = ", ".join(classes[i] for i in missing)
    raise DatasetError(
        f"{where}: class folder(s) {names} hold no image; every class needs images: add some "
        f"or remove the folder"
    )


def _check_sizes(where: str, arrays, pool: int | None) -> None:
    """Both splits must hold images; `pool` is the single pool's size if there was one."""
    if pool == 0 or not (len(arrays[0]) or len(arrays[2])):
        raise DatasetError(f"{where}: no images (the dataset is empty)")
    if pool is not None and not len(arrays[2]):
        raise DatasetError(
            f"{where}: {pool} images are too few for the {USER_TEST_FRACTION:.0%} test hold-out "
            f"(a class needs 3 or more images to give one); add images or give separate "
            f"train and test sets"
        )
    for split, x in (("training", arrays[0]), ("test", arrays[2])):
        if not len(x):
            raise DatasetError(f"{where}: no {split} images; both splits need images")


def load_user_dataset(path: str | Path) -> ImageDataset:
    """A user's .npz file or image folder (with train/ and test/ inside, or one pool of classes).

    A single pool is split once, class-stratified with a fixed seed, into 80% train / 20% test.
    An .npz's classes are its labels 0..K-1, where K - 1 is the largest label; every one of
    0..K-1 must label at least one image (train and test together), so a stray label (1000
    among 0..9) or 1-based labels are refused rather than making empty classes. Likewise every
    class folder must hold an image. Both splits must be non-empty.
    """
    path = Path(path).expanduser()
    if path.suffix == ".npz" and path.is_file():
        a = formats.read_npz(path)
        pool = None
        if "x" in a:
            pool = len(a["x"])
            test = _stratified_holdout(a["y"], USER_TEST_FRACTION)
            arrays = (a["x"][~test], a["y"][~test], a["x"][test], a["y"][test])
        else:
            arrays = (a["x_train"], a["y_train"], a["x_test"], a["y_test"])
        _check_sizes(str(path), arrays, pool)
        k = int(max(arrays[1].max(initial=0), arrays[3].max(initial=0))) + 1
        classes = [str(i) for i in range(k)]
        _check_classes(str(path), classes, np.concatenate([arrays[1], arrays[3]]))
        return _from_arrays(path.stem, arrays, classes, str(path))
    if path.is_dir():
        pool = None
        if (path / "train").is_dir() and (path / "test").is_dir():
            x_tr, y_tr, classes = formats.read_image_folder(path / "train")
            x_te, y_te, test_classes = formats.read_image_folder(path / "test")
            if test_classes != classes:
                raise DatasetError(f"{path}: train/ and test/ have different class folders")
            if x_tr.shape[1:] != x_te.shape[1:]:
                raise DatasetError(
                    f"{path}: train/ images are {x_tr.shape[1:]} (C, H, W) but test/ images are "
                    f"{x_te.shape[1:]}; resize all to one size"
                )
            arrays = (x_tr, y_tr, x_te, y_te)
        else:
            x, y, classes = formats.read_image_folder(path)
            pool = len(x)
            test = _stratified_holdout(y, USER_TEST_FRACTION)
            arrays = (x[~test], y[~test], x[test], y[test])
        _check_sizes(str(path), arrays, pool)
        _check_classes(str(path), classes, np.concatenate([arrays[1], arrays[3]]))
        return _from_arrays(path.name, arrays, classes, str(path))
    raise DatasetError(
        f"unknown dataset '{path}': use one of {', '.join(DATASETS)}, an existing .npz file or "
        f"an image folder"
    )


def load_dataset(
    name: str,
    root: str | Path = "",
    *,
    download: bool = True,
    verify: bool = True,
    pad_to: int = 0,
) -> ImageDataset:
    """Load an official dataset by name (searching, verifying, downloading) or a user's own.

    Args:
        name: svhn, cifar10, fashion-mnist, mnist; or a path to an .npz file / image folder.
        root: folder holding the files; empty searches system dataset folders, then the cache.
        download: fetch missing official files into the cache (or `root`).
        verify: check official files against their published MD5s.
        pad_to: zero-pad images to pad_to x pad_to (0: native size).
    """
    spec = DATASETS.get(name.lower())
    if spec is None:
        dataset = load_user_dataset(name)
    else:
        folder = locate(spec, root, fetch=download, verify=verify)
        arrays = spec.read(folder)
        dataset = _from_arrays(spec.name, arrays, spec.classes, str(folder), spec.flip)
    return dataset.padded(pad_to)
