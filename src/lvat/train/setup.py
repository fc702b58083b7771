"""Building a run's parts from its config: device, classifier, regularizer (by `METHODS`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lvat.config import Config, MethodConfig
from lvat.data import ImageDataset
from lvat.errors import ConfigError
from lvat.models import build_classifier
from lvat.models.registry import kinds_text
from lvat.regularizers import METHODS, Method, Regularizer


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


def build_regularizer(cfg: MethodConfig, device: torch.device) -> Regularizer | None:
    """The regularizer of the method `cfg.name` (`METHODS`): None for a method without one (sup);
    for a method that needs a transformer (LVAT), around the frozen one in `cfg.transformer`."""
    method = METHODS[cfg.name]
    if method.build is None:
        return None
    transformer = load_method_transformer(cfg, method, device) if method.needs_transformer else None
    return method.build(cfg, transformer)


def load_method_transformer(cfg: MethodConfig, method: Method, device: torch.device) -> nn.Module:
    """The frozen transformer checkpoint `cfg.transformer` names, with one-line errors."""
    if not cfg.transformer:
        raise ConfigError(
            f"method.transformer: {method.display} needs a trained {kinds_text()} checkpoint "
            "(see `lvat fit`)"
        )
    folder = Path(cfg.transformer)
    if folder.is_dir():  # an `lvat fit` run folder instead of its checkpoint
        inside = folder / "checkpoint.pt"
        hint = f": --method.transformer {inside}" if inside.is_file() else " from `lvat fit`"
        raise ConfigError(
            f"method.transformer: {folder} is a folder; give the {kinds_text('/')} checkpoint "
            f"file{hint}"
        )
    from lvat.models.transformers import load_transformer

    return load_transformer(cfg.transformer, device)
