"""Training: the one loop for SL/SSL x {sup, VAT, LVAT}, its step, schedule, fast path,
data-parallel helpers (torchrun), checkpoints and runs."""

from lvat.train.loop import NonFiniteLoss, train
from lvat.train.runs import Run, evaluate_run, load_run

__all__ = ["NonFiniteLoss", "Run", "evaluate_run", "load_run", "train"]
