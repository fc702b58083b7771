"""Glow, the flow "transformer" of LVAT-Glow, with a full, differentiable encode/decode.

Model: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (NeurIPS 2018),
multi-scale as in RealNVP. Configuration and pre/post-processing follow the LVAT authors' TF code
(geosada/LVAT `glow/`, from kmkolasinski's deep-learning-notes Glow notebook): L = 3 levels,
K = 22 steps, coupling width 128, 5-bit images, N(0, I) priors on y and z. Layer vocabulary
follows rosinality/glow-pytorch (see `lvat.models.flows`).

Per level: squeeze -> K x FlowStep -> factor-out (first half of the channels leaves as z, also
after the last level). What remains after the last level is y. For 3x32x32 inputs at L = 3:
y is (24, 4, 4) = 384 values and z totals 6*16*16 + 12*8*8 + 24*4*4 = 2688 values.

Latent = ``(y, z)``: y is (B, C_y, H_y, W_y); z is every factored-out half, each flattened in
NCHW order and concatenated in level order into one (B, n_z) tensor (`Glow.split_z` recovers the
per-level tensors). LVAT normalises each group per sample, so the layout is immaterial there.

Quantisation (n_bits = b, bins = 2^b; x in [0, 1] is an 8-bit image):
    k  = floor(round(255 x) / 2^(8-b))                   integer level in [0, bins)
    x~ = k / bins - 0.5 + u,  u ~ U(0, 1/bins)           (deterministic: u = 1 / (2 bins))
    decode: k^ = clip(floor_ste((flow^-1(latent) + 0.5) * bins), 0, bins - 1)
            x^ = k^ 2^(8-b) / 255                        in [0, 1], on the n_bits grid
floor_ste floors forward and passes the gradient unchanged, so decode is differentiable w.r.t. the
latent and decode(encode(x)) == quantize(x) := k 2^(8-b) / 255 exactly (the authors' decoder
output; for 8-bit data and b = 8 that is x itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lvat.models.flows import COUPLINGS, FactorOut, FlowStep, Squeeze

Latent = tuple[torch.Tensor, torch.Tensor]  # (y, z)

_LOG_2PI = math.log(2.0 * math.pi)

# The inverse of a flow expands wherever the forward map contracts: each reverse coupling divides
# by its scale (down to e^-15), so a latent off the data manifold can grow by ~1e4 per step and
# overflow float32 within a level, and inf - inf then turns the decoded image into NaN. LVAT's
# adversary seeks exactly such directions (the shipped Fashion-MNIST Glow, eps 0.5: 1 sample of 32
# reached 1e34 after 10 training updates). So `reverse` saturates: before and after every flow
# step each activation is clamped to +-REVERSE_BOUND, ~500x the largest activation any real image
# produces (19.7 over 5,120 Fashion-MNIST images, shipped Glow). Encode -> decode of real data never
# reaches it, so decode(encode(x)) == quantize(x) still holds exactly; a latent that does reach it
# decodes to a finite, saturated image (pixels 0 or 1 where the value ran away), with zero
# gradient through the clamped activations, instead of NaN (docs/method.md, "Glow").
REVERSE_BOUND = 1e4


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """floor(x) in the forward pass, identity gradient (straight-through), as the authors."""
    return x + (torch.floor(x) - x).detach()


def gaussian_log_prob(t: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(t; 0, I) summed over all non-batch elements -> (B,)."""
    return -0.5 * (t.square() + _LOG_2PI).flatten(1).sum(1)


