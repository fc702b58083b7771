"""Atomic file writes: a crash or a full disk never leaves a half-written file behind.

A write goes to `.NAME.XXXXXXXX.tmp` beside NAME, then is renamed over it. A process killed
mid-write (kill -9, power loss) leaves that temp file behind; `stale_temps` finds them so their
owner (e.g. a run folder, under its lock) can delete them.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

_SUFFIX = ".tmp"
# mkstemp's names: prefix, 8 characters of "abcdefghijklmnopqrstuvwxyz0123456789_", suffix.
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(_SUFFIX))


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_SUFFIX, dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def stale_temps(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """The temp files `atomic_write` left in `folder` for files called one of `names`.

    Only `.NAME.XXXXXXXX.tmp` with NAME in `names` matches, so other programs' files stay. Only
    a caller that knows no write to those names is in progress (e.g. one holding the folder's
    lock) may delete them.
    """
    names = set(names)
    found = []
    for entry in os.scandir(folder):
        m = _TEMP.fullmatch(entry.name)
        if m and m["name"] in names and entry.is_file(follow_symlinks=False):
            found.append(Path(entry.path))
    return sorted(found)
