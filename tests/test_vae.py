"""VAE as the LVAT transformer: shapes, the sigma floor, the loss, gradients to the latent."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from lvat.models.glow import nonfinite_decode_rate
from lvat.models.vae import VAE, recon_mse, vae_loss

pytestmark = pytest.mark.numerics


def blobs(n: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    """Smooth, learnable images in [0, 1]: one Gaussian blob per image at a random place."""
    g = torch.Generator().manual_seed(0)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centres = torch.rand(n, 2, generator=g) * 1.2 - 0.6
    d2 = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    img = torch.exp(-d2 / 0.1)  # (n, size, size)
    tint = torch.rand(n, channels, 1, 1, generator=g)
    return img[:, None] * tint


@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 32), (3, 16), (1, (16, 24))], ids=str)
def test_decode_encode_shape_and_range(channels: int, size) -> None:
    torch.manual_seed(0)
    vae = VAE(in_channels=channels, image_size=size, latent_dim=16).eval()
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.rand(4, channels, h, w)
    z = vae.encode(x)
    assert z.shape == (4, 16)
    out = vae.decode(z)
    assert out.shape == (4, channels, h, w)
    assert out.min() >= 0 and out.max() <= 1


def test_default_is_paper_table_2() -> None:
    vae = VAE()
    assert vae.encoder[-1].in_features == 8192 and vae.encoder[-1].out_features == 256
    assert vae.decoder[0].in_features == 128 and vae.decoder[0].out_features == 512
    assert vae.encode(torch.rand(2, 3, 32, 32)).shape == (2, 128)


@pytest.mark.parametrize("size", [28, 30, (32, 20)], ids=str)
def test_sizes_not_divisible_by_8_raise_clearly(size) -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        VAE(image_size=size)


def test_wrong_input_shape_raises() -> None:
    with pytest.raises(ValueError, match="expected input"):
        VAE(image_size=16).encode(torch.rand(2, 3, 32, 32))


def _with_logsigma_bias(vae: VAE, value: float) -> VAE:
    fc = vae.encoder[-1]
    with torch.no_grad():
        fc.weight[vae.latent_dim :].zero_()
        fc.bias[vae.latent_dim :].fill_(value)
    return vae


def test_sigma_floor_one_clips_logsigma_as_the_authors() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    faithful = _with_logsigma_bias(VAE(image_size=16, latent_dim=8), -3.0)
    standard = _with_logsigma_bias(VAE(image_size=16, latent_dim=8, sigma_floor_one=False), -3.0)
    _, ls_faithful = faithful.encode_params(x)
    _, ls_standard = standard.encode_params(x)
    assert torch.all(ls_faithful == 1e-8)  # sigma = exp(1e-8) >= 1
    assert torch.all(torch.exp(ls_faithful) >= 1.0)
    torch.testing.assert_close(ls_standard, torch.full_like(ls_standard, -3.0))
    # Above the floor nothing changes.
    _, ls_high = _with_logsigma_bias(faithful, 0.5).encode_params(x)
    torch.testing.assert_close(ls_high, torch.full_like(ls_high, 0.5))


@pytest.mark.parametrize("truncated", [True, False])
def test_reparameterisation_noise(truncated: bool) -> None:
    torch.manual_seed(0)
    vae = VAE(image_size=16, latent_dim=8, truncated_noise=truncated)
    mu, logsigma = torch.zeros(20000, 8), torch.zeros(20000, 8)
    noise = vae.reparameterize(mu, logsigma)
    assert (noise.abs().max() <= 2.0) == truncated  # tf.truncated_normal: |noise| <= 2 std
    assert 0.8 < noise.std() < 1.05


def test_loss_terms_match_their_definitions() -> None:
    torch.manual_seed(0)
    vae = VAE(image_size=16, latent_dim=8)
    x = blobs(4)
    torch.manual_seed(1)
    out = vae_loss(vae, x, kl_weight=0.1)
    torch.manual_seed(1)
    logits, mu, logsigma = vae(x)
    bce = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum") / 4
    kl = kl_divergence(Normal(mu, logsigma.exp()), Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(out["bce"], bce, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out["kl"], kl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["loss"], out["bce"] + 0.1 * out["kl"])


def test_loss_is_finite_and_decreases_when_overfitting() -> None:
    torch.manual_seed(0)
    vae = VAE(image_size=8, latent_dim=16)  # the widths are the paper's: keep the image tiny
    x = blobs(8, size=8)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    history = []
    for _ in range(30):
        out = vae_loss(vae, x)
        assert all(torch.isfinite(v) for v in out.values())
        history.append({k: v.item() for k, v in out.items()})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["bce"] < history[0]["bce"]


def test_recon_mse_is_pixel_mse_of_mean_reconstruction() -> None:
    torch.manual_seed(0)
    vae = VAE(image_size=16, latent_dim=8).eval()
    x = blobs(4)
    expected = ((vae.decode(vae.encode(x)) - x) ** 2).mean()
    torch.testing.assert_close(recon_mse(vae, x), expected)
    assert not recon_mse(vae, x).requires_grad


def test_encode_is_the_deterministic_mean() -> None:
    torch.manual_seed(0)
    vae = VAE(image_size=16, latent_dim=8).eval()
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(vae.encode(x), vae.encode_params(x)[0])
    assert torch.equal(vae.encode(x), vae.encode(x))


def test_lvat_gradient_flows_through_decoder_to_latent() -> None:
    torch.manual_seed(0)
    vae = VAE(image_size=16, latent_dim=8).eval().requires_grad_(False)
    x = torch.rand(4, 3, 16, 16)
    z = vae.encode(x).detach()
    d = (1e-6 * torch.randn_like(z)).requires_grad_(True)
    loss = (vae.decode(z + d) * torch.randn(4, 3, 16, 16)).sum()
    loss.backward()
    assert torch.isfinite(d.grad).all()
    assert d.grad.abs().sum(dim=1).min() > 0  # every sample gets a direction
    assert all(p.grad is None for p in vae.parameters())


def test_nonfinite_decode_rate_is_zero() -> None:
    torch.manual_seed(0)
    vae = VAE(image_size=16, latent_dim=8).eval()
    assert nonfinite_decode_rate(vae, torch.rand(8, 3, 16, 16), eps=1.0) == 0.0


def test_hparams_rebuild_and_are_json() -> None:
    vae = VAE(in_channels=1, image_size=[16, 24], latent_dim=32, sigma_floor_one=False)
    hp = json.loads(json.dumps(vae.hparams))
    rebuilt = VAE(**hp)
    assert rebuilt.hparams == vae.hparams
    rebuilt.load_state_dict(vae.state_dict())
    x = torch.rand(2, 1, 16, 24)
    assert torch.equal(rebuilt.eval().encode(x), vae.eval().encode(x))
