"""VAE, the DCGAN-style "transformer" of LVAT-VAE, and its training loss.

Architecture: Osada et al., "Regularization with Latent Space Virtual Adversarial Training"
(ECCV 2020), Table 2; details (latent parametrisation, sigma floor, loss, init, BN) from the
authors' TF code, geosada/LVAT `vae/VAE.py`, `vae/util/layers.py`, `vae/util/losses.py`.

    Enc: conv2x2/2 128, BN, ReLU; conv2x2/2 256, BN, ReLU; conv2x2/2 512, BN, tanh;
         flatten; fc -> 2 * latent = (mu, logsigma).
    Dec: fc latent -> 32 * H/8 * W/8, lReLU 0.1, reshape (32, H/8, W/8);
         deconv2x2/2 512, BN, ReLU; deconv 256, BN, ReLU; deconv 128, BN, ReLU;
         conv1x1 -> C, sigmoid.

For 32x32 inputs that is exactly Table 2 (fc 8192 -> 256, fc 128 -> 512 = 4x4x32). Any H, W
divisible by 8 work; 28x28 data (Fashion-MNIST) is zero-padded to 32x32 by the data layer.

LVAT perturbs the encoder mean: ``encode(x)`` returns mu (B, latent_dim), ``decode(z)`` images in
[0, 1]. Sigma floor (``sigma_floor_one=True``, default, faithful): the authors clip logsigma to
[1e-8, 50] before exp, so sigma >= 1 always. The KL term pushes sigma down to that floor, where the
clip has no gradient, so in practice sigma == 1 and the encoder learns mu against unit noise: the
spread of mu, i.e. the scale eps acts on in LVAT, is set by that. ``sigma_floor_one=False`` gives
a standard VAE (logsigma unconstrained but clipped to [-20, 20] for float safety).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# TF1 `tf.layers.batch_normalization` defaults used by the authors: decay 0.99, epsilon 1e-3.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
LRELU_SLOPE = 0.1
DECODER_CHANNELS = 32  # fc output is reshaped to (32, H/8, W/8) (Table 2: 4x4x32)
LOGSIGMA_FLOOR = 1e-8  # authors' clip: logsigma >= 1e-8  =>  sigma >= 1
# Authors' upper clip is 50, but exp(2 * 50) overflows float32 in the KL; 20 never binds in
# practice (the KL drives logsigma down) and keeps everything finite.
LOGSIGMA_MAX = 20.0
LOGSIGMA_MIN_STANDARD = -20.0


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class VAE(nn.Module):
    """Convolutional VAE of paper Table 2 for (C, H, W) images in [0, 1], H, W divisible by 8.

    Args:
        in_channels: C.
        image_size: H = W, or [H, W]; both must be divisible by 8.
        latent_dim: dimension of mu (paper: 128).
        sigma_floor_one: clip logsigma >= 1e-8 so sigma >= 1 (authors, default); False = standard.
        truncated_noise: reparameterisation noise from a normal truncated at +-2 std (the
            authors' `tf.truncated_normal`); False = plain N(0, 1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | Sequence[int] = 32,
        latent_dim: int = 128,
        sigma_floor_one: bool = True,
        truncated_noise: bool = True,
    ) -> None:
        super().__init__()
        height, width = (
            (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        )
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(
                f"VAE needs H and W divisible by 8 (three stride-2 convs), got {height}x{width}; "
                "zero-pad the images (28x28 -> 32x32) first"
            )
        self._hparams = dict(
            in_channels=in_channels,
            image_size=image_size if isinstance(image_size, int) else list(image_size),
            latent_dim=latent_dim,
            sigma_floor_one=sigma_floor_one,
            truncated_noise=truncated_noise,
        )
        self.input_shape = (in_channels, height, width)
        self.latent_dim = latent_dim
        self.sigma_floor_one = sigma_floor_one
        self.truncated_noise = truncated_noise
        h8, w8 = height // 8, width // 8

        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 128, 2, stride=2),
            _bn(128),
            nn.ReLU(),
            nn.Conv2d(128, 256, 2, stride=2),
            _bn(256),
            nn.ReLU(),
            nn.Conv2d(256, 512, 2, stride=2),
            _bn(512),
            nn.Tanh(),
            nn.Flatten(),  # (B, 512 * H/8 * W/8) = 8192 for 32x32
            nn.Linear(512 * h8 * w8, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, DECODER_CHANNELS * h8 * w8),
            nn.LeakyReLU(LRELU_SLOPE),
            nn.Unflatten(1, (DECODER_CHANNELS, h8, w8)),
            nn.ConvTranspose2d(DECODER_CHANNELS, 512, 2, stride=2),
            _bn(512),
            nn.ReLU(),
            nn.ConvTranspose2d(512, 256, 2, stride=2),
            _bn(256),
            nn.ReLU(),
            nn.ConvTranspose2d(256, 128, 2, stride=2),
            _bn(128),
            nn.ReLU(),
            nn.Conv2d(128, in_channels, 1),  # logits; `decode` applies the sigmoid
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # Authors: Xavier (Glorot uniform) weights; conv/deconv bias 0.1 (`Layers.Wb`), fc bias 0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.0 if isinstance(m, nn.Linear) else 0.1)

    @property
    def hparams(self) -> dict:
        """JSON-serialisable constructor kwargs: ``type(m)(**m.hparams)`` rebuilds the model."""
        return dict(self._hparams)

    def encode_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> (mu, logsigma), each (B, latent_dim), logsigma clipped."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected input (B, {self.input_shape}), got {tuple(x.shape)}")
        mu, logsigma = self.encoder(x).chunk(2, dim=1)
        if self.sigma_floor_one:
            logsigma = logsigma.clamp(LOGSIGMA_FLOOR, LOGSIGMA_MAX)
        else:
            logsigma = logsigma.clamp(LOGSIGMA_MIN_STANDARD, LOGSIGMA_MAX)
        return mu, logsigma

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Transformer protocol: the encoder mean mu (B, latent_dim), which LVAT perturbs."""
        return self.encode_params(x)[0]

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim) -> pixel logits (B, C, H, W)."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Transformer protocol: z (B, latent_dim) -> images (B, C, H, W) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def reparameterize(self, mu: torch.Tensor, logsigma: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * noise (noise truncated at +-2 std if ``truncated_noise``)."""
        noise = torch.empty(mu.shape, device=mu.device, dtype=mu.dtype)
        if self.truncated_noise:
            nn.init.trunc_normal_(noise, 0.0, 1.0, -2.0, 2.0)
        else:
            noise.normal_()
        return mu + torch.exp(logsigma) * noise

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: x -> (reconstruction logits of a posterior sample, mu, logsigma)."""
        mu, logsigma = self.encode_params(x)
        return self.decode_logits(self.reparameterize(mu, logsigma)), mu, logsigma


def vae_loss(model: VAE, x: torch.Tensor, kl_weight: float = 0.1) -> dict[str, torch.Tensor]:
    """Authors' VAE loss on x in [0, 1]: BCE + kl_weight * KL, each summed per image, batch mean.

    BCE = -sum_pixels [x log p + (1 - x) log(1 - p)] (Bernoulli decoder), computed from logits
    (stable; the authors use log(p + 1e-8)). KL = KL(N(mu, sigma^2) || N(0, I))
    = 0.5 * sum(mu^2 + sigma^2 - 2 log sigma - 1), with the clipped logsigma.

    Returns scalars ``loss`` (to minimise), ``bce``, ``kl``.
    """
    logits, mu, logsigma = model(x)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu.square() + torch.exp(2.0 * logsigma) - 2.0 * logsigma - 1.0).sum(1)
    bce, kl = bce.mean(), kl.mean()
    return {"loss": bce + kl_weight * kl, "bce": bce, "kl": kl}


@torch.no_grad()
def recon_mse(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel error of decode(encode(x)) (no sampling), a scalar; no gradient."""
    return (model.decode(model.encode(x)) - x).square().mean()
