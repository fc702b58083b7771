"""Saving and loading the generative "transformers" that LVAT perturbs (any registered kind).

Two self-describing formats, both rebuilt by `load_transformer` with no other input and neither
able to run code on load:

- a training checkpoint (`checkpoint.pt` of `lvat fit`): `kind` and constructor `hparams` beside
  the `state_dict`, read with `torch.load(weights_only=True)`;
- weights to exchange (`export_transformer`): a `.safetensors` file, tensors only, whose header
  metadata holds `kind` and `hparams` (JSON), with an optional model card (`.json`) beside it.

`load_transformer` also takes a name, "DATASET/KIND" (e.g. "fashion-mnist/glow"): the file
DATASET/KIND.safetensors in the folders of `weight_dirs()` (the package's `weights/`, then
$LVAT_WEIGHTS).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvat.errors import LvatError, one_line
from lvat.io import atomic_write, atomic_write_text
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


SAFETENSORS = ".safetensors"
WEIGHTS_ENV = "LVAT_WEIGHTS"


def weight_dirs() -> list[Path]:
    """Where transformer names are looked up: the package's weights/, then $LVAT_WEIGHTS."""
    dirs = [Path(__file__).resolve().parent.parent / "weights"]
    dirs += [Path(p) for p in os.environ.get(WEIGHTS_ENV, "").split(os.pathsep) if p]
    return dirs


def available_transformers() -> list[str]:
    """The names `load_transformer` accepts, e.g. ["fashion-mnist/glow", "fashion-mnist/vae"]."""
    names = {
        f.relative_to(d).with_suffix("").as_posix()
        for d in weight_dirs()
        if d.is_dir()
        for f in d.rglob(f"*{SAFETENSORS}")
    }
    return sorted(names)


def resolve_transformer(name_or_path: str | Path) -> Path:
    """A file path as given, or the weights file of a name such as "fashion-mnist/glow"."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (SAFETENSORS, ".pt") or path.is_absolute():
        return path
    for d in weight_dirs():
        candidate = d / f"{path.as_posix()}{SAFETENSORS}"
        if candidate.is_file():
            return candidate
    names = ", ".join(available_transformers()) or "none"
    raise LvatError(
        f"transformer not found: {name_or_path} is neither a file nor a shipped name "
        f"(available: {names}); give a checkpoint from `lvat fit` or a .safetensors file"
    )


def export_transformer(model: nn.Module, path: str | Path, card: dict | None = None) -> Path:
    """Write `model` as `.safetensors` (tensors + kind/hparams metadata), atomically; with `card`,
    also the model card (architecture, data, training, metrics) as JSON beside it."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != SAFETENSORS:
        raise LvatError(f"{path}: weights to exchange end in {SAFETENSORS}")
    state = transformer_state(model)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state["state_dict"].items()}
    meta = {"format": str(FORMAT), "kind": state["kind"], "hparams": json.dumps(state["hparams"])}
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))
    if card is not None:
        atomic_write_text(path.with_suffix(".json"), json.dumps(card, indent=1) + "\n")
    return path


def read_kind(path: str | Path) -> str:
    """The `kind` a transformer file declares ('vae', 'glow', ...), without reading its
    tensors; '' if the file cannot be read (a report then falls back to plain "LVAT")."""
    path = Path(path)
    if path.suffix == SAFETENSORS:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return str((f.metadata() or {}).get("kind", ""))
        except Exception:
            return ""
    for mmap in (True, False):  # mmap reads only the small `kind`; old formats need False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:
            continue
        return str(ckpt.get("kind", "")) if isinstance(ckpt, dict) else ""
    return ""


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return {"kind": meta.get("kind"), "hparams": json.loads(meta.get("hparams", "null")),
                "state_dict": state}  # fmt: skip
    except Exception as exc:  # a truncated or foreign file
        raise LvatError(
            f"{path}: not a readable lvat .safetensors file ({one_line(exc, 200)})"
        ) from None


def load_transformer(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a trained transformer (VAE, Glow, or a registered kind) from its checkpoint, its
    `.safetensors` weights or its shipped name ("fashion-mnist/glow"), frozen and in eval mode."""
    path = resolve_transformer(path)
    if not path.is_file():
        raise LvatError(f"transformer checkpoint not found: {path} (train one with `lvat fit`)")
    if path.suffix == SAFETENSORS:
        return _build(_read_safetensors(path), path, device)
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning: keep stderr one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        from lvat.train.checkpoint import load_error  # lvat.train imports lvat.models

        raise load_error(path, exc) from None
    return _build(ckpt, path, device)


def _build(ckpt: Any, path: Path, device: torch.device | str) -> nn.Module:
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in KINDS:
        raise LvatError(f"{path}: not a transformer checkpoint (no kind {'/'.join(KINDS)} inside)")
    try:
        model = KINDS[ckpt["kind"]].model(**ckpt["hparams"])
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError, KeyError) as exc:
        raise LvatError(
            f"{path}: checkpoint does not match its model ({one_line(exc, 300)})"
        ) from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model
