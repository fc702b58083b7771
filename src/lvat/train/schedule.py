"""The paper's optimiser schedule (section 5.2, after vat_tf): constant, then a linear decay."""

from __future__ import annotations

import torch

from lvat.config import TrainConfig


def lr_and_beta1(step: int, cfg: TrainConfig) -> tuple[float, float]:
    """Learning rate and Adam beta1 for update `step` (0-based).

    Constant `lr` and `beta1` until the last `decay_steps` updates; then the lr falls linearly
    to 0 (it would reach 0 one step after the last update) and beta1 becomes `decay_beta1`.
    vat_tf changes the lr once per 400-update "epoch"; we change it every update.
    """
    start = cfg.steps - cfg.decay_steps
    if step < start:
        return cfg.lr, cfg.beta1
    return cfg.lr * (cfg.steps - step) / cfg.decay_steps, cfg.decay_beta1


def apply(optimizer: torch.optim.Optimizer, lr: float, beta1: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["betas"] = (beta1, group["betas"][1])