class GlowLevel(nn.Module):
    """One level (rosinality's `Block`): squeeze -> K FlowSteps -> factor-out.

    ``forward(x) -> ((h, z), logdet)``, ``reverse((h, z)) -> x``.

    Args:
        in_channels: channels before the squeeze.
        n_steps: K (0 allowed: the level is then a permutation).
        width: coupling width.
        coupling: "affine" or "sigmoid".
    """

    def __init__(self, in_channels: int, n_steps: int, width: int, coupling: str) -> None:
        super().__init__()
        self.squeeze = Squeeze()
        self.steps = nn.ModuleList(
            FlowStep(4 * in_channels, width, coupling) for _ in range(n_steps)
        )
        self.factor_out = FactorOut()

    def forward(self, x: torch.Tensor) -> tuple[Latent, torch.Tensor]:
        h, logdet = self.squeeze(x)
        for step in self.steps:
            h, ld = step(h)
            logdet = logdet + ld
        hz, _ = self.factor_out(h)
        return hz, logdet

    def reverse(self, hz: Latent, saturated: torch.Tensor | None = None) -> torch.Tensor:
        """(h, z) -> x, every activation into and out of a flow step clamped to +-REVERSE_BOUND.

        ``saturated``: an optional (B,) bool tensor, set in place for each sample where the clamp
        was reached.
        """
        h = self.factor_out.reverse(hz)

        def bounded(t: torch.Tensor) -> torch.Tensor:
            if saturated is not None:
                with torch.no_grad():
                    saturated.logical_or_((t.abs() >= REVERSE_BOUND).flatten(1).any(1))
            return t.clamp(-REVERSE_BOUND, REVERSE_BOUND)

        h = bounded(h)
        for step in reversed(self.steps):
            h = bounded(step.reverse(h))
        return self.squeeze.reverse(h)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> Latent:
        """Data-dependent ActNorm init: each ActNorm is fitted to the activations it receives."""
        h, _ = self.squeeze(x)
        for step in self.steps:
            step.actnorm.initialize(h)
            h, _ = step(h)
        hz, _ = self.factor_out(h)
        return hz


