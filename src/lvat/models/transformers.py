"""Saving and loading the generative "transformers" that LVAT perturbs (any registered kind).

A transformer checkpoint is self-describing: `kind` and constructor `hparams` sit beside the
`state_dict`, so `load_transformer(path)` rebuilds the model with no other input. Loading is
weights-only (`torch.load(weights_only=True)`): a checkpoint cannot run code.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvat.errors import LvatError
from lvat.io import atomic_write
from lvat.models.registry import KINDS, kind_for_model

# The registered kinds by name (`lvat.models.registry`): the built-in vae and glow, and plugins'.
TRANSFORMERS = KINDS
FORMAT = 1


def transformer_state(model: nn.Module) -> dict[str, Any]:
    """The part of a checkpoint that `load_transformer` needs."""
    try:
        kind = kind_for_model(model)
    except TypeError:
        raise TypeError(f"not a known transformer: {type(model).__name__}") from None
    return {
        "format": FORMAT,
        "kind": kind.name,
        "hparams": dict(model.hparams),
        "state_dict": model.state_dict(),
    }


def save_transformer(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Write `model` (plus any `extra` entries such as optimiser state) atomically to `path`."""
    state = {**extra, **transformer_state(model)}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_transformer(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a trained transformer (VAE, Glow, or a registered kind) from its checkpoint alone,
    frozen and in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise LvatError(f"transformer checkpoint not found: {path} (train one with `lvat fit`)")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning: keep stderr one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        from lvat.train.checkpoint import load_error  # lvat.train imports lvat.models

        raise load_error(path, exc) from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in KINDS:
        raise LvatError(f"{path}: not a transformer checkpoint (no kind {'/'.join(KINDS)} inside)")
    try:
        model = KINDS[ckpt["kind"]].model(**ckpt["hparams"])
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError, KeyError) as exc:
        msg = " ".join(str(exc).split())[:300]
        raise LvatError(f"{path}: checkpoint does not match its model ({msg})") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model
