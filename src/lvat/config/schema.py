"""What a run can be configured with. The string under each field is its `--help` text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from lvat.config.core import option
from lvat.errors import ConfigError

# What `--resume` cannot change: what the saved weights, optimizer state and split were made for
# (architecture, image shape, dataset and split, method, seed). The rest - lr, steps, eps, batch
# sizes, evaluation, logging, checkpointing, device, fast-path switches - may change.
_SPLIT_KEYS = ("data.num_labeled", "data.num_validation", "data.split_seed", "data.split_file")
_FIT_FIXED = ("data.name", "data.pad_to", "model.*", "seed")


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

    name: str = "vat"
    """sup: cross-entropy only; vat: Miyato et al.; lvat: VAT in the latent space of a VAE/Glow;
    or a method a plugin registered (`lvat.regularizers.register_method`)."""
    eps: float = option(2.5, gt=0.0)
    """Perturbation norm: input-space L2 for VAT, latent L2 per group for LVAT (docs/method.md §5.2:
    VAT 2.5/3.5/10/8, LVAT-VAE 1.5/1.0, LVAT-Glow 1.0)."""
    xi: float = option(1e-6, gt=0.0)
    """Finite-difference step of the power iteration (authors' code: 1e-6 in both spaces)."""
    power_iterations: int = option(1, ge=1)
    """Power iterations for the adversarial direction (1 suffices, Miyato et al.)."""
    power_method: Literal["finite-difference", "exact"] = "finite-difference"
    """How the power iteration multiplies by the curvature: finite-difference (the authors': a
    probe of norm xi, in float32) or exact (Fisher-vector products by forward-mode AD, no xi;
    docs/numerics.md)."""
    alpha: float = option(1.0, ge=0.0)
    """Weight of the consistency cost in the loss (paper: 1)."""
    entropy_weight: float = option(0.0, ge=0.0)
    """Weight of entropy minimisation on the unlabeled batch (VAT+Ent uses 1; 0 = off)."""
    transformer: str = ""
    """LVAT only: checkpoint of the trained VAE or Glow (from `lvat fit`)."""
    latent_groups: Literal["separate", "joint"] = "separate"
    """LVAT with a multi-group latent (Glow: y and z): perturb each group to norm eps (authors),
    or all groups jointly to norm eps."""

    def __post_init__(self) -> None:
        from lvat.regularizers.registry import METHODS  # the registered methods, plugins' too

        if self.name not in METHODS:
            raise ConfigError(
                f"method.name: {self.name!r} is not allowed; choose one of {METHODS.names()}"
            )


@dataclass
class TrainConfig:
    """Optimisation, evaluation and bookkeeping (paper section 5.2)."""

    steps: int = option(48000, ge=1)
    """Parameter updates (paper: 48,000 for SVHN, 200,000 for CIFAR-10)."""
    batch_labeled: int = option(32, ge=1)
    """Labeled images per step, for the cross-entropy. Global: under torchrun each of the N
    processes takes batch_labeled / N (must divide)."""
    batch_unlabeled: int = option(128, ge=1)
    """Images per step for the consistency cost, drawn from all non-held-out training images.
    Global, like batch_labeled."""
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
    amp: Literal["auto", "off", "bf16"] = "auto"
    """Mixed precision. bf16: the labeled pass and the adversarial pass (the ones the parameter
    gradients come from) run under bf16 autocast; the clean target, the power-iteration probes
    and every VAE/Glow pass stay in true float32 (a bf16 or TF32 probe of norm xi rounds away).
    auto: bf16 on CUDA and on CPUs with bf16 units (AVX512-BF16 or AMX), off elsewhere (an
    emulated bf16 is slower than float32); off for LVAT everywhere, where bf16 trained worse
    in the runs so far and gains least (docs/numerics.md section 5). Pin it ("off" or "bf16")
    where results must not depend on the machine."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """Store the classifier's conv weights (and so its activations) channels-last (NHWC), the
    layout tensor cores and oneDNN's bf16 kernels want. auto: on for CUDA and under bf16 amp,
    off otherwise (float32 CPU convolutions of the classifier gain nothing from it). LVAT's
    transformer is channels-last unless this is "off": its few-channel float32 convolutions
    make LVAT-Glow and LVAT-VAE steps 1.2x faster on a CPU (bench/cpu-transformer-layout.json)."""
    compile: bool = False
    """torch.compile the classifier and the transformer's decode (not the autograd.grad call
    around them; the exact power method's forward-mode products run them eagerly). Pays on GPUs
    for long runs; the first steps then take minutes to compile."""
    cache_latents: bool = False
    """LVAT only: encode every training image once at the start (the transformer is frozen) and
    look latents up per step; memory cost is printed. Needs data.augment = false. With Glow the
    dequantisation noise of encode is then drawn once per image, not once per step."""


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

    RESUME_FIXED: ClassVar[tuple[str, ...]] = (
        "data.name",
        "data.pad_to",
        *_SPLIT_KEYS,
        "model.*",
        "method.name",
        "seed",
    )

    def __post_init__(self) -> None:
        _check_labels(self.data)


def _check_labels(data: DataConfig) -> None:
    """Every method's cross-entropy needs labeled images, and the split draws them
    class-balanced: refuse at config time what `make_split` or the batches would refuse later."""
    if data.split_file:  # the split file decides; it is checked against the dataset
        return
    if data.num_labeled == 0:
        raise ConfigError(
            "data.num_labeled = 0: every method (sup, vat, lvat) needs labeled images for its "
            "cross-entropy; give a multiple of the class count (e.g. 100 for 10 classes), or -1 "
            "to label every training image"
        )
    from lvat.data.catalog import DATASETS  # official datasets: the class count is known now

    official = DATASETS.get(data.name.lower())
    if official is None:  # a user's .npz or folder: make_split checks once it is read
        return
    k = len(official.classes)
    for what, n in (("num_labeled", data.num_labeled), ("num_validation", data.num_validation)):
        if n > 0 and n % k:
            up = k * -(-n // k)
            raise ConfigError(
                f"data.{what} = {n}: {data.name} has {k} classes and the split is "
                f"class-balanced; use a multiple of {k} (e.g. {up})"
            )


# ---------------------------------------------------------------------------------------------
# `lvat fit vae|glow`: training the generative transformers (docs/method.md §5.3, §5.4).
#
# One budget unit for both kinds, as for the classifier: parameter updates (`steps`). The VAE
# recipe of the paper is in epochs; its defaults below are converted for SVHN (73,257 training
# images / batch 256 = 286.2 steps per epoch) and configs/fit/*.toml give the other datasets.


@dataclass
class FitTrainConfig:
    """Optimisation, evaluation and bookkeeping of `lvat fit` (shared by VAE and Glow)."""

    steps: int = option(1000, ge=1)
    """Parameter updates."""
    batch_size: int = option(128, ge=1)
    """Training images per update, drawn from all training images (labels ignored)."""
    lr: float = option(1e-4, gt=0.0)
    """Adam learning rate (after the warm-up, before any decay)."""
    beta1: float = option(0.9, ge=0.0, lt=1.0)
    """Adam beta1."""
    beta2: float = option(0.999, ge=0.0, lt=1.0)
    """Adam beta2."""
    warmup_steps: int = option(0, ge=0)
    """Linear learning-rate warm-up: update i (0-based) uses lr * (i + 1) / warmup_steps for
    i < warmup_steps; 0 = none."""
    lr_milestones: list[int] = field(default_factory=list)
    """Piecewise-constant lr: updates at which the factor switches to the next of `lr_factors`
    (increasing). Empty = one constant factor 1."""
    lr_factors: list[float] = field(default_factory=list)
    """Multipliers of lr before the first milestone, between milestones and after the last
    (one more than `lr_milestones`)."""
    decay_start: int = option(0, ge=0)
    """Exponential staircase decay: from this update on, lr is multiplied by `decay_rate` once
    every `decay_every` updates."""
    decay_every: int = option(1, ge=1)
    """Updates between two decay steps."""
    decay_rate: float = option(1.0, gt=0.0, le=1.0)
    """Factor per decay step; 1 = no decay."""
    clip_grad_norm: float = option(0.0, ge=0.0)
    """Clip the gradient's global L2 norm to this before each update; 0 = never (the authors).
    A safeguard for long runs: one bad batch can otherwise throw a VAE far off (a loss spike
    of 1e12 at update 2,814 of a batch-64 fit, whose gradient norm is ~100-200 in steady state)."""
    eval_every: int = option(1000, ge=1)
    """Evaluate on test images (and redraw the PNG grids) every this-many steps, and at the end."""
    init: str = ""
    """Start from these weights instead of a fresh initialisation: a shipped name
    ("fashion-mnist/vae"), a .safetensors file or an `lvat fit` checkpoint of the same kind and
    architecture. Continues a fit on another machine; the optimizer starts fresh and the step
    count and schedule from 0 (to resume exactly on the same machine, use --resume)."""
    eval_images: int = option(0, ge=0)
    """Test images used by the periodic evaluations (the first ones; 0 = all)."""
    final_eval_images: int = option(0, ge=0)
    """Test images used by the final evaluation, the numbers in results.json (0 = all: report
    those; fewer only for smoke tests)."""
    bn_recalibration_batches: int = option(50, ge=0)
    """At the end of training, recompute BatchNorm running statistics as an exact average over
    this many training batches (the VAE's momentum-0.01 averages lag far behind a short run,
    and LVAT uses the transformer in eval mode); 0 keeps the running averages. Glow has none."""
    eval_batch_size: int = option(500, ge=1)
    """Images per evaluation batch (memory and speed; the seeded noise draws - dequantisation,
    posterior samples - follow the batching, so results move at the noise level only)."""
    grid_images: int = option(64, ge=1)
    """Images in each PNG grid: test.png, reconstruction.png (Dec(Enc(x)) of the same test
    images) and samples.png."""
    log_every: int = option(100, ge=1)
    """Write averaged training metrics (and the non-finite-decode probe) every this-many steps."""
    checkpoint_every: int = option(1000, ge=1)
    """Write the checkpoint every this-many steps (atomically), and at the end."""
    tensorboard: bool = False
    """Also log to TensorBoard (needs `pip install tensorboard`)."""
    progress: bool = True
    """Show a progress bar with ETA on stderr."""


@dataclass
class VAEModelConfig:
    """The VAE of paper Table 2 (arguments of `lvat.models.VAE`)."""

    latent_dim: int = option(128, ge=1)
    """Dimension of the latent mean mu that LVAT perturbs (paper: 128)."""
    sigma_floor_one: bool = True
    """Clip log sigma >= 1e-8, so sigma >= 1, as the authors' code does (it sets the latent scale
    eps acts on); false = a standard VAE."""
    truncated_noise: bool = True
    """Reparameterisation noise from a normal truncated at +-2 std (authors); false = N(0, 1)."""


@dataclass
class VAETrainConfig(FitTrainConfig):
    """VAE training (paper section 5.2): Adam(0.9, 0.999), batch 256, lr 1e-3, x0.97 every 2
    epochs after epoch 80, 300 epochs."""

    steps: int = option(85848, ge=1)
    """Parameter updates. Paper: 300 epochs = 85,848 steps on SVHN (73,257 / 256 per epoch),
    58,594 on CIFAR-10, 70,313 on Fashion-MNIST."""
    batch_size: int = option(256, ge=1)
    """Training images per update (paper: 256), drawn from all training images."""
    lr: float = option(1e-3, gt=0.0)
    """Adam learning rate before the decay (paper: 1e-3)."""
    decay_start: int = option(22893, ge=0)
    """Update at which the staircase decay starts (paper: after epoch 80 = 22,893 steps on SVHN,
    15,625 on CIFAR-10, 18,750 on Fashion-MNIST); the first x0.97 comes one `decay_every` later,
    as in the authors' code (after epoch 82)."""
    decay_every: int = option(572, ge=1)
    """Updates between two decays (paper: 2 epochs = 572 steps on SVHN, 391 on CIFAR-10, 469 on
    Fashion-MNIST)."""
    decay_rate: float = option(0.97, gt=0.0, le=1.0)
    """Factor per decay step (paper: 0.97)."""
    eval_every: int = option(5000, ge=1)
    """Evaluate on test images (and redraw the PNG grids) every this-many steps, and at the end."""
    checkpoint_every: int = option(5000, ge=1)
    """Write the checkpoint every this-many steps (atomically), and at the end."""
    kl_weight: float = option(0.1, ge=0.0)
    """Weight of the KL term in the loss BCE + kl_weight * KL (authors' code: 0.1)."""


