"""Readers for the official file formats and for users' own data.

Every reader returns numpy arrays: images uint8 (N, C, H, W), labels int64 (N,). Readers check
what they read (magic numbers, shapes, label ranges) and raise DatasetError naming the file.
"""

from __future__ import annotations

import codecs
import gzip
import math
import pickle
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lvat.errors import DatasetError, one_line

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ---- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------------


def _corrupt(path: Path, what: str, exc: BaseException) -> DatasetError:
    return DatasetError(
        f"{path}: the file is corrupt ({what}: {one_line(exc)}); delete it and download it "
        f"again, or replace your own copy with an intact one"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic 00 00 08 NDIM, big-endian int32 dims, uint8s."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({one_line(exc)})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise _corrupt(path, "bad gzip data", exc) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DatasetError(f"{path}: IDX header is cut short ({ndim} dimensions announced)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - offset != math.prod(dims) or min(dims, default=0) < 0:
        raise DatasetError(f"{path}: IDX header says {dims} but the data size differs")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def read_idx_pair(
    images: Path, labels: Path, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, H, W) images and (N,) labels; labels must lie in 0..num_classes-1 if given."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"{images}, {labels}: expected (N, H, W) images and N labels")
    if num_classes is not None and len(y) and int(y.max()) >= num_classes:
        raise DatasetError(f"{labels}: labels must lie in 0..{num_classes - 1}, got {y.max()}")
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
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({one_line(exc)})") from None
    except Exception as exc:  # a damaged pickle raises many types; only arrays are built
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({one_line(exc)})") from None
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (no dict inside)")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise DatasetError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    try:
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry["labels"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DatasetError(f"{path}: CIFAR-10 batch holds no arrays ({one_line(exc)})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: CIFAR-10 labels must lie in 0..9")
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

MAX_IMAGE_SIDE = 1024  # pixels: lvat's datasets are small images; larger ones are refused unread


def _to_nchw_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """Images as uint8 (N, C, H, W): integers must lie in 0..255, floats be finite in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim != 4:
        raise DatasetError(f"{where}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if len(x) and 0 in x.shape[1:]:
        raise DatasetError(f"{where}: images of shape {x.shape[1:]} hold no pixels")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DatasetError(
                f"{where}: integer pixels must lie in 0..255, found {x.min()}..{x.max()}"
            )
        return np.ascontiguousarray(x, dtype=np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        bad = x.size - int(np.count_nonzero(np.isfinite(x)))
        if bad:
            raise DatasetError(
                f"{where}: {bad} pixel value(s) are not finite (NaN or inf); float pixels must "
                f"be finite and in [0, 1]"
            )
        if x.size and (x.min() < 0 or x.max() > 1):
            raise DatasetError(
                f"{where}: float pixels must lie in [0, 1], found {x.min():.4g}..{x.max():.4g} "
                f"(divide 0..255 values by 255, or store uint8)"
            )
        return np.ascontiguousarray(np.rint(x * 255), dtype=np.uint8)
    raise DatasetError(
        f"{where}: images must be integers in 0..255 or floats in [0, 1], not {x.dtype}"
    )


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        raise DatasetError(
            f"{where}: labels of shape {y.shape} look one-hot; give one class index 0..K-1 per "
            f"image (e.g. y.argmax(1))"
        )
    y = y.reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DatasetError(f"{where}: labels must be non-negative integers 0..K-1")
    return y.astype(np.int64)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """A user's .npz: `x`, `y` (one pool, split later), or `x_train`, `y_train`, `x_test`,
    `y_test`. Images: uint8 (or other integers) in 0..255, or finite floats in [0, 1]; as
    (N, H, W), (N, H, W, C) or (N, C, H, W). Labels: integers, one per image."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({one_line(exc)})") from None
    for keys in (("x_train", "y_train", "x_test", "y_test"), ("x", "y")):
        if all(k in arrays for k in keys):
            out = {}
            for k in keys:
                where = f"{path}[{k}]"
                read = _to_nchw_uint8 if k[0] == "x" else _labels
                out[k] = read(arrays[k], where)
            for xk in keys[::2]:
                yk = "y" + xk[1:]
                if len(out[xk]) != len(out[yk]):
                    raise DatasetError(
                        f"{path}: {xk} has {len(out[xk])} images but {yk} has {len(out[yk])} "
                        f"labels; give exactly one label per image"
                    )
            if "x_test" in out and out["x_train"].shape[1:] != out["x_test"].shape[1:]:
                raise DatasetError(
                    f"{path}: x_train images are {out['x_train'].shape[1:]} (C, H, W) but "
                    f"x_test images are {out['x_test'].shape[1:]}; they must match"
                )
            return out
    raise DatasetError(
        f"{path}: expected arrays x, y (or x_train, y_train, x_test, y_test); "
        f"found {sorted(arrays)}"
    )


def _too_large(file: Path, what: str) -> DatasetError:
    return DatasetError(
        f"{file}: the image {what}, larger than lvat's limit of {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} "
        f"pixels for small-image datasets; resize the images (e.g. to 32x32) first"
    )


def _read_image(file: Path) -> Image.Image:
    """Decode one image, refusing (by its header, before decoding) any side > MAX_IMAGE_SIDE."""
    from PIL import Image

    try:
        with Image.open(file) as im:
            if max(im.size) > MAX_IMAGE_SIDE:
                raise _too_large(file, f"is {im.size[0]}x{im.size[1]} pixels")
            im.load()
            mode = "L" if im.mode in ("1", "L", "I;16", "I") else "RGB"
            return im.convert(mode)
    except DatasetError:
        raise
    except Image.DecompressionBombError as exc:
        raise _too_large(file, f"declares too many pixels (Pillow: {one_line(exc)})") from None
    except Exception as exc:  # Pillow's decoders raise many types for damaged files
        raise DatasetError(f"{file}: cannot read image ({one_line(exc)})") from None


def read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images in `root/<class name>/*`; classes sorted by name. All images must share one size,
    and no side may exceed MAX_IMAGE_SIDE pixels (checked from each file's header)."""
    try:
        classes = sorted(
            p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        listing = {
            name: sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for name in classes
        }
    except OSError as exc:
        raise DatasetError(f"{root}: cannot list the folder ({one_line(exc)})") from None
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders found (expected {root}/<class>/<image>)")
    images, labels, mode, size = [], [], None, None
    for k, name in enumerate(classes):
        for file in listing[name]:
            im = _read_image(file)
            if mode is None:
                mode = im.mode
            elif im.mode != mode:
                im = im.convert(mode)
            if size is None:
                size = im.size
            elif im.size != size:
                raise DatasetError(f"{file}: size {im.size} differs from {size}; resize all first")
            images.append(np.asarray(im, dtype=np.uint8))
            labels.append(k)
    if not images:
        raise DatasetError(f"{root}: class folders {classes} contain no images")
    return _to_nchw_uint8(np.stack(images), str(root)), np.asarray(labels, np.int64), classes
