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
class ModelConfig:
    """The classifier."""

    name: str = "conv-large"
    """Classifier from the registry: conv-large (paper Table 1) or conv-small (CPU-sized)."""
    top_bn: bool = False
    """Batch normalisation on the logits (the paper's SVHN runs use it)."""
    dropout: float = option(0.5, ge=0.0, lt=1.0)
    """Dropout probability after each max-pool (Table 1: 0.5)."""


@dataclass
class MethodConfig:
    """The regularizer: none (sup), VAT in input space, or LVAT in a transformer's latent space."""

    name: Literal["sup", "vat", "lvat"] = "vat"
    """sup: cross-entropy only; vat: Miyato et al.; lvat: VAT in the latent space of a VAE/Glow."""
    eps: float = option(2.5, gt=0.0)
    """Perturbation norm: input-space L2 for VAT, latent L2 per group for LVAT (SPEC section 4:
    VAT 2.5/3.5/10/8, LVAT-VAE 1.5/1.0, LVAT-Glow 1.0)."""
    xi: float = option(1e-6, gt=0.0)
    """Finite-difference step of the power iteration (authors' code: 1e-6 in both spaces)."""
    power_iterations: int = option(1, ge=1)
    """Power iterations for the adversarial direction (1 suffices, Miyato et al.)."""
    alpha: float = option(1.0, ge=0.0)
    """Weight of the consistency cost in the loss (paper: 1)."""
    entropy_weight: float = option(0.0, ge=0.0)
    """Weight of entropy minimisation on the unlabeled batch (VAT+Ent uses 1; 0 = off)."""
    transformer: str = ""
    """LVAT only: checkpoint of the trained VAE or Glow (from `lvat fit`)."""
    latent_groups: Literal["separate", "joint"] = "separate"
    """LVAT with a multi-group latent (Glow: y and z): perturb each group to norm eps (authors),
    or all groups jointly to norm eps."""


@dataclass
class TrainConfig:
    """Optimisation, evaluation and bookkeeping (paper section 5.2)."""

    steps: int = option(48000, ge=1)
    """Parameter updates (paper: 48,000 for SVHN, 200,000 for CIFAR-10)."""
    batch_labeled: int = option(32, ge=1)
    """Labeled images per step, for the cross-entropy."""
    batch_unlabeled: int = option(128, ge=1)
    """Images per step for the consistency cost, drawn from all non-held-out training images."""
    lr: float = option(1e-3, gt=0.0)
    """Adam learning rate before the decay."""
    beta1: float = option(0.9, ge=0.0, lt=1.0)
    """Adam beta1 before the decay."""
    beta2: float = option(0.999, ge=0.0, lt=1.0)
    """Adam beta2."""
    decay_steps: int = option(16000, ge=0)
    """Over the last this-many updates the lr decays linearly to 0 and beta1 becomes
    `decay_beta1` (paper: 16,000)."""
    decay_beta1: float = option(0.5, ge=0.0, lt=1.0)
    """Adam beta1 during the decay (paper: 0.5)."""
    eval_every: int = option(2000, ge=1)
    """Evaluate on validation (if held out) and test every this-many steps, and at the end."""
    eval_batch_size: int = option(500, ge=1)
    """Images per evaluation batch (memory only; results do not depend on it)."""
    log_every: int = option(100, ge=1)
    """Write averaged training metrics every this-many steps (also the non-finite-loss check)."""
    checkpoint_every: int = option(2000, ge=1)
    """Write the checkpoint every this-many steps (atomically), and at the end."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs `pip install tensorboard`)."""
    progress: bool = True
    """Show a progress bar with ETA on stderr."""


@dataclass
class Config:
    """A training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = option(0, ge=0)
    """Seed for initialisation, batch order, augmentation and perturbations."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps."""
    out: str = "runs/default"
    """Run folder: config, split, metrics, checkpoints and results are written here."""
