"""Shared fixtures: tiny datasets written in the exact official formats."""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lvat.data import catalog
from lvat.data.fetch import md5sum


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's real cache."""
    monkeypatch.setenv("LVAT_DATA", str(tmp_path_factory.mktemp("lvat-cache")))


def write_tiny_cifar(folder: Path, per_batch: int = 20, seed: int = 0) -> dict:
    """cifar-10-python.tar.gz with cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.

    Each batch is a pickled dict (data: (N, 3072) uint8 with R, G, B planes row-major;
    labels: list of int) as in the official release. Returns the arrays written.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name: str, obj) -> None:
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            labels = [int(v) for v in np.arange(per_batch) % 10]
            written[name] = (data, np.asarray(labels))
            add(name, {"batch_label": name, "labels": labels, "data": data,
                       "filenames": [f"{i}.png" for i in range(per_batch)]})  # fmt: skip
        add("batches.meta", {"label_names": list(catalog.DATASETS["cifar10"].classes)})
    (folder / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    return written


def write_tiny_svhn(folder: Path, n_train: int = 30, n_test: int = 20, seed: int = 0) -> dict:
    """train_32x32.mat / test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) in 1..10."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 = digit 0
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


def trust_files_in(monkeypatch, name: str, folder: Path) -> catalog.OfficialDataset:
    """Register the MD5s of the tiny files in `folder` as the official ones for `name`."""
    spec = catalog.DATASETS[name]

    def rehash(f: catalog.OfficialFile) -> catalog.OfficialFile:
        path = folder / f.name
        return dataclasses.replace(f, md5=md5sum(path), content_md5="") if path.exists() else f

    archive = rehash(spec.archive) if spec.archive else None
    if archive is not None and not all((folder / f.name).exists() for f in spec.files):
        from lvat.data.fetch import safe_extract

        probe = folder.parent / (folder.name + "-probe")
        safe_extract(folder / archive.name, probe)
        files = tuple(dataclasses.replace(f, md5=md5sum(probe / f.name)) for f in spec.files)
    else:
        files = tuple(rehash(f) for f in spec.files)
    new = dataclasses.replace(spec, files=files, archive=archive)
    monkeypatch.setitem(catalog.DATASETS, name, new)
    return new
