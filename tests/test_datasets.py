"""Datasets: official formats read back exactly, checksums enforced, archives extracted safely."""

from __future__ import annotations

import io
import os
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import trust_files_in, write_tiny_cifar, write_tiny_svhn

from lvat.cli import main
from lvat.data import catalog, load_dataset
from lvat.data.fetch import md5sum, safe_extract
from lvat.errors import ChecksumError, DatasetError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_cifar10_archive_is_extracted_and_read_back_exactly(tmp_path, monkeypatch):
    written = write_tiny_cifar(tmp_path / "c10")
    trust_files_in(monkeypatch, "cifar10", tmp_path / "c10")
    ds = load_dataset("cifar10", tmp_path / "c10", download=False)
    assert (tmp_path / "c10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (20, 3, 32, 32)
    data, labels = written["data_batch_2"]  # rows 20..39 of train
    row = data[3]
    # official layout: 1024 red values row-major, then green, then blue
    assert np.array_equal(ds.x_train[23, 0].numpy(), row[:1024].reshape(32, 32))
    assert np.array_equal(ds.x_train[23, 2].numpy(), row[2048:].reshape(32, 32))
    assert np.array_equal(ds.y_train[20:40].numpy(), labels)
    assert np.array_equal(ds.x_test.numpy().reshape(20, -1), written["test_batch"][0])
    assert ds.classes[0] == "airplane" and ds.flip is True


def test_cifar10_tampered_archive_fails_its_checksum(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path)
    trust_files_in(monkeypatch, "cifar10", tmp_path)
    archive = tmp_path / "cifar-10-python.tar.gz"
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=r"cifar-10-python.tar.gz: MD5 \w+ does not match"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not (tmp_path / "cifar-10-batches-py").exists()  # nothing extracted from a bad archive


def test_cifar10_tampered_batch_fails_its_checksum(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path)
    trust_files_in(monkeypatch, "cifar10", tmp_path)
    load_dataset("cifar10", tmp_path, download=False)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    middle = batch.stat().st_size // 2  # inside the pixel data: still a valid pickle
    with open(batch, "r+b") as f:
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ChecksumError, match="data_batch_3.*official"):
        load_dataset("cifar10", tmp_path, download=False)
    assert load_dataset("cifar10", tmp_path, download=False, verify=False).x_train.shape[0] == 100


def test_svhn_mat_files_read_back_exactly(tmp_path, monkeypatch):
    written = write_tiny_svhn(tmp_path)
    trust_files_in(monkeypatch, "svhn", tmp_path)
    ds = load_dataset("svhn", tmp_path, download=False)
    x, y = written["train"]
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    # X is (H, W, C, N): pixel (h=5, w=7) of channel 1 of image 4
    assert ds.x_train[4, 1, 5, 7] == x[5, 7, 1, 4]
    assert np.array_equal(ds.x_train.numpy(), x.transpose(3, 2, 0, 1))
    assert ds.y_train.tolist() == [v % 10 for v in y.reshape(-1).tolist()]  # label 10 -> 0
    assert 0 in ds.y_train.tolist() and ds.flip is False


def test_svhn_tampered_file_fails_its_checksum(tmp_path, monkeypatch):
    write_tiny_svhn(tmp_path)
    trust_files_in(monkeypatch, "svhn", tmp_path)
    with open(tmp_path / "test_32x32.mat", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ChecksumError, match="test_32x32.mat: MD5"):
        load_dataset("svhn", tmp_path, download=False)


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"y"))
        if member.isfile():
            member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda: tarfile.TarInfo("../escaped.txt"),
        lambda: tarfile.TarInfo("sub/../../escaped.txt"),
        lambda: tarfile.TarInfo("/tmp/lvat-absolute-escape.txt"),
        lambda: _link("link", "../../etc"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out"],
)
def test_tar_member_escaping_the_target_is_refused(tmp_path, make):
    archive = _tar_with(tmp_path, make())
    dest = tmp_path / "out"
    with pytest.raises(DatasetError, match="refusing to extract member"):
        safe_extract(archive, dest)
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/lvat-absolute-escape.txt").exists()
    assert not (dest / "fine.txt").exists()  # checked before anything is written


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def test_missing_dataset_offline_says_where_it_looked_and_what_to_get(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DatasetError) as err:
        load_dataset("svhn")
    msg = str(err.value)
    assert "\n" not in msg
    cache = Path(os.environ["LVAT_DATA"]) / "svhn"
    assert "/usr/share/datasets/svhn" in msg and str(cache) in msg
    assert "http://ufldl.stanford.edu/housenumbers/train_32x32.mat" in msg
    assert "no network" in msg


