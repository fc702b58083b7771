"""Readers for the official file formats and for users' own data.

Every reader returns numpy arrays: images uint8 (N, C, H, W), labels int64 (N,). Readers check
what they read (magic numbers, shapes, label ranges) and raise DatasetError naming the file.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
from pathlib import Path

import numpy as np

from lvat.errors import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ---- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic 00 00 08 NDIM, big-endian int32 dims, uint8s."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DatasetError(f"{path}: IDX header says {tuple(dims)} but the data size differs")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(tuple(dims))


def read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"{images}, {labels}: expected (N, H, W) images and N labels")
    return x[:, None].copy(), y.astype(np.int64)  # (N, 1, H, W)


# ---- CIFAR-10 python pickle batches ------------------------------------------------------------


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array rebuilder, under numpy 1 or 2


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a data file must not run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            return _RECONSTRUCT
        if module == "_codecs":
            return codecs.encode
        return getattr(np, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One `cifar-10-batches-py` batch: dict with data (N, 3072) uint8 row-major RGB, labels."""
    try:
        with open(path, "rb") as f:
            # latin1: the batches were pickled by Python 2; keys may come back as str or bytes
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (no dict inside)")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise DatasetError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_meta(path: Path) -> list[str]:
    with open(path, "rb") as f:
        meta = _ArrayUnpickler(f, encoding="latin1").load()
    meta = {k.decode() if isinstance(k, bytes) else k: v for k, v in meta.items()}
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]


# ---- SVHN cropped digits (.mat) ------------------------------------------------------------------


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN `*_32x32.mat`: X (32, 32, 3, N) uint8, y (N, 1) in 1..10 where 10 means digit 0."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as exc:  # scipy raises several types for bad files
        raise DatasetError(f"{path}: not a readable MATLAB file ({exc})") from None
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path}: SVHN file lacks X or y")
    x, y = mat["X"], mat["y"].reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DatasetError(f"{path}: expected X of shape (32, 32, 3, N), got {x.shape}")
    if y.min() < 1 or y.max() > 10:
        raise DatasetError(f"{path}: SVHN labels must lie in 1..10, got {y.min()}..{y.max()}")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), y % 10


# ---- users' own data -------------------------------------------------------------------------


def _to_nchw_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim != 4:
        raise DatasetError(f"{where}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating) or x.min() < 0 or x.max() > 1:
            raise DatasetError(f"{where}: images must be uint8 in 0..255 or floats in [0, 1]")
        x = np.rint(x * 255)
    return np.ascontiguousarray(x, dtype=np.uint8)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DatasetError(f"{where}: labels must be non-negative integers 0..K-1")
    return y.astype(np.int64)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """A user's .npz: `x`, `y` (one pool, split later), or `x_train`, `y_train`, `x_test`,
    `y_test`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from None
    for keys in (("x_train", "y_train", "x_test", "y_test"), ("x", "y")):
        if all(k in arrays for k in keys):
            out = {}
            for k in keys:
                where = f"{path}[{k}]"
                read = _to_nchw_uint8 if k[0] == "x" else _labels
                out[k] = read(arrays[k], where)
            return out
    raise DatasetError(
        f"{path}: expected arrays x, y (or x_train, y_train, x_test, y_test); "
        f"found {sorted(arrays)}"
    )


def read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images in `root/<class name>/*`; classes sorted by name. All images must share one size."""
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders found (expected {root}/<class>/<image>)")
    images, labels, mode, size = [], [], None, None
    for k, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            try:
                with Image.open(file) as im:
                    im.load()
                    if mode is None:
                        mode = "L" if im.mode in ("1", "L", "I;16", "I") else "RGB"
                    im = im.convert(mode)
            except OSError as exc:
                raise DatasetError(f"{file}: cannot read image ({exc})") from None
            if size is None:
                size = im.size
            elif im.size != size:
                raise DatasetError(f"{file}: size {im.size} differs from {size}; resize all first")
            images.append(np.asarray(im, dtype=np.uint8))
            labels.append(k)
    if not images:
        raise DatasetError(f"{root}: class folders {classes} contain no images")
    return _to_nchw_uint8(np.stack(images), str(root)), np.asarray(labels, np.int64), classes
