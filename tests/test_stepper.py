"""lvat.train.stepper: the schedule around a step, and the one definition of steps/s."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import torch

from lvat.train.distributed import World
from lvat.train.monitor import MetricsLog, NonFiniteLoss
from lvat.train.run_folder import RunFolder
from lvat.train.stepper import Stepper


@dataclass
class Schedule:
    steps: int = 7
    log_every: int = 2
    eval_every: int = 3
    checkpoint_every: int = 4
    progress: bool = False


def _stepper(tmp_path, schedule=None, **kw) -> tuple[Stepper, MetricsLog]:
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    args = {"resumed": None, "stop_at": None, "hint": "train.lr"} | kw
    run, world = RunFolder(tmp_path), World()
    steps = Stepper(schedule or Schedule(), ("loss", "ce"), run, metrics, world, **args)
    return steps, metrics


def _rows(tmp_path) -> list[dict]:
    return [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_rows_evals_and_checkpoints_come_on_schedule_in_order(tmp_path):
    steps, _ = _stepper(tmp_path)
    calls = []
    evaluate = lambda done: calls.append(("eval", done)) or {"step": done}  # noqa: E731
    watch = lambda row, first: calls.append(("row", first, row["step"]))  # noqa: E731
    for step in steps.run(
        evaluate=evaluate, save=lambda done: calls.append(("save", done)), watch=watch
    ):
        steps.add(torch.tensor([step, 2.0 * step]), lambda: {"probe": 1}, lr=0.1 * step)
    assert calls == [
        ("row", 1, 2), ("eval", 3), ("row", 3, 4), ("save", 4),
        ("row", 5, 6), ("eval", 6), ("row", 7, 7), ("eval", 7), ("save", 7),
    ]  # fmt: skip
    rows = _rows(tmp_path)
    assert [list(r) for r in rows] == [
        ["step", "loss", "ce", "probe", "lr", "steps_per_s", "time_s"]
    ] * 4
    assert [r["loss"] for r in rows] == [0.5, 2.5, 4.5, 6.0]  # window means of the step numbers
    assert rows[-1]["lr"] == pytest.approx(0.6)  # the window's last step
    assert steps.finished and steps.evaluation == {"step": 7}


def test_steps_per_s_counts_training_only(tmp_path):
    """Evaluations and checkpoints do not slow the rate; time_s counts them."""
    steps, _ = _stepper(tmp_path, Schedule(steps=4, log_every=2, eval_every=1, checkpoint_every=2))
    pause = lambda done: time.sleep(0.2) or {}  # noqa: E731
    for _ in steps.run(evaluate=pause, save=pause):
        time.sleep(0.01)
        steps.add(torch.zeros(2))
    rows = _rows(tmp_path)
    assert all(15 < r["steps_per_s"] < 110 for r in rows), rows  # ~0.01 s a step, not ~0.3
    assert rows[-1]["time_s"] > 0.8 and steps.time_s() > 1.2  # 3 evals + 1 save, then 2 more


def test_a_stop_before_the_end_is_unfinished(tmp_path):
    steps, _ = _stepper(tmp_path, resumed={"step": 2, "elapsed": 100.0}, stop_at=5)
    saved = []
    for _ in steps.run(evaluate=lambda done: {}, save=saved.append):
        steps.add(torch.ones(2))
    assert saved == [4, 5] and not steps.finished
    assert steps.unfinished() == {"step": 5, "finished": False}
    assert [r["step"] for r in _rows(tmp_path)] == [4, 5] and steps.time_s() >= 100.0


def test_a_nan_stops_before_the_checkpoint(tmp_path):
    steps, _ = _stepper(tmp_path)
    saved = []
    with pytest.raises(NonFiniteLoss, match="between steps 3 and 4"):
        for step in steps.run(evaluate=lambda done: {}, save=saved.append):
            steps.add(torch.tensor([float("nan") if step == 3 else 0.0, 0.0]))
    assert saved == []
