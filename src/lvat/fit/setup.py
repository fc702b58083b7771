"""The parts of `lvat fit`: the two kinds (VAE, Glow), the image stream and the lr schedule.

A `Kind` bundles what differs between the transformers: config class, constructor, training
loss, and deterministic reconstruction Dec(Enc(x)). Everything else (loop, checkpoints,
evaluation, grids) is shared.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from lvat.models.vae import VAE, vae_loss

FitConfig = VAEFitConfig | GlowFitConfig


@dataclass(frozen=True)
class Kind:
    """What `lvat fit` needs to know about one kind of transformer."""

    name: str
    config: type
    terms: tuple[str, ...]  # training metrics returned by `loss`, summed per step; first = loss
    divisor: Callable[[Any], int]  # H and W must be multiples of this
    build: Callable[[Any, tuple[int, int, int]], nn.Module]
    loss: Callable[[nn.Module, torch.Tensor, Any], dict[str, torch.Tensor]]
    reconstruct: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _build_vae(cfg: VAEFitConfig, shape: tuple[int, int, int]) -> nn.Module:
    m = cfg.model
    return VAE(shape[0], list(shape[1:]), m.latent_dim, m.sigma_floor_one, m.truncated_noise)


def _build_glow(cfg: GlowFitConfig, shape: tuple[int, int, int]) -> nn.Module:
    m = cfg.model
    return Glow(shape[0], list(shape[1:]), m.n_levels, m.n_steps, m.width, m.n_bits, m.coupling)


KINDS: dict[str, Kind] = {
    "vae": Kind(
        name="vae",
        config=VAEFitConfig,
        terms=("loss", "bce", "kl"),
        divisor=lambda cfg: 8,  # three stride-2 convolutions (paper Table 2)
        build=_build_vae,
        loss=lambda model, x, cfg: vae_loss(model, x, cfg.train.kl_weight),
        reconstruct=lambda model, x: model.decode(model.encode(x)),  # mu, no sampling
    ),
    "glow": Kind(
        name="glow",
        config=GlowFitConfig,
        terms=("loss", "nll", "bpd"),
        divisor=lambda cfg: 2**cfg.model.n_levels,  # one squeeze per level
        build=_build_glow,
        loss=lambda model, x, cfg: glow_loss(model, x),
        # Bin-centre dequantisation: the deterministic encode LVAT's figures use.
        reconstruct=lambda model, x: model.decode(model.encode(x, deterministic=True)),
    ),
}


def kind_of(cfg: FitConfig) -> Kind:
    for kind in KINDS.values():
        if isinstance(cfg, kind.config):
            return kind
    raise TypeError(f"not a fit config: {type(cfg).__name__}")


def default_out(kind: str, dataset: str) -> str:
    """runs/fit/DATASET-KIND (where configs/*/lvat-*.toml look); a path contributes its stem."""
    name = Path(dataset).stem if ("/" in dataset or "." in dataset) else dataset
    return f"runs/fit/{name or 'data'}-{kind}"


def check_image_size(kind: Kind, cfg: FitConfig, dataset: ImageDataset) -> None:
    """A one-line ConfigError if H or W does not divide; never pads silently."""
    _, h, w = dataset.image_shape
    m = kind.divisor(cfg)
    if h % m == 0 and w % m == 0:
        return
    fix = m * math.ceil(max(h, w) / m)
    what = (
        "the VAE (three stride-2 convolutions)"
        if kind.name == "vae"
        else (f"a Glow with model.n_levels = {cfg.model.n_levels}")
    )
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
