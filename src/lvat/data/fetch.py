"""Getting dataset files onto disk safely: cache folder, checksums, downloads, tar extraction."""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from lvat.errors import ChecksumError, DatasetError, one_line

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
    try:
        actual = md5sum(path)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({one_line(exc)})") from None
    if actual == md5:
        return
    if content_md5 and path.suffix == ".gz":
        try:
            if md5sum(path, decompress=True) == content_md5:
                return
        except (OSError, EOFError, zlib.error):  # corrupt gzip data: the MD5 error says so
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
    """True if `target`, following any links already on disk, lies in `root` (or is it)."""
    try:
        target.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _member_problem(m: tarfile.TarInfo, dest: Path, kinds: dict[str, bool]) -> str:
    """Why member `m` must not be extracted into `dest` ('' if it may).

    `kinds` maps the normalized paths of the members listed before `m` to "is a folder".
    """
    if m.issym() or m.islnk():
        return f"it is a {'symbolic' if m.issym() else 'hard'} link to {m.linkname!r}"
    if not (m.isreg() or m.isdir()):
        return "it is a device, FIFO or other special file"
    parts = PurePosixPath(m.name).parts
    if PurePosixPath(m.name).is_absolute():
        return "its path is absolute"
    if ".." in parts:
        return "its path goes up with '..'"
    norm = posixpath.normpath(m.name)
    if norm == "." and not m.isdir():
        return "it would replace the target folder itself"
    norm_parts = PurePosixPath(norm).parts
    for i in range(1, len(norm_parts)):
        above = "/".join(norm_parts[:i])
        if kinds.get(above) is False:
            return f"its path goes through {above!r}, an earlier member that is not a folder"
        on_disk = dest.joinpath(*norm_parts[:i])
        if (on_disk.exists() or on_disk.is_symlink()) and not on_disk.is_dir():
            return f"its path goes through {on_disk}, which exists and is not a folder"
    if norm in kinds and kinds[norm] != m.isdir():
        return "an earlier member of the same name is a " + ("folder" if kinds[norm] else "file")
    target = dest / norm
    if not _inside(dest, target):
        return f"it would land outside {dest} (through a link already there)"
    if target.is_dir() != m.isdir() and (target.exists() or target.is_symlink()):
        return f"{target} already exists and is {'not ' if m.isdir() else ''}a folder"
    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: a second, stdlib guard
        try:
            tarfile.data_filter(m, str(dest))
        except tarfile.FilterError as exc:
            return f"the standard library's data filter refuses it ({one_line(exc)})"
    return ""


def _write_member(tar: tarfile.TarFile, m: tarfile.TarInfo, target: Path) -> None:
    """Write a checked member: folders are created, files land whole (via a .part file) and
    never replace a file already there."""
    if m.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    if target.exists() or target.is_symlink():
        return  # keep what is there: verification (MD5) or reading judges it
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    src = tar.extractfile(m)
    if src is None:  # pragma: no cover - regular members always have a file object
        raise tarfile.ExtractError(f"member {m.name} has no data")
    with src, open(part, "xb") as out:  # "x": never through a link or over a leftover
        try:
            shutil.copyfileobj(src, out, _CHUNK)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, target)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive of regular files and folders into `dest`, on any Python version.

    Every member is checked before anything is written; the whole archive is refused if one
    member is a symbolic or hard link, a device, FIFO or other special file, has an absolute
    path or a `..` component, goes through an earlier member (or a file already on disk) that is
    not a folder, would land outside `dest` through a link already in `dest`, or is refused by
    the standard library's `tarfile.data_filter` where Python has it. (The official CIFAR-10
    archive holds only files and folders.) Files already in `dest` are kept, never overwritten;
    each file is written to a temporary name and renamed, so no half-written file remains.
    """
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            kinds: dict[str, bool] = {}
            for m in members:
                problem = _member_problem(m, dest, kinds)
                if problem:
                    problem = problem.replace("\n", "\\n").replace("\r", "\\r")
                    raise DatasetError(
                        f"{archive}: refusing to extract member {m.name!r}: {problem}; nothing "
                        f"was extracted. The archive is not the official one: delete it and "
                        f"download it again"
                    )
                kinds[posixpath.normpath(m.name)] = m.isdir()
            dest.mkdir(parents=True, exist_ok=True)
            for m in members:
                _write_member(tar, m, dest / posixpath.normpath(m.name))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DatasetError(
            f"{archive}: cannot read or extract the archive ({one_line(exc)}); if it is "
            f"corrupt, delete it and download it again"
        ) from None