@dataclass
class VAEFitConfig:
    """`lvat fit vae`: train the VAE transformer of LVAT-VAE on all training images."""

    data: DataConfig = field(default_factory=DataConfig)
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    seed: int = option(0, ge=0)
    """Seed for initialisation, batch order, augmentation and sampling noise."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps."""
    out: str = ""
    """Run folder (config, metrics, PNG grids, checkpoint.pt, results.json); empty =
    runs/fit/DATASET-vae."""

    RESUME_FIXED: ClassVar[tuple[str, ...]] = _FIT_FIXED


@dataclass
class GlowModelConfig:
    """The multi-scale Glow of the authors' code (arguments of `lvat.models.Glow`)."""

    n_levels: int = option(3, ge=1)
    """L, levels (authors: 3); image H and W must be divisible by 2^L."""
    n_steps: int = option(22, ge=0)
    """K, flow steps per level (authors: 22)."""
    width: int = option(128, ge=1)
    """Hidden channels of each coupling network (authors: 128)."""
    n_bits: int = option(5, ge=1, le=8)
    """Bits per colour channel the model sees (authors: 5; 8 = the full data)."""
    coupling: Literal["affine", "sigmoid"] = "affine"
    """affine: scale exp(clip(h, +-15)) (authors); sigmoid: sigmoid(h + 2) (bounded, Glow paper)."""


