"""Hostile dataset files: every one is refused with a one-line DatasetError, before any harm.

Tar archives that try to write outside their folder (also on Pythons without the standard
library's `filter="data"`), bit-flipped .gz files, malformed .npz files, images that declare huge
sizes, and dataset folders that lack a file.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import trust_files_in, write_tiny_cifar

from lvat.cli import main
from lvat.data import catalog, load_dataset
from lvat.data.fetch import md5sum, safe_extract
from lvat.data.formats import MAX_IMAGE_SIDE, read_idx
from lvat.errors import DatasetError

README = Path(__file__).resolve().parents[1] / "README.md"

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _one_line_error(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def _check_fails(capsys, *argv: str) -> str:
    """`lvat data check ARGV` exits 2 with one `lvat: error:` line and never prints OK."""
    assert main(["data", "check", *argv]) == 2
    out, err = capsys.readouterr()
    assert "OK" not in out
    assert err.startswith("lvat: error: ") and err.count("\n") == 1, err
    return err


def _tree(folder: Path) -> list[str]:
    """Everything under `folder` (links not followed), as sorted relative paths."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- 1. tar archives ---------------------------------------------------------------------------


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def _write_tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if m.isreg():
                payload = f"payload of {m.name}".encode()
                m.size = len(payload)
                tar.addfile(m, io.BytesIO(payload))
            else:
                tar.addfile(m)
    return path


SYMLINK_CHAIN = [  # b -> ., a -> b/.. (= the target's parent, once b exists), then a/outside/...
    lambda: _info("fine.txt"),
    lambda: _info("b", tarfile.SYMTYPE, "."),
    lambda: _info("a", tarfile.SYMTYPE, "b/.."),
    lambda: _info("a/outside/evil.txt"),
]


@pytest.fixture(params=["stdlib-filter", "no-stdlib-filter"])
def tar_filter(request, monkeypatch):
    """Run with the standard library's data filter, and as on Python < 3.11.4 (none)."""
    if request.param == "no-stdlib-filter":
        monkeypatch.delattr(tarfile, "data_filter")
    return request.param


def test_tar_symlink_chain_is_refused_before_anything_is_written(tmp_path, tar_filter):
    archive = _write_tar(tmp_path / "in" / "evil.tar.gz", [m() for m in SYMLINK_CHAIN])
    work = tmp_path / "work"
    dest = work / "out"
    dest.mkdir(parents=True)
    (dest / "mine.txt").write_text("already here")
    with pytest.raises(DatasetError, match="refusing to extract member 'b'.*link") as err:
        safe_extract(archive, dest)
    msg = _one_line_error(err)
    assert str(archive) in msg and "nothing was extracted" in msg
    assert _tree(dest) == ["mine.txt"] and (dest / "mine.txt").read_text() == "already here"
    assert _tree(work) == ["out", "out/mine.txt"]  # nothing beside the target either
    assert not (tmp_path / "outside").exists() and _tree(tmp_path / "in") == ["evil.tar.gz"]


@pytest.mark.parametrize(
    "members",
    [
        [_info("x", tarfile.SYMTYPE, "sub/y")],  # a link pointing inside: still refused
        [_info("y"), _info("x", tarfile.LNKTYPE, "y")],
        [_info("fifo", tarfile.FIFOTYPE)],
        [_info("dev", tarfile.CHRTYPE)],
        [_info("dev", tarfile.BLKTYPE)],
        [_info("x"), _info("x/evil.txt")],  # through an earlier member that is a file
        [_info("d", tarfile.DIRTYPE), _info("d")],  # the same name as folder and as file
        [_info("../up.txt")],
        [_info("sub/../../up.txt")],
        [_info("/tmp/lvat-hostile-absolute.txt")],
        [_info("two\nlines"), _info("two\nlines/x\ny")],  # the error stays one line
    ],
    ids=[
        "symlink-inside",
        "hardlink",
        "fifo",
        "chardev",
        "blockdev",
        "through-a-file",
        "file-and-folder",
        "dotdot",
        "nested-dotdot",
        "absolute",
        "newlines",
    ],
)
def test_tar_links_special_files_and_escapes_are_refused(tmp_path, tar_filter, members):
    archive = _write_tar(tmp_path / "evil.tar.gz", [_info("fine.txt"), *members])
    dest = tmp_path / "out"
    with pytest.raises(DatasetError, match="refusing to extract member") as err:
        safe_extract(archive, dest)
    _one_line_error(err)
    assert _tree(dest) == []
    assert _tree(tmp_path) == ["evil.tar.gz"] or _tree(tmp_path) == ["evil.tar.gz", "out"]
    assert not Path("/tmp/lvat-hostile-absolute.txt").exists()


