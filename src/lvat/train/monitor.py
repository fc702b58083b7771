"""Watching a run: metrics files (JSONL, optional TensorBoard) and a progress bar with ETA."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lvat.errors import ConfigError, LvatError, one_line
from lvat.io import atomic_write_text


class NonFiniteLoss(LvatError):
    """The training loss became NaN or infinite."""


def stop_advice(checkpoint: Path, hint: str) -> str:
    """What to do after training stopped on a NaN or infinity: resume from the last good
    checkpoint when there is one, else start again (`hint` says what to change)."""
    if checkpoint.is_file():
        return (
            f"the last good checkpoint in {checkpoint} is intact. Lower {hint}, then continue "
            f"with --resume {checkpoint.parent}"
        )
    return (
        f"no checkpoint was saved yet, so there is nothing to resume. Lower {hint} and start "
        f"the run again (in the same folder its files so far are moved aside)"
    )


def window_means(
    sums: Any, window: int, done: int, checkpoint: Path, hint: str, names: tuple[str, ...] = ()
) -> list[float]:
    """Mean of the metrics summed over the last `window` steps (one host sync), or stop.

    A NaN or infinity stops training before any checkpoint holds its weights; the message says
    whether `checkpoint` can be resumed and `hint` what to change (e.g. "train.lr or method.eps").
    With the metrics' `names`, a nonzero "nonfinite_latent" names the transformer as the cause.
    """
    means = (sums / window).tolist()
    if not all(math.isfinite(v) for v in means):
        where = f"non-finite loss between steps {done - window + 1} and {done}"
        share = dict(zip(names, means, strict=False)).get("nonfinite_latent", 0.0)
        if math.isfinite(share) and share > 0:
            raise NonFiniteLoss(
                f"{where}: the transformer encoded {share:.2%} of the unlabeled images to "
                "non-finite latents (it overflows on them), so lowering the lr will not help; "
                "use weights whose model card counts 0 `nonfinite` images, or refit it. "
                f"Training stopped; the last checkpoint, if any, in {checkpoint.parent} is intact"
            )
        raise NonFiniteLoss(f"{where}; training stopped and {stop_advice(checkpoint, hint)}")
    return means


def _short(exc: BaseException) -> str:
    return one_line(exc, 120)


def _os_error(exc: OSError) -> str:
    """`No space left on device`: the OS error of `exc` without Python's decoration."""
    return exc.strerror or _short(exc)


def _jsonable(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) else v


class MetricsLog:
    """Appends one JSON object per line to `path`; mirrors scalars to TensorBoard if asked."""

    def __init__(self, path: Path, tensorboard: bool = False):
        self.path = path
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "train.tensorboard=true needs TensorBoard: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def kept_through(self, step: int) -> tuple[list[str], bool]:
        """The lines to keep when cutting the file back to `step`, and whether that changes it.

        Rows are appended one `write` at a time, so only the last line can be torn (a full disk,
        a crash, zeros after a power loss): it is dropped with a note on stderr. A bad line
        before it is no interrupted write but damage from elsewhere; guessing would lose or keep
        the wrong rows, so it is an `LvatError` naming the line, and nothing is changed.
        """
        if not self.path.is_file():
            return [], False
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()  # the file ends with a newline, as every complete write leaves it
        keep, changed = [], False
        for i, raw in enumerate(lines):
            if not raw.strip():
                changed = True  # a blank line holds no row
                continue
            try:
                row = json.loads(raw)
                if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                    raise ValueError("no integer step")
            except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError too
                if i < len(lines) - 1:
                    raise LvatError(
                        f"{self.path} line {i + 1} is not a JSON row ({_short(exc)}); only a torn "
                        "last line is repaired automatically: fix or delete that line, then resume"
                    ) from None
                print(
                    f"note: {self.path}: dropped a torn last line (an interrupted write): "
                    f"{raw[:60]!r}",
                    file=sys.stderr,
                )
                changed = True
                continue
            if row["step"] <= step:
                keep.append(raw.decode("utf-8"))
            else:
                changed = True  # written after the checkpoint: the resumed run writes it again
        return keep, changed or (bool(data) and not data.endswith(b"\n"))  # no final newline

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows the interrupted run wrote after its last checkpoint (and a torn
        last line); the file is replaced atomically, and only if something changes."""
        keep, changed = self.kept_through(step)
        if changed:
            self.replace(keep)

    def replace(self, lines: list[str]) -> None:
        """Atomically make the file exactly `lines` (from `kept_through`)."""
        try:
            atomic_write_text(self.path, "".join(r + "\n" for r in lines))
        except OSError as exc:
            raise LvatError(f"could not write {self.path} ({_os_error(exc)})") from None

    def write(self, row: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        except OSError as exc:
            raise LvatError(
                f"could not write {self.path} ({_os_error(exc)}); make room, then run again "
                f"(with --resume {self.path.parent} once it holds a checkpoint.pt)"
            ) from None
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.writer.add_scalar(f"{self.path.stem}/{k}", v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


LOG_LINE = "step {n_fmt}/{total_fmt}  {percentage:5.1f}%  {rate_fmt}  ETA {remaining}"


class Progress:
    """`step 1200/48000  2.5%  12.3 step/s  ETA 1:05:12  loss 0.531`-style progress on stderr.

    A tqdm bar redrawn in place on a terminal; elsewhere (log files) tqdm's same line, printed
    plainly at most every 30 s, so a log reads top to bottom without carriage returns.
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self.total, self.start, self.enabled = total, start, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and self.tty:
            self.bar = tqdm(
                total=total, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def update(self, step: int, **info: float) -> None:
        if not self.enabled:
            return
        postfix = {k: f"{v:.4g}" for k, v in info.items()}
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.last < 30.0 and step < self.total:
            return
        self.last = now
        from tqdm import tqdm

        line = tqdm.format_meter(
            step, self.total, now - self.t0, unit=" step", initial=self.start, bar_format=LOG_LINE
        )
        extra = "".join(f"  {k} {v}" for k, v in postfix.items())
        print(line + extra, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