class Glow(nn.Module):
    """Multi-scale Glow with N(0, I) priors and the transformer protocol encode/decode.

    Args:
        in_channels: image channels C.
        image_size: H = W, or [H, W]; each must be divisible by 2^n_levels.
        n_levels: L.
        n_steps: K, flow steps per level (0 makes the flow a fixed permutation).
        width: hidden channels of every coupling network.
        n_bits: bits per colour channel the model sees (authors: 5; 8 = full data).
        coupling: "affine" (authors: exp(clamp(h, +-15))) or "sigmoid" (sigmoid(h + 2)).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | Sequence[int] = 32,
        n_levels: int = 3,
        n_steps: int = 22,
        width: int = 128,
        n_bits: int = 5,
        coupling: str = "affine",
    ) -> None:
        super().__init__()
        self.last_saturated: torch.Tensor | None = None  # set by `reverse`
        height, width_px = (
            (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        )
        if n_levels < 1 or height % 2**n_levels or width_px % 2**n_levels:
            raise ValueError(
                f"image size {height}x{width_px} must be divisible by 2^n_levels = {2**n_levels}"
            )
        if not 1 <= n_bits <= 8:
            raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        self._hparams = dict(
            in_channels=in_channels,
            image_size=image_size if isinstance(image_size, int) else list(image_size),
            n_levels=n_levels,
            n_steps=n_steps,
            width=width,
            n_bits=n_bits,
            coupling=coupling,
        )
        self.n_bits = n_bits
        self.input_shape = (in_channels, height, width_px)

        # Latent shapes up front (rosinality): each level squeezes (C, H, W) -> (4C, H/2, W/2)
        # and factors out the first half of the channels.
        self.levels = nn.ModuleList()
        self.z_shapes: list[tuple[int, int, int]] = []
        c, h, w = self.input_shape
        for _ in range(n_levels):
            self.levels.append(GlowLevel(c, n_steps, width, coupling))
            c, h, w = 4 * c, h // 2, w // 2
            self.z_shapes.append((c // 2, h, w))
            c = c - c // 2
        self.y_shape = (c, h, w)
        self.z_sizes = [math.prod(s) for s in self.z_shapes]
        # Non-persistent dummy buffer: device/dtype for `sample` even when K = 0 (no parameters).
        self.register_buffer("_ref", torch.zeros(()), persistent=False)

    @property
    def hparams(self) -> dict:
        """JSON-serialisable constructor kwargs: ``type(m)(**m.hparams)`` rebuilds the model."""
        return dict(self._hparams)

    @property
    def num_dims(self) -> int:
        """D = C * H * W, the dimension of x (and of the latent)."""
        return math.prod(self.input_shape)

    # ----------------------------------------------------------------- flow part (on x~)
    def forward(self, x: torch.Tensor) -> tuple[Latent, torch.Tensor]:
        """Flow x~ (B, C, H, W) in [-0.5, 0.5) -> ((y, z), logdet (B,))."""
        logdet = x.new_zeros(x.shape[0])
        zs = []
        h = x
        for level in self.levels:
            (h, z), ld = level(h)
            zs.append(z.flatten(1))
            logdet = logdet + ld
        return (h, torch.cat(zs, dim=1)), logdet

    def reverse(self, latent: Latent) -> torch.Tensor:
        """Inverse flow: (y, z) -> x~. Differentiable w.r.t. both groups.

        Saturating (`REVERSE_BOUND`); ``last_saturated`` then holds, per sample of this call,
        whether any activation reached the bound (LVAT reports its mean for the adversarial
        decode as the training stat "saturated_decode").
        """
        y, z = latent
        h = y
        saturated = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        for level, z_i in zip(reversed(self.levels), reversed(self.split_z(z)), strict=True):
            h = level.reverse((h, z_i), saturated)
        self.last_saturated = saturated
        return h

    def split_z(self, z: torch.Tensor) -> list[torch.Tensor]:
        """(B, n_z) -> per-level tensors [(B, *z_shapes[i])], level order."""
        parts = torch.split(z.flatten(1), self.z_sizes, dim=1)
        return [p.reshape(-1, *s) for p, s in zip(parts, self.z_shapes, strict=True)]

    # ------------------------------------------------------------ (de)quantisation
    def _levels(self, x: torch.Tensor) -> torch.Tensor:
        # round() snaps to the 8-bit level first so float error in 255 * x cannot drop a level.
        return torch.floor(torch.round(x * 255.0) / 2 ** (8 - self.n_bits))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The n_bits image the model represents, in [0, 1]: k * 2^(8-b) / 255."""
        # Integer product first, one division: bit-identical to the data layer's uint8 / 255.
        return self._levels(x) * 2 ** (8 - self.n_bits) / 255.0

    def preprocess(self, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Image in [0, 1] -> dequantised x~ = k / bins - 0.5 + u in [-0.5, 0.5).

        u ~ U(0, 1/bins) (authors); ``deterministic=True`` uses its mean 1/(2 bins), the bin centre.
        """
        bins = 2.0**self.n_bits
        x_q = self._levels(x) / bins - 0.5
        if deterministic:
            return x_q + 0.5 / bins
        # Drawn in float32 whatever x's precision: a float64 copy sees the same noise (same seed).
        u = torch.rand(x.shape, device=x.device, dtype=torch.float32).to(x.dtype)
        return x_q + u / bins

    def postprocess(self, x_tilde: torch.Tensor) -> torch.Tensor:
        """x~ -> image: +0.5, straight-through floor to n_bits, clip, rescale to [0, 1].

        The clip is on the level k in [0, bins - 1], so every output is a valid n_bits image
        (max 248/255 at 5 bits); the authors clip k 2^(8-b) to [0, 255] instead, which only
        differs for saturated pixels of perturbed latents (255/255 there).
        """
        bins = 2**self.n_bits
        k = torch.clamp(floor_ste((x_tilde + 0.5) * bins), 0.0, bins - 1.0)
        return k * 2 ** (8 - self.n_bits) / 255.0

    # ------------------------------------------------------------ transformer protocol
    def encode(self, x: torch.Tensor, deterministic: bool = False) -> Latent:
        """Image (B, C, H, W) in [0, 1] -> full latent (y, z). Random (dequantisation) unless
        ``deterministic``; reproducible under `torch.manual_seed`."""
        latent, _ = self(self.preprocess(x, deterministic))
        return latent

    def decode(self, latent: Latent) -> torch.Tensor:
        """Full latent (y, z) -> image in [0, 1] on the n_bits grid; differentiable (STE)."""
        return self.postprocess(self.reverse(latent))

    # ------------------------------------------------------------ likelihood
    def log_prob(self, x_tilde: torch.Tensor) -> torch.Tensor:
        """log p(x~) (B,) in nats: prior log N(y) + log N(z) + flow log|det|."""
        (y, z), logdet = self(x_tilde)
        return gaussian_log_prob(y) + gaussian_log_prob(z) + logdet

    def nll(self, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Discrete NLL per image in nats: -log p(x~) + D log(2^n_bits).

        The D log(bins) term converts the density of x~ (bins of width 1/bins) to a probability
        mass of the n_bits image; x~ is dequantised as in `preprocess`.
        """
        logp = self.log_prob(self.preprocess(x, deterministic))
        return -logp + self.num_dims * self.n_bits * math.log(2.0)

    def bits_per_dim(self, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """bpd (B,) = (-log p(x~) + D log(2^n_bits)) / (D ln 2), WITH the dequantisation term
        (the authors omit it)."""
        return self.nll(x, deterministic) / (self.num_dims * math.log(2.0))

    # ------------------------------------------------------------ sampling / init
    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw y, z ~ N(0, temperature^2 I) and decode -> (n, C, H, W) in [0, 1]."""
        kw = dict(device=self._ref.device, dtype=self._ref.dtype, generator=generator)
        y = torch.randn(n, *self.y_shape, **kw) * temperature
        z = torch.randn(n, sum(self.z_sizes), **kw) * temperature
        return self.decode((y, z))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, deterministic: bool = False) -> Glow:
        """Data-dependent init of every ActNorm (Glow §3.1), once, before training.

        Pushes the batch ``x`` (images in [0, 1]; use a few hundred) through the model level by
        level, fitting each ActNorm to the activations it sees. The result lives in the ActNorm
        parameters, hence in the state dict; ``forward`` checks no flag.
        """
        h = self.preprocess(x, deterministic)
        for level in self.levels:
            h, _ = level.initialize(h)
        return self


def glow_loss(model: Glow, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training loss on images x in [0, 1] (dequantisation noise on).

    Returns scalars: ``loss`` (= mean bpd, the quantity to minimise), ``nll`` (mean nats per
    image, with the quantisation term) and ``bpd``.
    """
    nll = model.nll(x)
    bpd = nll / (model.num_dims * math.log(2.0))
    return {"loss": bpd.mean(), "nll": nll.mean(), "bpd": bpd.mean()}


@torch.no_grad()
def nonfinite_decode_rate(
    transformer: nn.Module,
    x: torch.Tensor,
    eps: float = 1.0,
    generator: torch.Generator | None = None,
) -> float:
    """Share of samples whose Dec(Enc(x) + r) has a non-finite value (should be 0.0).

    r is a random direction of L2 norm ``eps`` per sample and per latent group (a tensor latent is
    one group; a (y, z) tuple is two), as LVAT's perturbation. Works with any object having
    ``encode``/``decode``; the model's train/eval mode is left as it is.
    """
    latent = transformer.encode(x)
    groups = (latent,) if isinstance(latent, torch.Tensor) else tuple(latent)
    perturbed = []
    for g in groups:
        d = torch.randn(g.shape, device=g.device, dtype=g.dtype, generator=generator)
        norm = d.flatten(1).norm(dim=1).reshape(-1, *([1] * (g.dim() - 1)))
        perturbed.append(g + eps * d / norm)
    out = transformer.decode(perturbed[0] if isinstance(latent, torch.Tensor) else tuple(perturbed))
    bad = ~torch.isfinite(out.flatten(1)).all(dim=1)
    return bad.float().mean().item()
