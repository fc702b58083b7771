"""Invertible layers of Glow: ActNorm, InvConv2dLU, AffineCoupling, Squeeze, FactorOut, FlowStep.

Follows Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (NeurIPS
2018). Names and the LU parametrisation of the 1x1 convolution follow rosinality/glow-pytorch;
the coupling network, the log-scale clamp at +-15 and the factor-out convention (the *first*
half of the channels leaves) follow the LVAT authors' TF code (geosada/LVAT `glow/flow_layers.py`),
itself derived from kmkolasinski's deep-learning-notes Glow notebook.

Contract shared by every layer (and by `lvat.models.glow.GlowLevel` / `Glow`):

* ``forward(x) -> (y, logdet)``: ``logdet`` has shape (B,) and is log|det dy/dx| per sample.
* ``reverse(y) -> x``: the exact inverse of ``forward`` (its log-det is ``-logdet``; the tests check
  that with autograd Jacobians, so ``reverse`` does not return it).

Tensors are NCHW. No layer creates tensors without ``device=``/``dtype=`` taken from its input,
and none reads values back to the host, so every layer is compile- and device-agnostic.
ActNorm's data-dependent initialisation is an explicit method (`ActNorm.initialize`), never a
flag checked in ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Authors' coupling: scale = exp(clip(log_scale, -15, 15)). The clamp bounds every coupling's
# expansion to e^15 per layer in *both* directions; over many layers that can still overflow
# float32 on perturbed latents the flow never saw, hence `glow.REVERSE_BOUND` in Glow's inverse.
LOG_SCALE_CLAMP = 15.0
COUPLINGS = ("affine", "sigmoid")


def _per_sample(value: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Broadcast a scalar log-det (input-independent layers) to a fresh (B,) tensor."""
    return value.reshape(1).repeat(batch_size)


