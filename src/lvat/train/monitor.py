"""Watching a run: metrics files (JSONL, optional TensorBoard) and a progress bar with ETA."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lvat.errors import ConfigError, LvatError


class NonFiniteLoss(LvatError):
    """The training loss became NaN or infinite."""


def window_means(sums: Any, window: int, done: int, checkpoint: Path, hint: str) -> list[float]:
    """Mean of the metrics summed over the last `window` steps (one host sync), or stop.

    A NaN or infinity stops training before any checkpoint holds its weights; `hint` says
    what to change (e.g. "train.lr or method.eps").
    """
    means = (sums / window).tolist()
    if not all(math.isfinite(v) for v in means):
        raise NonFiniteLoss(
            f"non-finite loss between steps {done - window + 1} and {done}; training stopped "
            f"and the last good checkpoint in {checkpoint} is intact. Lower {hint}, then "
            f"continue with --resume"
        )
    return means


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

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows the interrupted run wrote after its last checkpoint."""
        if not self.path.is_file():
            return
        keep = [
            r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= step
        ]
        self.path.write_text("".join(r + "\n" for r in keep))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
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


class Progress:
    """`step 1200/48000  2.5%  12.3 step/s  ETA 1:05:12  loss 0.531` on stderr.

    Redrawn in place on a terminal; otherwise a plain line at most every 30 s (log files).
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.text = ""

    def update(self, step: int, **info: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (
            now - self.last < (0.5 if self.tty else 30.0) and step < self.total
        ):
            return
        self.last = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        extra = "  ".join(f"{k} {v:.4g}" for k, v in info.items())
        self.text = (
            f"step {step}/{self.total}  {100 * step / self.total:5.1f}%  {rate:.2f} step/s  "
            f"ETA {_clock(eta) if eta == eta else '?'}  {extra}"
        )
        print(
            ("\r" if self.tty else "") + self.text,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled and self.tty and self.text:
            print(file=sys.stderr)
