"""The bookkeeping around a training step, shared by `lvat train` and `lvat fit`.

A loop sets up its model, data and run folder, then hands the schedule of logging, evaluation
and checkpoints to a `Stepper` and writes only what one step of its method does:

    steps = Stepper(tc, STATS, run, metrics, world, resumed=state, stop_at=stop_at, hint=HINT)
    for step in steps.run(evaluate=run_eval, save=save):
        ...                                   # one step of the method
        steps.add(stats, lr=lr)               # its metrics (a device tensor) and scalars
    if not steps.finished:
        return steps.unfinished()             # {"step": k, "finished": False}

After the body of every step, `run` does, in this order:

- a log row, every `log_every` steps, at every checkpoint and at the last step: the metrics
  summed on the device over the window are read back once (averaged over ranks under torchrun:
  a collective every rank takes part in), a NaN or infinity stops training (`window_means`), and
  rank 0 appends `{"step", *metrics, *extra, *scalars, "steps_per_s", "time_s"}` to
  metrics.jsonl and moves the progress bar;
- an evaluation (rank 0 only), every `eval_every` steps and at the last step;
- a checkpoint, every `checkpoint_every` steps and at the last step, on every rank (`save` may be
  a collective; only rank 0 writes).

The steps run from the resumed checkpoint's step (0 for a fresh run) to `min(steps, stop_at)`;
a stop before `train.steps` leaves the run resumable.

Time, one definition for both loops:

- `steps_per_s` measures training only: the window's steps divided by the host wall-clock
  seconds spent in their bodies, up to this row's read-back of the metrics (which waits for the
  device). What `run` does after a step (evaluations, checkpoints, probes, writing rows) is left
  out, so a window with an evaluation or a checkpoint runs at the same rate as one without.
- `time_s` (and `time_s()`, which checkpoints store as "elapsed") is everything: the wall-clock
  seconds of the whole run so far, evaluations and checkpoints included, summed over resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from lvat.train.distributed import World
from lvat.train.monitor import MetricsLog, Progress, window_means
from lvat.train.run_folder import RunFolder


class Schedule(Protocol):
    """The keys of a `train` section the stepper reads (`TrainConfig`, `FitTrainConfig`)."""

    steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    progress: bool


class Stepper:
    """Runs steps `start` .. `min(schedule.steps, stop_at)` with logging, evals and checkpoints.

    Args:
        schedule: the run's `train` section (steps and the every-N-steps keys, progress).
        names: the metrics a step reports, in the order of `add`'s tensor.
        run: the run folder (its checkpoint path goes into the NaN message).
        metrics: metrics.jsonl (None on ranks that do not write).
        world: this process's place under torchrun (`World(device=...)`: a single process);
            the metric sums live on its device.
        resumed: the checkpoint `run.restore` loaded, whose "step" and "elapsed" (seconds)
            the run continues from; None for a fresh run.
        stop_at: stop after this many total steps without finishing (None: run them all).
        hint: what to lower after a NaN ("train.lr or method.eps").
    """

    def __init__(
        self,
        schedule: Schedule,
        names: Sequence[str],
        run: RunFolder,
        metrics: MetricsLog | None,
        world: World,
        *,
        resumed: dict[str, Any] | None,
        stop_at: int | None,
        hint: str,
    ) -> None:
        self.schedule, self.names, self.folder, self.metrics = schedule, tuple(names), run, metrics
        self.world, self.hint = world, hint
        # Where an earlier process stopped: its checkpoint's step and wall-clock seconds.
        self.start = int(resumed["step"]) if resumed is not None else 0
        self.elapsed = float(resumed["elapsed"]) if resumed is not None else 0.0
        self.total = schedule.steps
        self.end = min(schedule.steps, stop_at) if stop_at is not None else schedule.steps
        self.sums = torch.zeros(len(self.names), device=world.device)
        self.evaluation: dict = {}  # what the last `evaluate` returned ({} before any)
        self._scalars: dict[str, Any] = {}
        self._extra: Callable[[], dict] | None = None
        self.t0 = time.perf_counter()

    @property
    def finished(self) -> bool:
        """Whether `run` goes (went) through the last step of the schedule."""
        return self.end == self.total

    def time_s(self) -> float:
        """Wall-clock seconds of the whole run so far, earlier processes included."""
        return self.elapsed + time.perf_counter() - self.t0

    def add(self, stats: torch.Tensor, extra: Callable[[], dict] | None = None, **scalars) -> None:
        """Record this step: `stats` (one value per name, on the device) joins the window's sums;
        `scalars` (e.g. lr) go into the next row as they are at its last step; `extra()`, if the
        step ends a window, adds its keys to the row after the metrics (e.g. a probe)."""
        self.sums += stats
        self._scalars, self._extra = scalars, extra

    def run(
        self,
        *,
        evaluate: Callable[[int], dict],
        save: Callable[[int], None],
        watch: Callable[[dict, int], None] | None = None,
    ) -> Iterator[int]:
        """Yield the step numbers; after each step's body, log, evaluate and save as scheduled.

        `evaluate(done)` (rank 0) returns the evaluation row; `save(done)` runs on every rank;
        `watch(row, first)` (rank 0) sees each row before it is written, `first` being the
        window's first step (e.g. to warn about it).
        """
        s, main = self.schedule, self.world.is_main
        progress = Progress(self.end, self.start, s.progress and main)
        window, train_s = 0, 0.0  # steps and training seconds since the last row
        since = time.perf_counter()  # when training (re)started
        for step in range(self.start, self.end):
            yield step
            window += 1
            done = step + 1
            last = done == self.end
            saving = done % s.checkpoint_every == 0 or last
            logging = done % s.log_every == 0 or saving
            evaluating = main and (done % s.eval_every == 0 or last)
            if not (logging or evaluating):
                continue
            means = None
            if logging:  # the read-back: the window's steps are done when it returns
                sums = self.world.mean(self.sums)  # a collective: every rank calls it
                means = window_means(
                    sums, window, done, self.folder.checkpoint, self.hint, self.names
                )
            now = time.perf_counter()
            train_s += now - since
            if means is not None:
                row = {
                    "step": done,
                    **dict(zip(self.names, means, strict=True)),
                    **(self._extra() if self._extra is not None else {}),
                    **self._scalars,
                    "steps_per_s": window / train_s,
                    "time_s": self.elapsed + now - self.t0,
                }
                if main:
                    if watch is not None:
                        watch(row, done - window + 1)
                    self.metrics.write(row)  # type: ignore[union-attr]
                progress.update(done, loss=row["loss"])
                self.sums.zero_()
                window, train_s = 0, 0.0
            if evaluating:
                self.evaluation = evaluate(done)
            if saving:
                save(done)
            since = time.perf_counter()  # steps/s counts none of the above
        progress.close()

    def unfinished(self) -> dict:
        """The result of a run stopped at `stop_at`, once every rank is there (so nobody leaves,
        and maybe resumes, before rank 0 has saved)."""
        self.world.barrier()
        return {"step": self.end, "finished": False}
