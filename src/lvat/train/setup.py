"""Building a run's parts from its config: device, classifier, regularizer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lvat.config import Config, MethodConfig
from lvat.data import ImageDataset
from lvat.errors import ConfigError
from lvat.models import build_classifier
from lvat.regularizers import LVAT, VAT


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu. An unavailable device is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device: unknown device '{name}'; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name}, but CUDA is not available here; use cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device = {name}, but MPS is not available here; use cpu or auto")
    return device


def build_model(cfg: Config, dataset: ImageDataset) -> nn.Module:
    try:
        return build_classifier(
            cfg.model.name,
            in_channels=dataset.image_shape[0],
            num_classes=dataset.num_classes,
            top_bn=cfg.model.top_bn,
            dropout=cfg.model.dropout,
        )
    except ValueError as exc:
        raise ConfigError(f"model.name: {exc}") from None


def build_regularizer(cfg: MethodConfig, device: torch.device) -> VAT | LVAT | None:
    """None for `sup`; VAT; or LVAT around the frozen transformer in `cfg.transformer`."""
    common = dict(
        eps=cfg.eps,
        xi=cfg.xi,
        power_iterations=cfg.power_iterations,
        entropy_weight=cfg.entropy_weight,
        power_method=cfg.power_method,
    )
    if cfg.name == "sup":
        return None
    if cfg.name == "vat":
        return VAT(**common)
    if not cfg.transformer:
        raise ConfigError(
            "method.transformer: LVAT needs a trained VAE or Glow checkpoint (see `lvat fit`)"
        )
    folder = Path(cfg.transformer)
    if folder.is_dir():  # an `lvat fit` run folder instead of its checkpoint
        inside = folder / "checkpoint.pt"
        hint = f": --method.transformer {inside}" if inside.is_file() else " from `lvat fit`"
        raise ConfigError(
            f"method.transformer: {folder} is a folder; give the VAE/Glow checkpoint file{hint}"
        )
    from lvat.models.transformers import load_transformer

    transformer = load_transformer(cfg.transformer, device)
    return LVAT(transformer, latent_groups=cfg.latent_groups, **common)
