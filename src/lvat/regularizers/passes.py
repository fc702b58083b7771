"""`UnlabeledPasses`: how the classifier is called inside a regularizer (docs/method.md §1.6-1.7).

The authors' code treats the classifier calls of one VAT/LVAT step (the clean target, the power
iteration's probes, the adversarial point) in three ways that differ from a plain forward pass:

- **BatchNorm** normalises each pass with its own batch statistics but never updates the running
  statistics: only the labeled pass does (`common.frozen_bn_stats`).
- **Dropout** draws the same masks in every pass of one step (vat_tf does this on purpose): the
  generator is snapshotted once and restored before each call (`common.RngSnapshot`), so it ends
  one pass past the snapshot and the next step draws fresh masks. On the CPU the `nn.Dropout`
  masks are drawn in the first pass only and reused after (`common.ReusedDropoutMasks`; the same
  masks bit for bit, a third of dropout's cost).
- **Precision**: the passes whose inputs differ by ~xi run in true float32 (`precise()`: autocast
  off, TF32 off), because a bf16/TF32 probe rounds away and g == 0; the adversarial pass (and the
  exact power iteration, which has no xi) runs in the caller's precision.

All three live in this one context so that the algorithm (`algorithm.py`) reads like Alg. 1/2.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from lvat.regularizers.common import (
    ReusedDropoutMasks,
    RngSnapshot,
    frozen_bn_stats,
    full_precision,
)

__all__ = ["UnlabeledPasses"]


class UnlabeledPasses:
    """`with UnlabeledPasses(model, device) as classify: logits = classify(x_in)`.

    Enter it after drawing the step's random numbers (d): the dropout snapshot is taken on entry.
    The BatchNorm flags are restored on exit, also when the body raises.
    """

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:
        self.model = model
        self.device = torch.device(device)
        self._bn: AbstractContextManager[None] | None = None
        self._rng: RngSnapshot | None = None
        self._after: RngSnapshot | None = None  # the generators after the first pass
        self._masks = ReusedDropoutMasks(model)

    def __enter__(self) -> UnlabeledPasses:
        self._bn = frozen_bn_stats(self.model)
        self._bn.__enter__()
        self._rng = RngSnapshot(self.device)
        self._after = None
        self._masks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._bn is not None
        self._masks.__exit__(*exc)
        self._bn.__exit__(*exc)
        if self._after is not None:  # one pass past the snapshot, also when later passes reused
            self._after.restore()  # the first pass's masks and drew none

    def __call__(self, x_in: Tensor) -> Tensor:
        """The classifier's logits on `x_in`, with this step's dropout masks."""
        assert self._rng is not None, "use UnlabeledPasses as a context manager"
        self._rng.restore()
        self._masks.new_pass()
        logits = self.model(x_in)
        if self._after is None:
            self._after = RngSnapshot(self.device)
        return logits

    def precise(self) -> AbstractContextManager[None]:
        """True float32 inside: no autocast, no TF32 (for probes at rounding level and decode)."""
        return full_precision(self.device)
