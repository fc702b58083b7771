"""The fast path of a run on its device: bf16 autocast, channels-last, torch.compile, fused Adam,
and LVAT's latent cache. Each is a `train.*` config key, resolved here for the device at hand.

`auto` turns bf16 and channels-last on where they pay: on CUDA, and on CPUs with bf16 units
(AVX512-BF16 or AMX, `lvat.environment.native_bf16`); elsewhere bf16 is emulated and slower.

What is safe where (the regularizers enforce the float32 part themselves):

- bf16 autocast covers the labeled pass and the adversarial pass, whose backward gives the
  parameter gradients; the clean target, the power-iteration probes and every transformer pass
  stay in true float32 (`lvat.regularizers.common.full_precision`).
- channels-last changes only the memory layout of the classifier's conv weights and activations.
- torch.compile wraps the classifier and the transformer's `decode`; `torch.autograd.grad` in the
  power iteration stays eager and differentiates through the compiled graphs. The exact power
  method's products need forward-mode AD, which compiled graphs lack: they run eagerly
  (`lvat.regularizers.exact.forward_mode`), the labeled and adversarial passes compiled.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lvat import environment
from lvat.config import Config, TrainConfig
from lvat.data import to_float
from lvat.errors import ConfigError
from lvat.regularizers import METHODS, Latent, Regularizer
from lvat.regularizers.common import full_precision

__all__ = [
    "FastPath",
    "LatentCache",
    "adam",
    "apply",
    "bf16_is_fast",
    "check_cache",
    "describe_cache",
    "latent_cache",
    "resolve",
]


@dataclass(frozen=True)
class FastPath:
    """The resolved fast-path switches of a run."""

    amp_dtype: torch.dtype | None  # autocast dtype of the classifier passes; None = float32
    channels_last: bool  # the classifier's layout
    compile: bool
    transformer_channels_last: bool = False  # the (frozen, float32) VAE/Glow's layout

    def describe(self) -> dict:
        """JSON-ready summary for results.json and the benchmark."""
        amp = "off" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")
        return {
            "amp": amp,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "transformer_channels_last": self.transformer_channels_last,
        }


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 autocast pays on CUDA and on CPUs with bf16 units (AVX512-BF16, AMX); emulated
    elsewhere, it is slower than float32."""
    return device.type == "cuda" or (device.type == "cpu" and environment.native_bf16())


# Methods that `amp = "auto"` keeps in float32 although bf16 would be faster: LVAT-VAE trained
# 1.0 and 2.0 points worse in bf16 (finite difference, exact; docs/numerics.md section 5) for a
# step only ~1.25x faster, since its transformer passes stay float32 anyway.
AUTO_FLOAT32 = frozenset({"lvat"})


def resolve(tc: TrainConfig, device: torch.device, method: str = "") -> FastPath:
    """`auto`: amp is bf16 where bf16 is fast (`bf16_is_fast`), unless `method` (the config's
    method.name) is one of `AUTO_FLOAT32`; channels_last is on for CUDA and wherever amp is
    bf16 for the classifier, and everywhere for LVAT's transformer."""
    cuda = device.type == "cuda"
    auto_bf16 = tc.amp == "auto" and bf16_is_fast(device) and method not in AUTO_FLOAT32
    amp_dtype = torch.bfloat16 if tc.amp == "bf16" or auto_bf16 else None
    # oneDNN's bf16 convolutions want NHWC too: on a CPU, channels-last pays only under bf16.
    nhwc = cuda or amp_dtype is not None
    channels_last = tc.channels_last == "on" or (tc.channels_last == "auto" and nhwc)
    # The transformer runs in float32 even on a CPU without bf16, and there its few-channel
    # convolutions (Glow's couplings: 2 -> 128 -> 128 -> 4 channels at 16 x 16) are 2-4x faster
    # in NHWC: LVAT-Glow and LVAT-VAE steps 1.2x faster (bench/cpu-transformer-layout.json, AMD
    # EPYC without AVX-512, 1 thread).
    transformer_nhwc = tc.channels_last != "off"
    return FastPath(amp_dtype, channels_last, tc.compile, transformer_nhwc)


def apply(model: nn.Module, regularizer: Regularizer | None, fast: FastPath) -> nn.Module:
    """Set the layouts of the classifier and of the regularizer's transformer, and compile them
    (in place: state_dict keys stay the same)."""
    transformer = getattr(regularizer, "transformer", None)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-D weights only; Linear stays as is
    if fast.transformer_channels_last and isinstance(transformer, nn.Module):
        transformer.to(memory_format=torch.channels_last)
    if fast.compile:
        model.compile()
        if isinstance(transformer, nn.Module):
            # An instance attribute shadows the method; encode stays eager (it is cheap or cached).
            transformer.decode = torch.compile(transformer.decode)
    return model


