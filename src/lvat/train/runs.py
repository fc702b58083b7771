"""Reading a finished or running run folder back: config, split, data and model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lvat.config import Config
from lvat.data import ImageDataset, Split, load_from_config
from lvat.data.prepare import SPLIT_FILE
from lvat.errors import LvatError
from lvat.evaluate import evaluate
from lvat.train import checkpoint
from lvat.train.setup import build_model, resolve_device


@dataclass
class Run:
    """A run folder's config, data, split and trained classifier (in eval mode)."""

    path: Path
    config: Config
    dataset: ImageDataset
    split: Split
    model: nn.Module
    step: int
    device: torch.device


def load_run(path: str | Path, device: str | None = None) -> Run:
    """Rebuild a run from its folder alone (the config inside the checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise LvatError(f"run folder not found: {path}")
    ckpt = path / checkpoint.CHECKPOINT
    state = checkpoint.load_training(ckpt)  # a fit run, {} or a foreign dict: one line, here
    cfg: Config = checkpoint.saved_config(state, ckpt)
    dev = resolve_device(device or cfg.device)
    dataset = load_from_config(cfg.data)
    split = Split.load(path / SPLIT_FILE)
    split.check(dataset.fingerprint, len(dataset.x_train), where=str(path / SPLIT_FILE))
    model = build_model(cfg, dataset)
    what = f"the {cfg.model.name} classifier of its config for {dataset.name}"
    checkpoint.load_model_state(model, state["model"], ckpt, what)
    return Run(path, cfg, dataset, split, model.to(dev).eval(), int(state["step"]), dev)


def evaluate_splits(
    model: nn.Module, dataset: ImageDataset, split: Split, batch_size: int, device: torch.device
) -> dict:
    """Test (and validation, if held out) error, per-class accuracy and confusion matrix."""
    out: dict = {}
    if len(split.validation):
        idx = torch.as_tensor(split.validation)
        out.update(
            evaluate(
                model,
                dataset.x_train[idx],
                dataset.y_train[idx],
                dataset.num_classes,
                batch_size=batch_size,
                device=device,
            ).to_dict("validation")
        )
    out.update(
        evaluate(
            model,
            dataset.x_test,
            dataset.y_test,
            dataset.num_classes,
            batch_size=batch_size,
            device=device,
        ).to_dict("test")
    )
    return out


def evaluate_run(run: Run) -> dict:
    """`evaluate_splits` for a loaded run, tagged with its step."""
    bs = run.config.train.eval_batch_size
    return {"step": run.step, **evaluate_splits(run.model, run.dataset, run.split, bs, run.device)}