def test_tar_member_through_a_link_already_in_the_target_is_refused(tmp_path, tar_filter):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "cifar-10-batches-py").symlink_to(outside)
    archive = _write_tar(tmp_path / "a.tar.gz", [_info("cifar-10-batches-py/data_batch_1")])
    with pytest.raises(DatasetError, match="refusing to extract member.*outside"):
        safe_extract(archive, dest)
    assert _tree(outside) == []


def test_tar_extraction_keeps_files_already_there(tmp_path, tar_filter):
    write_tiny_cifar(tmp_path)
    dest = tmp_path / "out"
    (dest / "cifar-10-batches-py").mkdir(parents=True)
    (dest / "cifar-10-batches-py" / "batches.meta").write_text("my own")
    (dest / "notes.txt").write_text("mine")
    safe_extract(tmp_path / "cifar-10-python.tar.gz", dest)
    assert (dest / "cifar-10-batches-py" / "batches.meta").read_text() == "my own"
    assert (dest / "notes.txt").read_text() == "mine"
    assert (dest / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not [p for p in _tree(dest) if p.endswith(".part")]


def test_official_archive_loads_without_the_stdlib_filter(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path / "a")
    write_tiny_cifar(tmp_path / "b")
    trust_files_in(monkeypatch, "cifar10", tmp_path / "a")
    expected = load_dataset("cifar10", tmp_path / "a", download=False)
    # b's archive, not a's: gzip stamps the second it was written, so the two can differ by it
    trust_files_in(monkeypatch, "cifar10", tmp_path / "b")
    monkeypatch.delattr(tarfile, "data_filter")
    ds = load_dataset("cifar10", tmp_path / "b", download=False)
    assert ds.fingerprint == expected.fingerprint and len(ds.x_test) == 20


def test_symlink_chain_is_refused_with_no_verify_by_load_and_data_check(
    tmp_path, monkeypatch, capsys, tar_filter
):
    root = tmp_path / "root"
    archive = _write_tar(root / "cifar-10-python.tar.gz", [m() for m in SYMLINK_CHAIN])
    with pytest.raises(DatasetError, match="refusing to extract member") as err:
        load_dataset("cifar10", root, download=False, verify=False)
    _one_line_error(err)
    err = _check_fails(capsys, "cifar10", "--root", str(root), "--no-verify")
    assert "refusing to extract member" in err and str(archive) in err
    assert _tree(tmp_path) == ["root", "root/cifar-10-python.tar.gz"]


def test_corrupt_tar_gz_with_no_verify_is_a_dataset_error(tmp_path, tar_filter):
    write_tiny_cifar(tmp_path)
    good = (tmp_path / "cifar-10-python.tar.gz").read_bytes()
    bad = tmp_path / "bad.tar.gz"
    for pos in range(10, len(good), max(1, len(good) // 40)):
        raw = bytearray(good)
        raw[pos] ^= 0x55
        bad.write_bytes(bytes(raw))
        try:
            safe_extract(bad, tmp_path / f"out{pos}")
        except DatasetError as exc:
            assert "\n" not in str(exc) and str(bad) in str(exc)


# ---- 2. bit-flipped .gz ------------------------------------------------------------------------


def _write_tiny_idx(folder: Path, n_train: int = 30, n_test: int = 20) -> None:
    """The four Fashion-MNIST/MNIST IDX files (gzipped), n images of 28x28, labels 0..9."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        images = b"\0\0\x08\x03" + np.array([n, 28, 28], ">i4").tobytes() + x.tobytes()
        labels = b"\0\0\x08\x01" + np.array([n], ">i4").tobytes() + y.tobytes()
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def _trust_idx_content(monkeypatch, folder: Path, name: str = "fashion-mnist") -> None:
    """Register the tiny files' gunzipped MD5s as the official content (as for Debian's copy)."""
    spec = catalog.DATASETS[name]
    files = tuple(
        dataclasses.replace(f, md5="0" * 32, content_md5=md5sum(folder / f.name, decompress=True))
        for f in spec.files
    )
    monkeypatch.setitem(catalog.DATASETS, name, dataclasses.replace(spec, files=files))


def _zlib_error_flip(raw: bytes) -> bytes:
    """`raw` with one byte changed so that its deflate stream is invalid (zlib.error)."""
    for pos in range(10, len(raw) - 8):
        flipped = bytearray(raw)
        flipped[pos] ^= 0xFF
        try:
            zlib.decompress(bytes(flipped[10:-8]), -15)
        except zlib.error:
            return bytes(flipped)
    raise AssertionError("no flip breaks the deflate stream")


def test_every_bit_flip_in_an_idx_gz_is_ok_or_a_dataset_error(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, 6, 6), dtype=np.uint8)
    raw = b"\0\0\x08\x03" + np.array([4, 6, 6], ">i4").tobytes() + x.tobytes()
    good = gzip.compress(raw)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    kinds = set()
    variants = [good[:cut] for cut in range(1, len(good))]  # truncations (EOFError)
    for pos in range(len(good)):
        for bit in range(8):
            flipped = bytearray(good)
            flipped[pos] ^= 1 << bit
            variants.append(bytes(flipped))
    for variant in variants:
        path.write_bytes(variant)
        try:
            out = read_idx(path)
        except DatasetError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            kinds.add("error")
        else:
            assert out.tobytes() == x.tobytes()  # only header bytes (mtime, OS) may differ
            kinds.add("ok")
    assert kinds == {"ok", "error"}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_bit_flipped_fashion_mnist_gz_is_a_dataset_error(tmp_path, monkeypatch, capsys, verify):
    _write_tiny_idx(tmp_path)
    _trust_idx_content(monkeypatch, tmp_path)
    assert len(load_dataset("fashion-mnist", tmp_path, download=False).x_train) == 30
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(_zlib_error_flip(bad.read_bytes()))
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", tmp_path, download=False, verify=verify)
    msg = _one_line_error(err)
    assert str(bad) in msg and "corrupt" in msg and "download it again" in msg
    argv = ["fashion-mnist", "--root", str(tmp_path)] + ([] if verify else ["--no-verify"])
    assert str(bad) in _check_fails(capsys, *argv)


def test_truncated_mnist_gz_with_no_verify_is_a_dataset_error(tmp_path, capsys):
    _write_tiny_idx(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz.*corrupt"):
        load_dataset("mnist", tmp_path, download=False, verify=False)
    _check_fails(capsys, "mnist", "--root", str(tmp_path), "--no-verify")


# ---- 3. users' .npz files ----------------------------------------------------------------------


def _pool(n: int = 50, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), np.arange(n) % k


def _npz_error(path: Path, capsys, **arrays) -> str:
    np.savez(path, **arrays)
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path))
    msg = _one_line_error(err)
    assert str(path) in msg
    _check_fails(capsys, str(path))
    return msg


def test_npz_x_and_y_of_different_lengths_are_refused(tmp_path, capsys):
    x, y = _pool()
    msg = _npz_error(tmp_path / "pool.npz", capsys, x=x, y=y[:-3])
    assert "50 images" in msg and "47 labels" in msg
    msg = _npz_error(tmp_path / "split.npz", capsys, x_train=x[:40], y_train=y[:40],
                     x_test=x[40:], y_test=y[41:])  # fmt: skip
    assert "x_test" in msg and "10 images" in msg and "9 labels" in msg


def test_npz_one_hot_labels_are_refused(tmp_path, capsys):
    x, y = _pool()
    msg = _npz_error(tmp_path / "onehot.npz", capsys, x=x, y=np.eye(5, dtype=np.int64)[y])
    assert "one-hot" in msg


@pytest.mark.parametrize(
    "bad", [np.nan, np.inf, -np.inf, 1.5, -0.25], ids=["nan", "inf", "-inf", "above", "below"]
)
def test_npz_float_pixels_must_be_finite_and_in_0_1(tmp_path, capsys, bad):
    x, y = _pool()
    xf = x / 255.0
    xf[7, 3, 4] = bad
    msg = _npz_error(tmp_path / "float.npz", capsys, x=xf, y=y)
    assert "[0, 1]" in msg
    if not np.isfinite(bad):
        assert "not finite" in msg


def test_npz_integer_pixels_must_lie_in_0_255(tmp_path, capsys):
    x, y = _pool()
    xi = x.astype(np.int64)
    ds = load_dataset(str(_save(tmp_path / "ok.npz", x=xi, y=y)))  # int64 in 0..255 is fine
    assert ds.num_classes == 5 and len(ds.x_train) == 40
    xi[0, 0, 0] = 300
    msg = _npz_error(tmp_path / "int.npz", capsys, x=xi, y=y)
    assert "0..255" in msg and "300" in msg


def _save(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_without_images_is_refused(tmp_path, capsys):
    x, y = _pool()
    msg = _npz_error(tmp_path / "empty.npz", capsys, x=x[:0], y=y[:0])
    assert "no images" in msg
    msg = _npz_error(tmp_path / "no-test.npz", capsys, x_train=x, y_train=y,
                     x_test=x[:0], y_test=y[:0])  # fmt: skip
    assert "no test images" in msg
    msg = _npz_error(tmp_path / "tiny.npz", capsys, x=x[:4], y=np.arange(4))  # 1 per class
    assert "test" in msg and "too few" in msg


@pytest.mark.parametrize(
    "labels",
    [
        lambda y: np.concatenate([y[:-1], [1000]]),  # one stray label: 1001 classes
        lambda y: y + 1,  # 1..5: class 0 has no image
        lambda y: np.where(y == 2, 4, y),  # 0, 1, 3, 4: a gap
    ],
    ids=["stray-1000", "one-based", "gap"],
)
def test_npz_labels_must_be_0_to_k_minus_1_all_present(tmp_path, capsys, labels):
    x, y = _pool()
    msg = _npz_error(tmp_path / "labels.npz", capsys, x=x, y=labels(y))
    assert "0..K-1" in msg and "no image" in msg


def test_npz_good_files_still_load_and_check_ok(tmp_path, capsys):
    x, y = _pool()
    path = _save(tmp_path / "fine.npz", x=x / 255.0, y=y.reshape(-1, 1))
    assert load_dataset(str(path)).num_classes == 5
    assert main(["data", "check", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


# ---- 4. images declaring huge sizes ------------------------------------------------------------


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header (IHDR, with a valid CRC) claims width x height pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    assert raw[12:16] == b"IHDR"
    raw[16:20], raw[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(raw))
    return path


def _image_folder(root: Path, size: int = 6) -> Path:
    from PIL import Image

    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(5):
            Image.new("L", (size, size), 40 * i).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("side", [30000, MAX_IMAGE_SIDE + 1], ids=["bomb", "just-over"])
def test_image_declaring_a_huge_size_is_refused_by_its_header(tmp_path, capsys, side):
    root = _image_folder(tmp_path / "imgs")
    big = _png_declaring(root / "dog" / "huge.png", side, side)
    with pytest.raises(DatasetError) as err:
        load_dataset(str(root))
    msg = _one_line_error(err)
    assert str(big) in msg and f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}" in msg and "resize" in msg
    assert str(big) in _check_fails(capsys, str(root))


def test_huge_image_in_train_test_folders_is_refused(tmp_path):
    root = tmp_path / "imgs"
    _image_folder(root / "train")
    _image_folder(root / "test")
    big = _png_declaring(root / "test" / "cat" / "wide.png", 40000, 2)
    with pytest.raises(DatasetError, match=f"{big}:.*larger than"):
        load_dataset(str(root))


def test_unreadable_image_file_names_the_file(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs")
    bad = root / "cat" / "broken.png"
    bad.write_bytes((root / "cat" / "0.png").read_bytes()[:40])  # header only, truncated
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset(str(root))
    _check_fails(capsys, str(root))


def test_image_folder_too_small_for_a_test_hold_out_is_refused(tmp_path):
    root = tmp_path / "imgs"
    from PIL import Image

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("L", (4, 4)).save(root / cls / "0.png")
    with pytest.raises(DatasetError, match="too few"):
        load_dataset(str(root))


# ---- 5. a folder missing one file --------------------------------------------------------------


def test_missing_official_file_is_named_with_the_folder(tmp_path, capsys):
    _write_tiny_idx(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion-mnist", tmp_path / "fm", download=False)
    msg = _one_line_error(err)
    assert f"{tmp_path / 'fm'} lacks t10k-labels-idx1-ubyte.gz" in msg
    for present in IDX_FILES[:3]:
        assert present not in msg.split("lacks")[1].split(";")[0]
    err = _check_fails(capsys, "fashion-mnist", "--root", str(tmp_path / "fm"))
    assert "t10k-labels-idx1-ubyte.gz" in err


def test_missing_cifar_batch_names_the_batch_and_the_archive(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path)
    trust_files_in(monkeypatch, "cifar10", tmp_path)
    load_dataset("cifar10", tmp_path, download=False)
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", tmp_path, download=False)
    msg = _one_line_error(err)
    assert f"{tmp_path} lacks cifar-10-batches-py/data_batch_3" in msg
    assert "cifar-10-python.tar.gz" in msg and f"{tmp_path / 'cifar10'} (no such folder)" in msg


# ---- 6. the README -----------------------------------------------------------------------------


def test_readme_data_section_explains_no_verify_for_own_copies():
    data = README.read_text().split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    assert "--no-verify" in data and "data.verify" in data
