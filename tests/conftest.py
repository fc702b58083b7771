"""Shared fixtures: tiny datasets written in the exact official formats."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lvat.config import to_flags
from lvat.data import catalog
from lvat.data.fetch import md5sum


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's real cache."""
    monkeypatch.setenv("LVAT_DATA", str(tmp_path_factory.mktemp("lvat-cache")))


@pytest.fixture(autouse=True)
def _float32_auto(monkeypatch):
    """`train.amp = "auto"` means float32 in every test, whatever this CPU's bf16 units: the
    suite's numbers must not depend on the machine (tests of bf16 pin amp = "bf16"; the auto
    rule has its own test, which patches this back)."""
    monkeypatch.setattr("lvat.environment.native_bf16", lambda: False)


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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads spin-wait for each other
    and tiny models run 10-50x slower with two. Opt in per module with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """200 + 50 16x16 grey images of 10 classes: a class-dependent blob plus noise (.npz)."""
    rng = np.random.default_rng(0)
    y = np.arange(250) % 10
    x = rng.integers(0, 60, (250, 16, 16)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, c : c + 4, 2:8] = 255
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    np.savez(path, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    return path


@pytest.fixture(scope="module")
def transformers(tmp_path_factory) -> dict[str, Path]:
    """Untrained tiny VAE and Glow checkpoints for 1x16x16 images (protocol and kind only)."""
    from lvat.models import VAE, Glow, save_transformer

    folder = tmp_path_factory.mktemp("transformers")
    torch.manual_seed(0)
    glow = Glow(in_channels=1, image_size=16, n_levels=2, n_steps=1, width=8)
    glow.initialize(torch.rand(16, 1, 16, 16))
    return {
        "vae": save_transformer(VAE(in_channels=1, image_size=16, latent_dim=8), folder / "v.pt"),
        "glow": save_transformer(glow, folder / "g.pt"),
    }


def tiny_run_flags(data: Path, out: Path | None = None, **overrides) -> list[str]:
    """`--key value` flags of a 6-step conv-small run on `data` (toy_data); keys win if given."""
    base = {
        "data.name": str(data), "data.num_labeled": 20, "model.name": "conv-small",
        "train.steps": 6, "train.batch_labeled": 8, "train.batch_unlabeled": 16,
        "train.decay_steps": 3, "train.log_every": 2, "train.eval_every": 3,
        "train.checkpoint_every": 3, "train.progress": "false", "device": "cpu",
        # float32 whatever the CPU: a subprocess (torchrun, a killed run) does not see the
        # autouse fixture that pins amp = "auto" to float32 in this process
        "train.amp": "off", "train.channels_last": "off",
    }  # fmt: skip
    if out is not None:
        base["out"] = str(out)
    base.update(overrides)
    return to_flags(base)


TIMINGS = ("time_s", "steps_per_s")


def read_jsonl(path: Path, untimed: bool = False) -> list[dict]:
    """The rows of a JSON-lines file (metrics.jsonl, eval.jsonl); `untimed` drops the wall-clock
    keys, which are all that may differ between a resumed run and an uninterrupted one."""
    rows = [json.loads(r) for r in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows] if untimed else rows
