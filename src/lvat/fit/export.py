"""`lvat export`: a finished `lvat fit` run as `.safetensors` weights with a JSON model card.

Weights that users exchange (and that lvat ships under `src/lvat/weights/DATASET/KIND`) are
safetensors: loading them never unpickles. The card beside them (`NAME.json`) says what they are:

- `kind`, `hparams`, `dataset`, `image_shape`, `data_fingerprint`, the fit `config`;
- `history`: one entry per training segment, oldest first. A fit that continued from other
  weights (`train.init`) appends its segment to theirs, so weights trained across machines and
  days keep the whole account: steps, batch, wall time, hardware, versions and the command;
- `steps_total`, the `test` metrics of the last segment's final evaluation;
- `check`: decode(encode(x)) on the first 64 test images — mean squared error per pixel in
  [0, 1], with the seed of Glow's dequantisation noise — which a test recomputes from the
  shipped file (`tests/test_shipped_weights.py`);
- `nonfinite`: how many training and test images the weights cannot encode and decode back to
  finite numbers (LVAT encodes every unlabeled image, so this must be 0: a flow whose couplings
  overflow float32 on a few images makes every LVAT run that draws one of them fail).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib
import torch

from lvat.config import DataConfig, from_dict
from lvat.data import load_from_config, to_float
from lvat.errors import LvatError
from lvat.models.transformers import (
    SAFETENSORS,
    export_transformer,
    load_transformer,
    resolve_transformer,
)
from lvat.train.checkpoint import CHECKPOINT

__all__ = [
    "CHECK_IMAGES",
    "export_run",
    "nonfinite_count",
    "read_card",
    "reconstruction_check",
    "weight_history",
]

CHECK_IMAGES = 64
CHECK_SEED = 0


def read_card(weights: str | Path) -> dict:
    """The model card beside `.safetensors` weights ({} if there is none)."""
    path = resolve_transformer(weights).with_suffix(".json")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def _segment(results: dict, config: dict, command: str) -> dict:
    hardware = results.get("hardware", {})
    return {
        "steps": results.get("steps"),
        "batch_size": results.get("batch_size"),
        "wall_time_s": results.get("wall_time_s"),
        "hardware": hardware.get("gpu") or hardware.get("cpu"),
        "threads": hardware.get("torch_threads"),
        "versions": results.get("versions", {}),
        "command": command,
        "train": config.get("train", {}),
    }


def _run_files(run: Path) -> tuple[dict, dict]:
    try:
        results = json.loads((run / "results.json").read_text(encoding="utf-8"))
        config = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LvatError(
            f"{run}: not a finished `lvat fit` run (results.json and config.toml needed; "
            f"{type(exc).__name__}); finish it, e.g. `lvat fit KIND --resume {run} "
            "--train.steps N` with N its last checkpoint's step"
        ) from None
    return results, config


def weight_history(source: str | Path) -> list[dict]:
    """The training segments behind weights: a card's `history`, or a finished fit run's own
    (its results.json), else [] (weights of unknown origin)."""
    path = resolve_transformer(source)
    if path.suffix == SAFETENSORS:
        return list(read_card(path).get("history", []))
    try:
        results, config = _run_files(path.parent)
    except LvatError:
        return []
    prior = (results.get("init") or {}).get("history", [])
    return [
        *prior,
        _segment(results, config, f"lvat fit {results.get('kind')} (run {path.parent})"),
    ]


@torch.no_grad()
def reconstruction_check(model: torch.nn.Module, x_uint8: torch.Tensor) -> float:
    """Mean squared error per pixel of decode(encode(x)) against x in [0, 1] (Glow's
    dequantisation noise drawn from seed `CHECK_SEED`, in a forked RNG)."""
    x = to_float(x_uint8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CHECK_SEED)
        recon = model.decode(model.encode(x))
    return float(((recon.float() - x) ** 2).mean())


@torch.no_grad()
def nonfinite_count(model: torch.nn.Module, x_uint8: torch.Tensor, batch_size: int = 250) -> int:
    """Images (N, C, H, W uint8) whose encode, or decode of that encoding, has a non-finite
    value (Glow's dequantisation noise from seed `CHECK_SEED`, in a forked RNG)."""
    bad = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CHECK_SEED)
        for i in range(0, len(x_uint8), batch_size):
            latent = model.encode(to_float(x_uint8[i : i + batch_size]))
            parts = latent if isinstance(latent, tuple | list) else (latent,)
            ok = torch.stack([p.flatten(1).isfinite().all(1) for p in parts]).all(0)
            ok &= model.decode(latent).flatten(1).isfinite().all(1)
            bad += int((~ok).sum())
    return bad


def export_run(run: str | Path, out: str | Path, *, name: str = "", command: str = "") -> Path:
    """Write the finished fit in `run` as `out` (.safetensors) and its card `out.json`."""
    run, out = Path(run), Path(out)
    if out.suffix != SAFETENSORS:
        raise LvatError(f"{out}: weights to exchange end in {SAFETENSORS}")
    results, config = _run_files(run)
    model = load_transformer(run / CHECKPOINT)
    data_cfg = config.get("data", {})
    dataset = load_from_config(from_dict(DataConfig, data_cfg))
    fitted_on = results.get("data_fingerprint")
    if fitted_on and fitted_on != dataset.fingerprint:
        raise LvatError(
            f"{run}: fitted on data with fingerprint {fitted_on}, but {dataset.name} here has "
            f"{dataset.fingerprint}; export where the fit's data is"
        )
    check = reconstruction_check(model, dataset.x_test[:CHECK_IMAGES])
    nonfinite = {split: nonfinite_count(model, x) for split, x in
                 (("train", dataset.x_train), ("test", dataset.x_test))}  # fmt: skip
    command = command or f"lvat fit {results['kind']} --config {run / 'config.toml'}"
    prior = (results.get("init") or {}).get("history", [])
    history = [*prior, _segment(results, config, command)]
    card: dict[str, Any] = {
        "name": name or out.with_suffix("").name,
        "kind": results["kind"],
        "hparams": results.get("model", {}),
        "dataset": results.get("dataset"),
        "image_shape": results.get("image_shape"),
        "data_fingerprint": dataset.fingerprint,
        "config": config,
        "steps_total": sum(int(s.get("steps") or 0) for s in history),
        "history": history,
        "test": {k: v for k, v in results.items() if k.startswith("test_")},
        "check": {
            "what": "decode(encode(x)) on the first test images, MSE per pixel in [0, 1]",
            "images": CHECK_IMAGES,
            "pad_to": data_cfg.get("pad_to", 0),
            "seed": CHECK_SEED,
            "recon_mse": check,
        },
        "nonfinite": {
            "what": "images whose encode or decode(encode(x)) has a non-finite value",
            **nonfinite,
            "images": {"train": len(dataset.x_train), "test": len(dataset.x_test)},
        },
    }
    return export_transformer(model, out, card)
