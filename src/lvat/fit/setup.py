"""The parts of `lvat fit`: the built-in kinds (VAE, Glow), the image stream and the lr schedule.

A kind (`lvat.models.registry.TransformerKind`) bundles what differs between the transformers:
config class, constructor, training loss, deterministic reconstruction Dec(Enc(x)), test
metrics, samples and summary. Everything else (loop, checkpoints, evaluation, grids) is shared.
The two built-in kinds are defined here and registered in `KINDS` (the registry imports this
module on its first use); a plugin registers its own the same way.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvat.config import GlowFitConfig, VAEFitConfig
from lvat.config.schema import FitTrainConfig
from lvat.data import ImageDataset, augment, to_float
from lvat.data.batches import IndexStream
from lvat.errors import ConfigError
from lvat.models.glow import Glow, glow_loss
from lvat.models.registry import TransformerKind, kind_for_config, register_kind
from lvat.models.vae import VAE, vae_loss

FitConfig = VAEFitConfig | GlowFitConfig  # the built-in kinds' configs (a plugin brings its own)
Kind = TransformerKind  # the name `lvat.fit` has exported since before the registry


class VAEKind(TransformerKind):
    """The VAE of LVAT-VAE (paper Table 2): BCE + kl_weight KL, latent = the encoder mean mu."""

    name = "vae"
    display = "VAE"
    model = VAE
    config = VAEFitConfig
    help = "the VAE of LVAT-VAE (paper Table 2; BCE + 0.1 KL)"
    terms = ("loss", "bce", "kl")
    divisible = "8"
    eps = 1.5  # SVHN (paper section 4)

    def build(self, cfg: VAEFitConfig, shape: tuple[int, int, int]) -> nn.Module:
        m = cfg.model
        return VAE(shape[0], list(shape[1:]), m.latent_dim, m.sigma_floor_one, m.truncated_noise)

    def divisor(self, cfg: VAEFitConfig) -> int:
        return 8  # three stride-2 convolutions (paper Table 2)

    def size_reason(self, cfg: VAEFitConfig) -> str:
        return "the VAE (three stride-2 convolutions)"

    def loss(self, model: nn.Module, x: torch.Tensor, cfg: VAEFitConfig) -> dict:
        return vae_loss(model, x, cfg.train.kl_weight)

    def test_metrics(self, model, x, recon, cfg: VAEFitConfig) -> dict:
        n = len(x)
        terms = self.loss(model, x, cfg)  # batch means, one posterior sample per image
        out = {k: v * n for k, v in terms.items()}
        out["neg_elbo"] = (terms["bce"] + terms["kl"]) * n
        return out

    def sample(self, model, n: int, cfg: VAEFitConfig, generator: torch.Generator):
        """Dec(z), z ~ N(0, I).

        With the authors' sigma floor (sigma >= 1) and KL weight 0.1 the decoder is trained on
        z = mu + unit noise with mu spread wider than N(0, I), so prior samples fall inside that
        shell and look much worse than the reconstructions; LVAT only uses Dec(Enc(x) + r).
        """
        z = torch.randn(n, model.latent_dim, device=generator.device, generator=generator)
        return model.decode(z)

    def summary(self, results: dict) -> str:
        r = results
        return (
            f"test BCE {r['test_bce']:.2f} + KL {r['test_kl']:.2f} nats/image "
            f"(-ELBO {r['test_neg_elbo']:.2f}), recon MSE {r['test_recon_mse']:.4f}"
        )


class GlowKind(TransformerKind):
    """The multi-scale Glow of LVAT-Glow: NLL in bits/dim; latent = y and all factored-out z."""

    name = "glow"
    display = "Glow"
    model = Glow
    config = GlowFitConfig
    help = "the Glow of LVAT-Glow (L=3, K=22, 5-bit; NLL in bits/dim)"
    terms = ("loss", "nll", "bpd")
    divisible = "2^n_levels"
    eps = 1.0  # both datasets (paper section 4)

    def build(self, cfg: GlowFitConfig, shape: tuple[int, int, int]) -> nn.Module:
        m = cfg.model
        return Glow(shape[0], list(shape[1:]), m.n_levels, m.n_steps, m.width, m.n_bits, m.coupling)

    def divisor(self, cfg: GlowFitConfig) -> int:
        return 2**cfg.model.n_levels  # one squeeze per level

    def size_reason(self, cfg: GlowFitConfig) -> str:
        return f"a Glow with model.n_levels = {cfg.model.n_levels}"

    def initialize(self, model, x_train: torch.Tensor, cfg: GlowFitConfig, device) -> None:
        # Data-dependent ActNorm init (Glow section 3.1), once, on plain training images.
        model.initialize(init_batch(x_train, cfg.train.init_images, cfg.seed).to(device))

    def loss(self, model: nn.Module, x: torch.Tensor, cfg: GlowFitConfig) -> dict:
        return glow_loss(model, x)

    def reconstruct(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Bin-centre dequantisation: the deterministic encode LVAT's figures use.
        return model.decode(model.encode(x, deterministic=True))

    def test_metrics(self, model, x, recon, cfg: GlowFitConfig) -> dict:
        """nll with the dequantisation term, bpd, and the share with Dec(Enc(x)) == quantize(x)."""
        nll = model.nll(x)  # (B,), dequantisation noise from the seeded generator
        return dict(
            loss=nll.sum() / (model.num_dims * math.log(2.0)),
            nll=nll.sum(),
            bpd=nll.sum() / (model.num_dims * math.log(2.0)),
            recon_exact=(recon == model.quantize(x)).flatten(1).all(1).float().sum(),
        )

    def sample(self, model, n: int, cfg: GlowFitConfig, generator: torch.Generator):
        """The prior at `train.temperature`."""
        return model.sample(n, cfg.train.temperature, generator=generator)

    def summary(self, results: dict) -> str:
        r = results
        return (
            f"test {r['test_bpd']:.3f} bits/dim (with dequantisation, {r['model']['n_bits']}-bit), "
            f"NLL {r['test_nll']:.1f} nats/image, recon MSE {r['test_recon_mse']:.2e}"
        )


register_kind(VAEKind())
register_kind(GlowKind())


def kind_of(cfg: Any) -> TransformerKind:
    """The registered kind of a fit config."""
    return kind_for_config(cfg)


def default_out(kind: str, dataset: str) -> str:
    """runs/fit/DATASET-KIND (where configs/*/lvat-*.toml look); a path contributes its stem."""
    name = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    return f"runs/fit/{name or 'data'}-{kind}"


def check_image_size(kind: TransformerKind, cfg: Any, dataset: ImageDataset) -> None:
    """A one-line ConfigError if H or W does not divide; never pads silently."""
    _, h, w = dataset.image_shape
    m = kind.divisor(cfg)
    if h % m == 0 and w % m == 0:
        return
    fix = m * math.ceil(max(h, w) / m)
    what = kind.size_reason(cfg)
    now = f"data.pad_to = {cfg.data.pad_to} gives" if cfg.data.pad_to else "are"
    raise ConfigError(
        f"{dataset.name} images {now} {h}x{w}, but {what} needs H and W divisible by {m}: pass "
        f"--data.pad_to {fix}, and use the same data.pad_to for the classifier run"
    )


def check_schedule(tc: FitTrainConfig) -> None:
    """Milestones increasing and one factor more than milestones (or both empty)."""
    ms, fs = tc.lr_milestones, tc.lr_factors
    if (ms or fs) and len(fs) != len(ms) + 1:
        raise ConfigError(
            f"train.lr_factors needs one value more than train.lr_milestones "
            f"(got {len(fs)} factors for {len(ms)} milestones)"
        )
    if any(b <= a for a, b in zip(ms, ms[1:], strict=False)) or any(m < 0 for m in ms):
        raise ConfigError(f"train.lr_milestones must be increasing and >= 0, got {ms}")
    if any(not f > 0 for f in fs):
        raise ConfigError(f"train.lr_factors must be > 0, got {fs}")


def lr_at(step: int, tc: FitTrainConfig) -> float:
    """Learning rate of update `step` (0-based): warm-up x piecewise factor x staircase decay."""
    lr = tc.lr
    if step < tc.warmup_steps:
        lr *= (step + 1) / tc.warmup_steps
    if tc.lr_factors:
        lr *= tc.lr_factors[bisect.bisect_right(tc.lr_milestones, step)]
    if tc.decay_rate != 1.0 and step >= tc.decay_start:
        # Authors' VAE: x0.97 after every second epoch past epoch 80, i.e. first at 80 + 2.
        lr *= tc.decay_rate ** ((step - tc.decay_start) // tc.decay_every)
    return lr


class ImageStream:
    """Endless batches of ALL training images (labels ignored), held and augmented on `device`.

    `state_dict()` holds the generator and the position in the current pass, so a resumed run
    draws exactly the batches it would have drawn.
    """

    def __init__(
        self,
        x: torch.Tensor,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        augment: bool = False,
        translate: int = 2,
        flip: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.x = x.to(self.device)  # uint8 (N, C, H, W): 4x less memory than float
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.augment, self.translate, self.flip = augment, translate, flip
        pool = torch.arange(len(x), device=self.device)
        self.indices = IndexStream(pool, batch_size, self.generator)

    def next(self) -> torch.Tensor:
        """(B, C, H, W) float images in [0, 1] on the device."""
        x = self.x[self.indices.next()]
        if self.augment:
            x = augment(x, self.translate, self.flip, self.generator)
        return to_float(x)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "indices": self.indices.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.indices.load_state_dict(state["indices"])


def init_batch(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` distinct training images (uint8 -> float), drawn by `seed` on the CPU, for ActNorm."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[: min(n, len(x))]
    return to_float(x[idx])


@contextlib.contextmanager
def isolated_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global generators inside the block and restore them after it.

    Evaluations, probes and samples draw noise (dequantisation, reparameterisation, latent
    directions); isolating them keeps the training stream independent of when and how often we
    evaluate, which exact resume relies on, and makes every evaluation reproducible.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