def test_download_lands_only_verified_files_in_the_cache(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    write_tiny_svhn(src)
    spec = trust_files_in(monkeypatch, "svhn", src)
    import dataclasses

    good = dataclasses.replace(
        spec,
        files=tuple(dataclasses.replace(f, urls=((src / f.name).as_uri(),)) for f in spec.files),
    )
    monkeypatch.setitem(catalog.DATASETS, "svhn", good)
    ds = load_dataset("svhn")
    cache = Path(os.environ["LVAT_DATA"]) / "svhn"
    assert Path(ds.source) == cache and md5sum(cache / "train_32x32.mat") == good.files[0].md5

    bad = dataclasses.replace(
        good, files=(dataclasses.replace(good.files[0], md5="0" * 32), good.files[1])
    )
    monkeypatch.setitem(catalog.DATASETS, "svhn", bad)
    (cache / "train_32x32.mat").unlink()
    with pytest.raises(DatasetError, match="does not match"):
        load_dataset("svhn")
    assert not (cache / "train_32x32.mat").exists()
    assert not list(cache.glob("*.part"))


def test_idx_reader_rejects_a_file_that_is_not_idx(tmp_path):
    from lvat.data.formats import read_idx

    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"not an idx file at all")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(bad)


@pytest.mark.skipif(
    not FMNIST.is_dir() and not os.environ.get("LVAT_REQUIRE_DATA"),
    reason="apt-get install dataset-fashion-mnist (make test does it)",
)
def test_real_fashion_mnist_loads_from_the_debian_package():
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.source == str(FMNIST)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.class_counts("train") == [6000] * 10 and ds.class_counts("test") == [1000] * 10
    assert ds.y_train[:5].tolist() == [9, 0, 0, 3, 0]  # the published first labels
    padded = ds.padded(32)
    assert padded.image_shape == (1, 32, 32) and padded.x_train[:, :, :2].sum() == 0
    assert torch.equal(padded.x_train[:, :, 2:30, 2:30], ds.x_train)


def test_user_npz_pool_and_explicit_splits(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)  # NHWC
    y = np.arange(50) % 5
    np.savez(tmp_path / "pool.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "pool.npz"))
    assert ds.image_shape == (3, 8, 8) and ds.num_classes == 5
    assert len(ds.x_train) == 40 and len(ds.x_test) == 10 and ds.class_counts("test") == [2] * 5
    np.savez(tmp_path / "split.npz", x_train=x[:40] / 255.0, y_train=y[:40],
             x_test=x[40:], y_test=y[40:])  # fmt: skip
    ds2 = load_dataset(str(tmp_path / "split.npz"))
    assert torch.equal(ds2.x_train.permute(0, 2, 3, 1), torch.from_numpy(x[:40]))
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(DatasetError, match="expected arrays x, y"):
        load_dataset(str(tmp_path / "bad.npz"))


def test_user_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            arr = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path / "imgs"))
    assert ds.classes == ["cat", "dog"] and ds.image_shape == (3, 6, 6)
    assert len(ds.x_train) + len(ds.x_test) == 10 and ds.class_counts("test") == [1, 1]
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "imgs" / "dog" / "odd.png")
    with pytest.raises(DatasetError, match="odd.png: size"):
        load_dataset(str(tmp_path / "imgs"))


def test_unknown_dataset_name_is_a_clear_error():
    with pytest.raises(DatasetError, match="unknown dataset 'cifar11'.*cifar10"):
        load_dataset("cifar11")


def test_data_check_prints_counts_and_ok(tmp_path, monkeypatch, capsys):
    write_tiny_cifar(tmp_path)
    trust_files_in(monkeypatch, "cifar10", tmp_path)
    assert main(["data", "check", "cifar10", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "train: 100 images of 3x32x32" in out and "test: 20 images" in out
    assert "airplane: 10" in out and out.strip().endswith("OK")


def test_data_check_bad_file_exits_nonzero_with_one_line(tmp_path, monkeypatch, capsys):
    write_tiny_svhn(tmp_path)
    trust_files_in(monkeypatch, "svhn", tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage")
    assert main(["data", "check", "svhn", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lvat: error: ") and "train_32x32.mat" in err
    assert err.count("\n") == 1
