"""Test-set evaluation of a transformer being fitted (any registered kind), and its PNG grids.

Metrics are computed on held-out TEST images only, never augmented, with the model in eval
mode and the global generators isolated (`isolated_rng`), so numbers are reproducible and the
training stream is untouched:

    VAE : loss = BCE + kl_weight KL, bce, kl (nats per image), neg_elbo = BCE + KL (the bound),
          recon_mse = pixel MSE of Dec(Enc(x)) with Enc = mu (what LVAT-VAE perturbs)
    Glow: nll (nats per image) and bpd = nll / (D ln 2), WITH the dequantisation term
          D log 2^n_bits (uniform noise, seeded); recon_mse of Dec(Enc(x)) against x (includes
          the n_bits quantisation); recon_exact = share with Dec(Enc(x)) == quantize(x)
    every kind: recon_mse and nonfinite_decode_rate = share of Dec(Enc(x) + r), |r| = eps = 1
          per latent group, with a non-finite pixel (should be 0); the rest is the kind's
          `test_metrics` (the two above are VAE's and Glow's)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvat.data import to_float
from lvat.fit.setup import isolated_rng
from lvat.images import save_grid
from lvat.models.glow import nonfinite_decode_rate
from lvat.models.registry import TransformerKind as Kind

GRIDS = ("test.png", "reconstruction.png", "samples.png")
PROBE_EPS = 1.0  # LVAT's eps for Glow on both datasets (paper section 5.2); the probe's radius


def _batch_metrics(kind: Kind, model: nn.Module, x: torch.Tensor, cfg: Any) -> dict:
    """Per-batch SUMS (tensors on the device) of the test metrics of `kind`."""
    n = len(x)
    recon = kind.reconstruct(model, x)
    out = {"recon_mse": (recon - x).square().flatten(1).mean(1).sum()}
    out.update(kind.test_metrics(model, x, recon, cfg))
    rate = nonfinite_decode_rate(model, x, PROBE_EPS)  # a float; one sync per batch is fine here
    out["nonfinite_decode_rate"] = torch.tensor(rate * n, device=x.device)
    return out


@torch.no_grad()
def evaluate_transformer(
    kind: Kind,
    model: nn.Module,
    x_test: torch.Tensor,
    cfg: Any,
    *,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> dict[str, float]:
    """Mean test metrics over the uint8 images `x_test` (N, C, H, W), prefixed `test_`."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    try:
        with isolated_rng(device, seed):
            for i in range(0, len(x_test), batch_size):
                x = to_float(x_test[i : i + batch_size].to(device))
                for k, v in _batch_metrics(kind, model, x, cfg).items():
                    sums[k] = sums[k] + v.float() if k in sums else v.float()
    finally:
        model.train(was_training)
    names = list(sums)
    values = torch.stack([sums[k] for k in names]).tolist()  # one host sync for all metrics
    out = {f"test_{k}": v / len(x_test) for k, v in zip(names, values, strict=True)}
    out["test_images"] = len(x_test)
    return out


@torch.no_grad()
def probe(kind: Kind, model: nn.Module, x: torch.Tensor, device: torch.device, seed: int) -> dict:
    """Cheap per-log-window check on a training batch: recon_mse and nonfinite_decode_rate."""
    was_training = model.training
    model.eval()  # LVAT uses the transformer frozen, in eval mode
    try:
        with isolated_rng(device, seed):
            mse = (kind.reconstruct(model, x) - x).square().mean().item()
            rate = nonfinite_decode_rate(model, x, PROBE_EPS)
    finally:
        model.train(was_training)
    return {"recon_mse": mse, "nonfinite_decode_rate": rate}


@torch.no_grad()
def samples(kind: Kind, model: nn.Module, n: int, cfg: Any, device: torch.device, seed: int):
    """n model samples in [0, 1] (`kind.sample`, e.g. Glow: the prior at `train.temperature`;
    VAE: Dec(z), z ~ N(0, I)), drawn from a generator seeded with `seed` on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    return kind.sample(model, n, cfg, g)


@torch.no_grad()
def write_grids(
    kind: Kind,
    model: nn.Module,
    x_test: torch.Tensor,
    cfg: Any,
    run: Path,
    device: torch.device,
    seed: int,
) -> list[Path]:
    """test.png (the first grid_images test images), reconstruction.png (their Dec(Enc(x))) and
    samples.png in `run`, overwritten at every evaluation."""
    n = min(cfg.train.grid_images, len(x_test))
    nrow = max(1, math.ceil(math.sqrt(n)))
    was_training = model.training
    model.eval()
    try:
        with isolated_rng(device, seed):
            x = to_float(x_test[:n].to(device))
            recon = kind.reconstruct(model, x)
            fake = samples(kind, model, n, cfg, device, seed)
    finally:
        model.train(was_training)
    return [
        save_grid(images, run / name, nrow=nrow)
        for images, name in zip((x, recon, fake), GRIDS, strict=True)
    ]
