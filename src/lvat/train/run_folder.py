"""The run folder of `lvat train` and `lvat fit`: one object owns its files and their rules.

A run folder holds one run (each loop adds its own files, e.g. split.json or image grids):

    config.toml  metrics.jsonl  eval.jsonl  checkpoint.pt  results.json  [tensorboard/]
    .lock         while a process has the run open
    abandoned-N/  the files of an earlier attempt that stopped before its first checkpoint

`RunFolder` keeps the rules both loops share, each in one place:

- One process at a time. `open` takes an exclusive, non-blocking `flock` on RUN/.lock and keeps
  it until `close`; a second `lvat train`/`lvat fit` on the same folder fails at once, naming
  the holder's pid. The kernel drops the lock when its process dies (kill -9 included), so a
  lock is never stale; a clean `close` also removes the file.
- Checked before any data loads: `open` creates the folder and the lock file, so a bad,
  read-only or non-directory --out fails in a second, not after the dataset has loaded.
- A fresh run (no --resume) refuses a folder holding checkpoint.pt (resume it instead) or
  results.json (a finished run). The files of an earlier attempt that stopped before its first
  checkpoint (a NaN or a kill early on) cannot be resumed and must not be reused (a stale
  split.json would override data.num_labeled, metrics would append to old rows), so they are
  moved, unchanged, to RUN/abandoned-N/ and the run starts clean: nothing is deleted.
- Resume needs checkpoint.pt. A finished run (its checkpoint at train.steps and a results.json
  for those steps) is a no-op: `open` returns its results and touches no file. A checkpoint past
  train.steps is refused.
- The `.NAME.XXXXXXXX.tmp` files that `lvat.io.atomic_write` leaves when killed mid-write (a
  whole checkpoint's worth) are deleted on open, for this folder's own NAMEs only, under the lock.
- `restore` hands the checkpoint to the loop; only once the loop has loaded it into the model and
  optimizer are the metrics cut back to its step and may `write_config` write config.toml. A
  resume whose overrides do not fit the checkpoint is a one-line error that changes nothing.
- Checkpoints never hold non-finite weights (`check_finite`); an OSError while writing a file
  (a full disk) is a one-line `LvatError` naming the file and the OS error; writes are atomic,
  so the previous checkpoint stays intact.
- Under torchrun only rank 0 (`main=True`) touches the folder and prints; it broadcasts its
  verdict (go on, finished, or an error) so that every rank does the same.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvat.errors import LvatError, RunInUseError, one_line
from lvat.io import atomic_write_text, stale_temps
from lvat.train import checkpoint as ckpt
from lvat.train.monitor import MetricsLog, NonFiniteLoss, stop_advice

try:
    import fcntl
except ImportError:  # pragma: no cover  (no flock on Windows: runs there are not locked)
    fcntl = None  # type: ignore[assignment]

CONFIG, METRICS, EVALS, RESULTS = "config.toml", "metrics.jsonl", "eval.jsonl", "results.json"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
ABANDONED = "abandoned"


def in_use(path: Path) -> bool:
    """Whether a live process holds the run folder `path` open (its RUN/.lock names a running
    pid). Read without taking the lock, so asking never makes a starting run fail."""
    try:
        pid = int((Path(path) / LOCK).read_text().strip())
    except (OSError, ValueError):
        return False  # no lock file (closed cleanly, never opened) or one being written
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # the file of a process killed with -9: stale
    except PermissionError:
        return True  # alive, another user's
    return True


def _os_error(exc: OSError) -> str:
    return exc.strerror or one_line(exc)


class RunFolder:
    """The folder of one run (see the module docstring); a context manager that `close`s.

    Args:
        path: the run folder (--out).
        files: the loop's own files besides config.toml, metrics.jsonl, eval.jsonl and
            tensorboard/ (e.g. split.json): what an attempt without a checkpoint leaves behind.
        keep: paths never moved aside, e.g. a data.split_file the user put into the folder.
        main: this process writes the folder (rank 0 under torchrun; the others only follow).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        files: Iterable[str] = (),
        keep: Iterable[str | Path] = (),
        main: bool = True,
    ) -> None:
        self.path = Path(path)
        self.checkpoint = self.path / ckpt.CHECKPOINT
        self.files = (CONFIG, METRICS, EVALS, TENSORBOARD, *files)
        self.keep = {Path(p).resolve() for p in keep if p}
        self.main = main
        self.resume = False
        self.restored = False
        self.logs: list[MetricsLog] = []
        self._state: dict[str, Any] | None = None  # rank 0's checkpoint, read by `open`
        self._lock: int | None = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening -------------------------------------------------------------------------------

    def open(
        self, *, resume: bool, steps: int, broadcast: Callable[[Any], Any] | None = None
    ) -> dict | None:
        """Check, lock and tidy the folder for a fresh run or a resume to `steps` steps.

        Returns the results of a finished run when resuming it (nothing left to do), else None.
        `broadcast` (torchrun: `World.broadcast`) gives every rank rank 0's verdict.
        """
        self.resume = resume
        verdict: tuple[str, Any] = ("go", None)
        if self.main:
            try:
                finished = self._open(resume, steps)
            except BaseException as exc:
                if broadcast is not None:  # the other ranks stop with the same message
                    broadcast(("error", str(exc) if isinstance(exc, LvatError) else repr(exc)))
                raise
            if finished is not None:
                verdict = ("finished", finished)
        if broadcast is not None:
            verdict = broadcast(verdict)
        what, value = verdict
        if what == "error":
            raise LvatError(value)
        return value if what == "finished" else None

    def _open(self, resume: bool, steps: int) -> dict | None:
        if resume and not self.checkpoint.is_file():
            raise LvatError(f"nothing to resume: {self.checkpoint} does not exist")
        self._take()
        if resume:
            finished = self._check_resume(steps)
            if finished is not None:
                return finished
        else:
            self._check_fresh()
        self._remove_temps()
        return None

    def _take(self) -> None:
        """Create the folder and lock it: a bad --out or a second process fails here, at once."""
        lock = self.path / LOCK
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise LvatError(
                    f"cannot use {self.path} as a run folder ({_os_error(exc)}); pick another --out"
                ) from None
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunInUseError(
                    f"{self.path} is in use by another process (pid {pid}); wait for it to end "
                    "or pick another --out"
                ) from None
            except OSError as exc:  # a filesystem without locks (some network mounts)
                print(f"warning: {self.path} cannot be locked ({_os_error(exc)})", file=sys.stderr)
                break
            # The holder may have removed the file between our open and our lock: then we
            # locked a deleted file, which protects nothing. Start over on the current one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    def _check_resume(self, steps: int) -> dict | None:
        self._state = ckpt.load(self.checkpoint)
        step, elapsed = self._state.get("step"), self._state.get("elapsed")
        for key, value, ok in (
            ("step", step, isinstance(step, int) and step >= 0),
            ("elapsed", elapsed, isinstance(elapsed, int | float) and elapsed >= 0),
        ):  # what the loop continues from (`lvat.train.stepper`)
            if not ok or isinstance(value, bool):
                raise LvatError(
                    f"{self.checkpoint} is not a checkpoint of `lvat train` or `lvat fit` (its "
                    f"{key} is {value!r}); use the checkpoint.pt of a run folder"
                )
        if step > steps:
            raise LvatError(
                f"{self.checkpoint} is at step {step}, past train.steps = {steps}; resume with "
                f"--train.steps {step} or more"
            )
        if step == steps:
            try:
                results = json.loads((self.path / RESULTS).read_text())
            except (OSError, ValueError):  # killed before results.json: the loop writes it
                return None
            if isinstance(results, dict) and results.get("steps") == steps:
                self._state = None
                print(
                    f"note: {self.path} already finished its {steps} steps; results.json is "
                    "unchanged",
                    file=sys.stderr,
                )
                return results
        return None

    def _check_fresh(self) -> None:
        run = self.path
        if self.checkpoint.exists():
            raise LvatError(
                f"{run} already holds a run; add --resume {run} to continue it or pick another "
                "--out"
            )
        if (run / RESULTS).exists():
            raise LvatError(
                f"{run} holds the results.json of a finished run (but no {ckpt.CHECKPOINT}); "
                "pick another --out"
            )
        leftovers = [
            run / name
            for name in self.files
            if (run / name).exists() and (run / name).resolve() not in self.keep
        ]
        if not leftovers:
            return
        n = 1
        while (run / f"{ABANDONED}-{n}").exists():
            n += 1
        aside = run / f"{ABANDONED}-{n}"
        aside.mkdir()
        for p in leftovers:
            os.replace(p, aside / p.name)
        names = ", ".join(p.name for p in leftovers)
        print(
            f"note: {run} held files of an attempt with no checkpoint to resume from (it stopped "
            f"before its first, or its checkpoint stayed on another machine); moved {names} to "
            f"{aside} and starting afresh",
            file=sys.stderr,
        )

    def _remove_temps(self) -> None:
        names = (ckpt.CHECKPOINT, RESULTS, *self.files)
        for p in stale_temps(self.path, names):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the metrics logs and release the lock (removing the lock file)."""
        for log in self.logs:
            log.close()
        self.logs = []
        if self._lock is None:
            return
        fd, self._lock = self._lock, None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.path / LOCK)):
                os.unlink(self.path / LOCK)  # while still holding it: see `_take`
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- the run's files -----------------------------------------------------------------------

    def log(self, name: str, tensorboard: bool = False) -> MetricsLog | None:
        """The JSON-lines log RUN/name (None on ranks that do not write)."""
        if not self.main:
            return None
        log = MetricsLog(self.path / name, tensorboard)
        self.logs.append(log)
        return log

    def restore(self, apply: Callable[[dict[str, Any]], Any]) -> dict[str, Any] | None:
        """Resume: load the checkpoint and hand it to `apply` (which loads the model, optimizer,
        streams, RNG), then cut the logs back to its step; returns the checkpoint. A fresh run:
        None. A checkpoint the model or optimizer cannot take (changed model settings) is a
        one-line `LvatError`, raised before anything is written."""
        if not self.resume:
            self.restored = True
            return None
        state = self._state if self._state is not None else ckpt.load(self.checkpoint)
        self._state = None
        try:
            apply(state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            first = one_line(exc, 200)
            raise LvatError(
                f"{self.checkpoint} does not fit this config ({first}); resume without changing "
                "the model or optimizer settings"
            ) from None
        step = int(state["step"])
        kept = [log.kept_through(step) for log in self.logs]  # every file checked before writing
        for log, (lines, changed) in zip(self.logs, kept, strict=True):
            if changed:
                log.replace(lines)
        self.restored = True
        return state

    def write_config(self, cfg: Any) -> None:
        """config.toml: only after `restore`, so it always describes the checkpoint."""
        if not self.restored:
            raise RuntimeError("write_config before restore: config.toml could mismatch")
        if self.main:
            from lvat.config import save_config

            self._write(self.path / CONFIG, lambda path: save_config(cfg, path))

    def check_finite(self, model: nn.Module, step: int, hint: str) -> None:
        """Stop before a checkpoint would hold NaN or infinite weights."""
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise NonFiniteLoss(
                f"non-finite weights at step {step}; training stopped and "
                f"{stop_advice(self.checkpoint, hint)}"
            )

    def write_checkpoint(self, write: Callable[[Path], Any]) -> None:
        """`write(path)` the checkpoint (atomically); an OSError is a one-line `LvatError`."""
        self._write(self.checkpoint, write, previous=True)

    def write_results(self, results: dict) -> None:
        """results.json, atomically (the last file a run writes)."""
        text = json.dumps(results, indent=1) + "\n"
        self._write(self.path / RESULTS, lambda path: atomic_write_text(path, text))

    def _write(self, path: Path, write: Callable[[Path], Any], previous: bool = False) -> None:
        had = self.checkpoint.is_file()
        try:
            write(path)
        except OSError as exc:
            if not had:
                then = "no checkpoint was saved: make room, then start the run again"
            else:
                what = "previous checkpoint" if previous else f"checkpoint in {self.checkpoint}"
                then = f"the {what} is intact: make room, then continue with --resume {self.path}"
            raise LvatError(f"could not write {path} ({_os_error(exc)}); {then}") from None
