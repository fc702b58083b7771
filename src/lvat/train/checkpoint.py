"""Checkpoints: written atomically, loaded weights-only (no arbitrary unpickling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lvat.errors import LvatError
from lvat.io import atomic_write

CHECKPOINT = "checkpoint.pt"


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """torch.save to a temp file beside `path`, then rename: a crash leaves the old file intact."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise LvatError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or tampered files
        msg = " ".join(str(exc).split())[:300]
        raise LvatError(f"{path}: not a readable lvat checkpoint ({msg})") from None


def rng_state() -> dict[str, Any]:
    """Every global generator a training step draws from (dropout, perturbation noise)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
