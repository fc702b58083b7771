"""One training step: the code `lvat train` runs every update and `lvat bench` times.

Cross-entropy on the labeled batch (the only pass that updates BatchNorm running statistics),
plus alpha times the regularizer's consistency cost on the unlabeled batch, one backward, one
Adam update. The step returns its metrics as one detached device tensor and reads nothing back
to the host, so the caller decides when to synchronise (the loop: once per `log_every` steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvat.data import Batch
from lvat.regularizers import Latent, Regularizer

# The rows of `train_step`'s result. zero_direction: the fraction of the unlabeled batch whose
# perturbation vanished (`lvat.regularizers.common.zero_direction`); 0 without a regularizer.
# nonfinite_latent: the fraction whose transformer latent was not finite (LVAT; `window_means`
# names it when the loss turns NaN). saturated_decode: the fraction whose adversarial decode left
# the data manifold so far that a saturating decoder clamped it (LVAT-Glow, `glow.REVERSE_BOUND`).
# A regularizer's stats are an open dict: a row it does not report is 0, other keys are not kept.
STATS = (
    "loss",
    "ce",
    "kl",
    "entropy",
    "adv_l2",
    "zero_direction",
    "nonfinite_latent",
    "saturated_decode",
)


def autocast(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """`torch.autocast` to `amp_dtype` on `device`, or nothing when `amp_dtype` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def train_step(
    model: nn.Module,
    regularizer: Regularizer | None,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    alpha: float,
    amp_dtype: torch.dtype | None = None,
    *,
    z_unlabeled: Latent | None = None,
    sync: Callable[[], None] | None = None,
) -> Tensor:
    """One parameter update; returns the detached float32 stats (len(STATS),) in `STATS` order.

    Args:
        model: the classifier, in train mode.
        regularizer: the method's `Regularizer` (VAT, LVAT, a plugin's) or None (supervised
            only: kl, entropy, adv_l2 and zero_direction are 0).
        optimizer: its optimiser, lr already set for this step.
        batch: labeled images and labels, unlabeled images, all on the model's device.
        alpha: weight of the consistency cost.
        amp_dtype: autocast dtype for the classifier passes (None = float32). The regularizer
            keeps the finite difference's target and probe passes in float32 regardless
            (`full_precision`).
        z_unlabeled: encode(batch.x_unlabeled) from a latent cache, passed on as the cached
            keyword `z` (LVAT uses it; None: not cached).
        sync: called between backward and the update (data-parallel gradient averaging).
    """
    device = batch.x_labeled.device
    with autocast(device, amp_dtype):
        ce = F.cross_entropy(model(batch.x_labeled), batch.y_labeled)  # updates BN statistics
        loss, zero = ce, ce.new_zeros(())
        stats = {"kl": zero, "entropy": zero, "adv_l2": zero, "zero_direction": zero}
        if regularizer is not None:
            reg_loss, stats = regularizer.loss_and_stats(model, batch.x_unlabeled, z=z_unlabeled)
            loss = ce + alpha * reg_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync is not None:
        sync()
    optimizer.step()
    # A stat the regularizer does not report (e.g. a user's without adv_l2) counts as 0.
    row = [loss.detach(), ce.detach(), *(stats.get(k, zero) for k in STATS[2:])]
    return torch.stack(row).float()