class ActNorm(nn.Module):
    """Per-channel affine map y = (x + b) * exp(s), with data-dependent init (Glow §3.1).

    Parameters ``bias`` (b) and ``logs`` (s) have shape (1, C, 1, 1). Until `initialize` is
    called the layer is the identity; call it once, before training, on a batch of the
    activations this layer sees (`Glow.initialize` does this for every ActNorm, level by level).

    Args:
        num_channels: C.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, eps: float = 1e-6) -> None:
        """Set b = -mean(x), s = -log(std(x) + eps) per channel so that y has mean 0, std 1."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
        std = x.std(dim=(0, 2, 3), keepdim=True, correction=0)  # population std, as Glow
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + eps))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = (x + self.bias) * torch.exp(self.logs)
        # Every pixel shares the per-channel scale: log|det| = H * W * sum_c s_c.
        logdet = self.logs.sum() * (x.shape[2] * x.shape[3])
        return y, _per_sample(logdet, x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv2dLU(nn.Module):
    """Invertible 1x1 convolution W = P L (U + diag(sign(s) * exp(log|s|))) (Glow §3.2).

    Initialised from a random rotation. P and sign(s) are fixed buffers; the strictly lower L,
    strictly upper U and log|s| are learned, so log|det W| = sum(log|s|) costs O(C).

    Args:
        num_channels: C.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        q = torch.linalg.qr(torch.randn(num_channels, num_channels))[0]  # random rotation
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        mask = torch.tril(torch.ones(num_channels, num_channels), diagonal=-1)
        self.register_buffer("w_p", p)
        self.register_buffer("s_sign", torch.sign(s))
        self.register_buffer("l_mask", mask)
        self.register_buffer("eye", torch.eye(num_channels))
        self.w_l = nn.Parameter(lower * mask)
        self.w_s = nn.Parameter(torch.log(torch.abs(s)))
        self.w_u = nn.Parameter(upper * mask.T)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lower = self.w_l * self.l_mask + self.eye  # unit lower-triangular
        upper = self.w_u * self.l_mask.T + torch.diag(self.s_sign * torch.exp(self.w_s))
        return lower, upper

    def weight(self) -> torch.Tensor:
        """The (C, C) matrix W."""
        lower, upper = self._factors()
        return self.w_p @ lower @ upper

    def inverse_weight(self) -> torch.Tensor:
        """W^-1 = U^-1 L^-1 P^T by triangular solves (more accurate than inverting W)."""
        lower, upper = self._factors()
        l_inv_pt = torch.linalg.solve_triangular(lower, self.w_p.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, l_inv_pt, upper=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.conv2d(x, self.weight()[:, :, None, None])
        logdet = self.w_s.sum() * (x.shape[2] * x.shape[3])
        return y, _per_sample(logdet, x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.conv2d(y, self.inverse_weight()[:, :, None, None])


class AffineCoupling(nn.Module):
    """Affine coupling: x1 passes unchanged and conditions y2 = (x2 + shift(x1)) * scale(x1).

    NN(x1) = conv3x3 width -> ReLU -> conv1x1 width -> ReLU -> zero-initialised conv3x3, whose
    output splits into (shift, h). The zero init makes every coupling the identity at start.

    ``coupling="affine"`` (default, the authors' code): log_scale = clamp(h, -15, 15).
    ``coupling="sigmoid"`` (the bounded variant of OpenAI's Glow): log_scale = log sigmoid(h + 2),
    so the forward map never expands; we still clamp it at -15 so that ``reverse`` (which divides
    by the scale) expands by at most e^15 per layer. Per layer only: a deep inverse can still
    overflow, which `Glow`'s saturating reverse (`glow.REVERSE_BOUND`) guards against.

    Args:
        num_channels: C (even or odd; x1 gets the first C // 2 channels).
        width: hidden channels of NN.
        coupling: "affine" or "sigmoid".
    """

    def __init__(self, num_channels: int, width: int = 128, coupling: str = "affine") -> None:
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        self.coupling = coupling
        self.c1 = num_channels // 2
        self.c2 = num_channels - self.c1
        self.net = nn.Sequential(
            nn.Conv2d(self.c1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 1),
            nn.ReLU(),
        )
        self.zero_conv = nn.Conv2d(width, 2 * self.c2, 3, padding=1)
        nn.init.zeros_(self.zero_conv.weight)
        nn.init.zeros_(self.zero_conv.bias)

    def _shift_log_scale(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.zero_conv(self.net(x1))  # (B, 2 * c2, H, W)
        shift, raw = h[:, : self.c2], h[:, self.c2 :]
        if self.coupling == "sigmoid":
            log_scale = F.logsigmoid(raw + 2.0).clamp(min=-LOG_SCALE_CLAMP)
        else:
            log_scale = raw.clamp(-LOG_SCALE_CLAMP, LOG_SCALE_CLAMP)
        return shift, log_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.c1], x[:, self.c1 :]
        shift, log_scale = self._shift_log_scale(x1)
        y2 = (x2 + shift) * torch.exp(log_scale)
        return torch.cat([x1, y2], dim=1), log_scale.flatten(1).sum(1)

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[:, : self.c1], y[:, self.c1 :]
        shift, log_scale = self._shift_log_scale(y1)
        x2 = y2 * torch.exp(-log_scale) - shift
        return torch.cat([y1, x2], dim=1)


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth by 2: (B, C, H, W) -> (B, 4C, H/2, W/2)."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    """Depth-to-space by 2: (B, 4C, H, W) -> (B, C, 2H, 2W); inverse of `squeeze2d`."""
    return F.pixel_shuffle(x, 2)


class Squeeze(nn.Module):
    """`squeeze2d` as a flow layer (a permutation: log-det 0)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return squeeze2d(x), x.new_zeros(x.shape[0])

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        return unsqueeze2d(y)


class FactorOut(nn.Module):
    """Multi-scale split: the first C // 2 channels leave the flow as z, the rest (h) go on.

    ``forward(x) -> ((h, z), logdet=0)``; ``reverse((h, z)) -> x``.
    """

    def forward(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        split = x.shape[1] // 2
        z, h = x[:, :split], x[:, split:]
        return (h, z), x.new_zeros(x.shape[0])

    def reverse(self, hz: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, z = hz
        return torch.cat([z, h], dim=1)


class FlowStep(nn.Module):
    """One step of flow: ActNorm -> InvConv2dLU -> AffineCoupling (Glow Fig. 2a).

    Args:
        num_channels: C.
        width: hidden channels of the coupling network.
        coupling: "affine" or "sigmoid" (see `AffineCoupling`).
    """

    def __init__(self, num_channels: int, width: int = 128, coupling: str = "affine") -> None:
        super().__init__()
        self.actnorm = ActNorm(num_channels)
        self.invconv = InvConv2dLU(num_channels)
        self.coupling = AffineCoupling(num_channels, width, coupling)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, logdet = self.actnorm(x)
        x, ld = self.invconv(x)
        logdet = logdet + ld
        x, ld = self.coupling(x)
        return x, logdet + ld

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        y = self.coupling.reverse(y)
        y = self.invconv.reverse(y)
        return self.actnorm.reverse(y)
