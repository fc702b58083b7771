"""From a `DataConfig` to a dataset, its split (saved in the run folder) and training batches."""

from __future__ import annotations

from pathlib import Path

import torch

from lvat.config import DataConfig
from lvat.data.batches import TrainBatches
from lvat.data.dataset import ImageDataset, load_dataset
from lvat.data.splits import Split, make_split

SPLIT_FILE = "split.json"


def load_from_config(cfg: DataConfig) -> ImageDataset:
    return load_dataset(
        cfg.name, cfg.root, download=cfg.download, verify=cfg.verify, pad_to=cfg.pad_to
    )


def resolve_split(cfg: DataConfig, dataset: ImageDataset, run_dir: str | Path | None) -> Split:
    """The run's split: the one already in the run folder (resume), else `cfg.split_file`, else a
    new draw; checked against the dataset's fingerprint and saved to `run_dir/split.json`."""
    saved = Path(run_dir) / SPLIT_FILE if run_dir else None
    source = saved if saved and saved.is_file() else None
    if source is None and cfg.split_file:
        source = Path(cfg.split_file)
    if source:
        split = Split.load(source)
        split.check(dataset.fingerprint, len(dataset.x_train), where=str(source))
    else:
        split = make_split(
            dataset.y_train.numpy(),
            cfg.num_labeled,
            cfg.split_seed,
            num_validation=cfg.num_validation,
            num_classes=dataset.num_classes,
            fingerprint=dataset.fingerprint,
            dataset=dataset.name,
        )
    if saved and source != saved:
        split.save(saved)
    return split


def resolve_flip(cfg: DataConfig, dataset: ImageDataset) -> bool:
    return {"on": True, "off": False}.get(cfg.flip, dataset.flip)


def train_batches(
    cfg: DataConfig,
    dataset: ImageDataset,
    split: Split,
    batch_labeled: int,
    batch_unlabeled: int,
    *,
    device: torch.device | str,
    seed: int,
) -> TrainBatches:
    return TrainBatches(
        dataset,
        split,
        batch_labeled,
        batch_unlabeled,
        device=device,
        seed=seed,
        augment=cfg.augment,
        translate=cfg.translate,
        flip=resolve_flip(cfg, dataset),
    )
