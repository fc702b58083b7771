"""What a run can be configured with. The string under each field is its `--help` text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lvat.config.core import option


@dataclass
class DataConfig:
    """Which images, which labels, and how batches are augmented."""

    name: str = "fashion-mnist"
    """Dataset: svhn, cifar10, fashion-mnist, mnist, or a path to your own .npz (x, y) or image
    folder (one sub-folder per class)."""
    root: str = ""
    """Folder that holds the dataset files. Empty: search the system dataset folders
    (/usr/share/datasets/NAME), then the cache ($LVAT_DATA, else ~/.cache/lvat)."""
    download: bool = True
    """Download a missing official dataset into the cache (or into `root` when given)."""
    verify: bool = True
    """Check every official file against its published MD5 before reading it."""
    pad_to: int = option(0, ge=0)
    """Zero-pad images to this height and width (e.g. 32 for 28x28 Fashion-MNIST, so that VAE and
    Glow levels divide it); 0 keeps the native size."""
    num_labeled: int = option(100, ge=-1)
    """Labeled training images, drawn class-balanced (a multiple of the class count); -1 labels
    every training image (supervised learning)."""
    num_validation: int = option(0, ge=0)
    """Training images held out, class-balanced, for choosing hyper-parameters such as eps
    (never choose on test). Held-out images are neither labeled nor unlabeled training data."""
    split_seed: int = option(0, ge=0)
    """Seed that draws the labeled and validation subsets (the paper uses 5 label seeds)."""
    split_file: str = ""
    """Re-use a saved split.json (checked against the dataset's fingerprint) instead of drawing."""
    augment: bool = False
    """Augment training batches (paper section 5.1): random translation and, where enabled, flip."""
    translate: int = option(2, ge=0)
    """Maximum random translation in pixels (zero-pad, then random crop); used when augmenting."""
    flip: Literal["auto", "on", "off"] = "auto"
    """Random horizontal flip when augmenting. auto: the dataset's default (on for CIFAR-10 and
    Fashion-MNIST, off for SVHN and MNIST, whose digits are not mirror-symmetric)."""


@dataclass
class Config:
    """A training run."""

    data: DataConfig = field(default_factory=DataConfig)
    seed: int = option(0, ge=0)
    """Seed for initialisation, batch order, augmentation and perturbations."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps."""
    out: str = "runs/default"
    """Run folder: config, split, metrics, checkpoints and results are written here."""
