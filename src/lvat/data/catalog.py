"""The official datasets: files, checksums, addresses, where to look, and how to read them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lvat.data import formats
from lvat.data.fetch import cache_dir, download, safe_extract, verify_md5
from lvat.errors import DatasetError

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


@dataclass(frozen=True)
class OfficialFile:
    """One published file: its path in the dataset folder, MD5, and where to download it."""

    name: str
    md5: str
    urls: tuple[str, ...] = ()  # empty: the file comes out of the dataset's archive
    content_md5: str = ""  # MD5 of the gunzipped content (accepts re-compressed copies)


@dataclass(frozen=True)
class OfficialDataset:
    """A dataset we know how to fetch, verify and read."""

    name: str
    classes: tuple[str, ...]
    files: tuple[OfficialFile, ...]  # what `read` needs, relative to the dataset folder
    read: Callable[[Path], Arrays]
    homepage: str
    archive: OfficialFile | None = None  # downloaded, verified, then safely extracted
    flip: bool = False  # default for random horizontal flips (docs/method.md §4.3)
    apt_package: str = ""  # Debian package that installs it under /usr/share/datasets

    @property
    def system_dirs(self) -> tuple[Path, ...]:
        return (Path("/usr/share/datasets") / self.name,)

    @property
    def downloads(self) -> tuple[OfficialFile, ...]:
        return (self.archive,) if self.archive else self.files


def _read_idx_dataset(folder: Path) -> Arrays:
    x_tr, y_tr = formats.read_idx_pair(
        folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz", 10
    )
    x_te, y_te = formats.read_idx_pair(
        folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz", 10
    )
    return x_tr, y_tr, x_te, y_te


def _read_cifar10(folder: Path) -> Arrays:
    base = folder / CIFAR_DIR
    train = [formats.read_cifar_batch(base / f"data_batch_{i}") for i in range(1, 6)]
    x_te, y_te = formats.read_cifar_batch(base / "test_batch")
    return (
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        x_te,
        y_te,
    )


def _read_svhn(folder: Path) -> Arrays:
    return (*formats.read_svhn_mat(folder / "train_32x32.mat"),
            *formats.read_svhn_mat(folder / "test_32x32.mat"))  # fmt: skip


def _idx_files(base_urls: tuple[str, ...], md5s: dict[str, tuple[str, str]]) -> tuple:
    return tuple(
        OfficialFile(name, md5, tuple(u + name for u in base_urls), content)
        for name, (md5, content) in md5s.items()
    )


CIFAR_DIR = "cifar-10-batches-py"

# MD5s as published by the datasets' authors and used by torchvision. The Fashion-MNIST content
# MD5s were measured on the gunzipped files of Debian's dataset-fashion-mnist package.
DATASETS: dict[str, OfficialDataset] = {
    d.name: d
    for d in [
        OfficialDataset(
            name="fashion-mnist",
            classes=(
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ),  # fmt: skip
            files=_idx_files(
                (
                    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                ),  # fmt: skip # noqa: E501
                {
                    "train-images-idx3-ubyte.gz": (
                        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                    ),
                    "train-labels-idx1-ubyte.gz": (
                        "25c81989df183df01b3e8a0aad5dffbe",
                        "9018921c3c673c538a1fc5bad174d6f9",
                    ),
                    "t10k-images-idx3-ubyte.gz": (
                        "bef4ecab320f06d8554ea6380940ec79",
                        "8181f5470baa50b63fa0f6fddb340f0a",
                    ),
                    "t10k-labels-idx1-ubyte.gz": (
                        "bb300cfdad3c16e7a12a480ee83cd310",
                        "15d484375f8d13e6eb1aabb0c3f46965",
                    ),
                },  # fmt: skip
            ),
            read=_read_idx_dataset,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            flip=True,  # garments are mirror-symmetric in label
            apt_package="dataset-fashion-mnist",
        ),
        OfficialDataset(
            name="mnist",
            classes=tuple(str(i) for i in range(10)),
            files=_idx_files(
                (
                    "https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "http://yann.lecun.com/exdb/mnist/",
                ),  # fmt: skip
                {
                    "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", ""),
                    "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", ""),
                    "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", ""),
                    "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", ""),
                },
            ),
            read=_read_idx_dataset,
            homepage="http://yann.lecun.com/exdb/mnist/",
        ),
        OfficialDataset(
            name="cifar10",
            classes=(
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ),  # fmt: skip
            files=tuple(
                OfficialFile(f"{CIFAR_DIR}/{name}", md5)
                for name, md5 in [
                    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
                    ("test_batch", "40351d587109b95175f43aff81a1287e"),
                ]
            ),
            archive=OfficialFile(
                "cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
                ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            ),
            read=_read_cifar10,
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            flip=True,  # paper section 5.1: flips for CIFAR-10 only
        ),
        OfficialDataset(
            name="svhn",
            classes=tuple(str(i) for i in range(10)),  # label 10 in the .mat files is digit 0
            files=(
                OfficialFile(
                    "train_32x32.mat",
                    "e26dedcc434d2e4c54c9b2d4a06d8373",
                    ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",),
                ),
                OfficialFile(
                    "test_32x32.mat",
                    "eb5a983be6a315427106f1b164d9cef3",
                    ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",),
                ),
            ),  # fmt: skip
            read=_read_svhn,
            homepage="http://ufldl.stanford.edu/housenumbers/",
        ),
    ]
}


def _has_files(spec: OfficialDataset, folder: Path) -> bool:
    return all((folder / f.name).is_file() for f in spec.files)


def _prepare(spec: OfficialDataset, folder: Path, verify: bool) -> bool:
    """True if `folder` holds the dataset (extracting its archive if that is all there is)."""
    if not _has_files(spec, folder) and spec.archive and (folder / spec.archive.name).is_file():
        if verify:
            verify_md5(folder / spec.archive.name, spec.archive.md5, hint=_hint(spec))
        safe_extract(folder / spec.archive.name, folder)
    if not _has_files(spec, folder):
        return False
    if verify:
        for f in spec.files:
            verify_md5(folder / f.name, f.md5, f.content_md5, hint=_hint(spec))
    return True


def _state(spec: OfficialDataset, folder: Path) -> str:
    """What `folder` lacks, for the error when a dataset is not found."""
    if not folder.is_dir():
        return f"{folder} (no such folder)"
    missing = [f.name for f in spec.files if not (folder / f.name).is_file()]
    if not missing:  # pragma: no cover - _prepare returns True then
        return f"{folder} (complete)"
    text = f"{folder} lacks {', '.join(missing)}"
    if spec.archive:
        there = (folder / spec.archive.name).is_file()
        text += (
            f" (not in {spec.archive.name} either)"
            if there
            else (f" (and {spec.archive.name}, to extract them from)")
        )
    return text


def _hint(spec: OfficialDataset) -> str:
    return f" (`lvat data download {spec.name}`)"


def search_dirs(spec: OfficialDataset, root: str | Path = "") -> list[Path]:
    """Folders searched, in order: `root` (and root/NAME) if given; else system dirs, then cache."""
    if root:
        root = Path(root).expanduser()
        return [root, root / spec.name]
    return [*spec.system_dirs, cache_dir() / spec.name]


def locate(spec: OfficialDataset, root: str | Path = "", *, fetch: bool = True,
           verify: bool = True) -> Path:  # fmt: skip
    """Find (or download, when `fetch`) the dataset's folder; verified unless `verify` is False."""
    dirs = search_dirs(spec, root)
    for folder in dirs:
        if folder.is_dir() and _prepare(spec, folder, verify):
            return folder
    target = dirs[0] if root else dirs[-1]
    problem = f"downloads are off (run `lvat data download {spec.name}` to fetch it)"
    if fetch:
        try:
            for f in spec.downloads:
                if not (target / f.name).is_file():
                    download(f.urls, target / f.name, f.md5)
            if _prepare(spec, target, verify):
                return target
            problem = f"the download did not produce {[f.name for f in spec.files]}"
        except DatasetError as exc:
            problem = str(exc)
    wanted = ", ".join(f"{f.urls[0]}" for f in spec.downloads)
    apt = f" or `apt-get install {spec.apt_package}`," if spec.apt_package else ""
    looked = "; ".join(_state(spec, folder) for folder in dirs)
    raise DatasetError(
        f"{spec.name} not found: {looked}; {problem}. "
        f"Download {wanted} into {target}{apt} or pass --root DIR where the files are "
        f"(see {spec.homepage})"
    )