@dataclass
class GlowTrainConfig(FitTrainConfig):
    """Glow training: Adam lr 1e-4 (paper) with the authors' schedule of 15,600 updates at
    batch 128 (geosada/LVAT glow/main.py); 25,600 with augmentation."""

    steps: int = option(15600, ge=1)
    """Parameter updates (authors: 15,600; 25,600 with augmentation; the paper's "3,200 / 5,200
    iterations" do not match their code)."""
    batch_size: int = option(128, ge=1)
    """Training images per update (authors: 128), drawn from all training images."""
    lr: float = option(1e-4, gt=0.0)
    """Adam base learning rate (paper: 1e-4)."""
    warmup_steps: int = option(100, ge=0)
    """Linear lr warm-up over the first updates: the length of the authors' warm-up phase (100
    updates at 1e-4 before 500 at 5e-4), ramped linearly as in openai/glow; 0 = none."""
    lr_milestones: list[int] = field(default_factory=lambda: [100, 600, 5600, 10600])
    """Piecewise-constant lr: updates at which the factor switches to the next of `lr_factors`.
    Authors: 100, 600, 5600, 10600 (with augmentation: 100, 600, 10600, 20600)."""
    lr_factors: list[float] = field(default_factory=lambda: [1.0, 5.0, 1.0, 0.5, 1.0])
    """Multipliers of lr between milestones (authors: 1e-4, 5e-4, 1e-4, 5e-5, 1e-4 = factors
    1, 5, 1, 0.5, 1). Empty lists = constant lr."""
    eval_every: int = option(2000, ge=1)
    """Evaluate on test images (and redraw the PNG grids) every this-many steps, and at the end."""
    checkpoint_every: int = option(2000, ge=1)
    """Write the checkpoint every this-many steps (atomically), and at the end."""
    init_images: int = option(512, ge=2)
    """Training images for the data-dependent ActNorm init, done once before the first update."""
    temperature: float = option(0.7, ge=0.0)
    """Prior temperature of samples.png (Glow paper: 0.7 gives the best-looking samples)."""


@dataclass
class GlowFitConfig:
    """`lvat fit glow`: train the Glow transformer of LVAT-Glow on all training images."""

    data: DataConfig = field(default_factory=DataConfig)
    model: GlowModelConfig = field(default_factory=GlowModelConfig)
    train: GlowTrainConfig = field(default_factory=GlowTrainConfig)
    seed: int = option(0, ge=0)
    """Seed for initialisation, batch order, augmentation and dequantisation noise."""
    device: str = "auto"
    """Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps."""
    out: str = ""
    """Run folder (config, metrics, PNG grids, checkpoint.pt, results.json); empty =
    runs/fit/DATASET-glow."""

    RESUME_FIXED: ClassVar[tuple[str, ...]] = _FIT_FIXED
