"""Getting dataset files onto disk safely: cache folder, checksums, downloads, tar extraction."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from lvat.errors import ChecksumError, DatasetError

_CHUNK = 1 << 20  # 1 MiB reads keep memory flat on the 180 MB SVHN file


def cache_dir() -> Path:
    """Where downloads go: `$LVAT_DATA`, else `~/.cache/lvat`."""
    env = os.environ.get("LVAT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lvat"


def md5sum(path: str | Path, *, decompress: bool = False) -> str:
    """MD5 hex digest of a file, or of its gzip-decompressed content."""
    digest = hashlib.md5(usedforsecurity=False)
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, md5: str, content_md5: str = "", *, hint: str = "") -> None:
    """Raise ChecksumError unless `path` has MD5 `md5` (or, for .gz, decompressed `content_md5`).

    The content checksum accepts re-compressed copies of the same data, such as Debian's
    dataset-fashion-mnist package, whose .gz files differ in bytes but not in content.
    """
    actual = md5sum(path)
    if actual == md5:
        return
    if content_md5 and path.suffix == ".gz":
        try:
            if md5sum(path, decompress=True) == content_md5:
                return
        except (OSError, EOFError, gzip.BadGzipFile):
            pass
    raise ChecksumError(
        f"{path}: MD5 {actual} does not match the official {md5}; the file is corrupt or not "
        f"the official release. Delete it and download it again{hint}, or set "
        f"data.verify=false (--no-verify) if you trust it"
    )


def download(urls: Sequence[str], dest: Path, md5: str, *, timeout: float = 60.0) -> Path:
    """Fetch the first URL that works into `dest` (via a .part file), verified before it lands."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        try:
            print(f"downloading {url} -> {dest}", flush=True)
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
                shutil.copyfileobj(response, f, _CHUNK)
            verify_md5(part, md5)
            os.replace(part, dest)
            return dest
        except (urllib.error.URLError, OSError, ChecksumError) as exc:
            errors.append(f"{url}: {exc}")
            part.unlink(missing_ok=True)
    raise DatasetError("download failed: " + "; ".join(errors))


def _inside(root: Path, target: Path) -> bool:
    try:
        target.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing any member that would land outside `dest`.

    Refused: absolute paths, `..` components, links pointing outside, and device/FIFO members.
    Every member is checked before anything is written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                target = dest / m.name
                bad = (
                    Path(m.name).is_absolute()
                    or ".." in Path(m.name).parts
                    or not _inside(dest, target)
                    or m.isdev()
                    or (m.issym() and not _inside(dest, target.parent / m.linkname))
                    or (m.islnk() and not _inside(dest, dest / m.linkname))
                )
                if bad:
                    raise DatasetError(
                        f"{archive}: refusing to extract member '{m.name}', which would escape "
                        f"{dest}; the archive is not the official one"
                    )
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: a second, stdlib guard
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        msg = f"{archive}: cannot read the archive ({exc}); delete it and retry"
        raise DatasetError(msg) from None
