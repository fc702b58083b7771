"""Data: official and user datasets, verified files, seeded splits, device-resident batches."""

from lvat.data.batches import Batch, TrainBatches, augment, eval_batches, to_float
from lvat.data.catalog import DATASETS
from lvat.data.dataset import ImageDataset, load_dataset
from lvat.data.prepare import load_from_config, resolve_split, train_batches
from lvat.data.splits import Split, make_split

__all__ = [
    "DATASETS",
    "Batch",
    "ImageDataset",
    "Split",
    "TrainBatches",
    "augment",
    "eval_batches",
    "load_dataset",
    "load_from_config",
    "make_split",
    "resolve_split",
    "to_float",
    "train_batches",
]