def adam(model: nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """The paper's Adam; one fused kernel for all parameters on CUDA (the default, foreach, runs
    a few kernels per parameter group)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), **fused)


class LatentCache:
    """encode(x) of every training image, computed once: the transformer is frozen.

    Latents are kept in float32 on the training device, indexed by the image's position in
    `x_train`. Memory: 4 bytes per latent value, e.g. VAE 128 values = 512 B per image; Glow on
    3x32x32 = 3,072 values = 12 KiB per image (0.9 GB for SVHN's 73,257 images).

    With Glow, `encode` adds uniform dequantisation noise u ~ U(0, 1/2^bits); cached, u is drawn
    once per image (from the run's seed) instead of once per step: the regulariser then sees one
    fixed dequantised point per image. Adding fresh noise in latent space would not be equivalent
    (the flow is not linear), so the cache simply documents this trade-off.
    """

    def __init__(self, groups: list[Tensor], is_tensor: bool) -> None:
        self.groups = groups
        self.is_tensor = is_tensor

    @property
    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.groups)

    def __len__(self) -> int:
        return len(self.groups[0])

    def lookup(self, idx: Tensor) -> Latent:
        """Latents of training images `idx` (B,), with the structure `encode` returns."""
        picked = [g[idx] for g in self.groups]
        return picked[0] if self.is_tensor else tuple(picked)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        transformer: nn.Module,
        x_train: Tensor,
        device: torch.device,
        *,
        seed: int,
        batch_size: int = 500,
    ) -> LatentCache:
        """Encode uint8 images `x_train` (N, C, H, W) in batches, in true float32.

        Random draws inside `encode` (Glow's dequantisation) come from `seed`, in a forked RNG:
        the cache is the same on every rank and after a resume, and the training RNG is untouched.
        """
        devices = [device] if device.type == "cuda" else []
        parts: list[list[Tensor]] = []
        is_tensor = True
        with torch.random.fork_rng(devices=devices), full_precision(device):
            torch.manual_seed(seed)
            for i in range(0, len(x_train), batch_size):
                z = transformer.encode(to_float(x_train[i : i + batch_size].to(device)))
                is_tensor = isinstance(z, Tensor)
                groups = [z] if is_tensor else list(z)
                parts.append([g.detach().float() for g in groups])
        return cls([torch.cat(col) for col in zip(*parts, strict=True)], is_tensor)


def check_cache(cfg: Config) -> None:
    """Refuse `train.cache_latents` where it cannot be exact (augmented batches) or applies to
    nothing (no transformer)."""
    if not cfg.train.cache_latents:
        return
    if not METHODS[cfg.method.name].needs_transformer:
        encoders = " or ".join(m.display for m in METHODS.values() if m.needs_transformer)
        raise ConfigError(
            f"train.cache_latents: only {encoders} encodes images (method.name = {cfg.method.name})"
        )
    if cfg.data.augment:
        raise ConfigError(
            "train.cache_latents needs data.augment = false: an augmented image is a new image "
            "each step, so its latent cannot be computed once; turn one of them off"
        )


def latent_cache(
    cfg: Config, regularizer: Regularizer | None, x_train: Tensor, device: torch.device, log: bool
) -> LatentCache | None:
    """The run's latent cache, or None when `train.cache_latents` is off; prints its size.
    The latents are those of the regularizer's `transformer` (a method that needs one)."""
    check_cache(cfg)
    transformer = getattr(regularizer, "transformer", None)
    if not cfg.train.cache_latents or transformer is None:
        return None
    if not isinstance(transformer, nn.Module):
        raise ConfigError("train.cache_latents needs an nn.Module transformer")
    cache = LatentCache.build(
        transformer, x_train, device, seed=cfg.seed, batch_size=cfg.train.eval_batch_size
    )
    if log:
        per_image = cache.nbytes / max(len(cache), 1)
        print(
            f"cache_latents: {len(cache)} latents, {cache.nbytes / 2**20:.1f} MiB on {device} "
            f"({per_image:,.0f} B per image)",
            file=sys.stderr,
        )
    return cache


def describe_cache(cache: LatentCache | None) -> dict:
    """JSON-ready size of the cache for results.json."""
    if cache is None:
        return {}
    return {"latent_cache_mib": round(cache.nbytes / 2**20, 2)}
