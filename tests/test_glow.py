"""Glow as the LVAT transformer: latent sizes, exact decode(encode(x)), likelihood, init, grads."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_flows import randomize_

from lvat.models import glow as glow_module
from lvat.models.flows import ActNorm
from lvat.models.glow import Glow, floor_ste, glow_loss, nonfinite_decode_rate
from lvat.regularizers import LVAT

pytestmark = pytest.mark.numerics

TINY = dict(in_channels=3, image_size=8, n_levels=2, n_steps=2, width=16)


def images(*shape: int) -> torch.Tensor:
    """Random 8-bit images scaled to [0, 1], as the data layer delivers them."""
    return torch.randint(0, 256, shape).float() / 255.0


def test_default_latent_sizes_for_32x32x3() -> None:
    torch.manual_seed(0)
    glow = Glow()  # L=3, K=22, width 128: cheap to build and to run on one image
    assert glow.y_shape == (24, 4, 4)
    assert sum(glow.z_sizes) == 2688
    y, z = glow.encode(images(1, 3, 32, 32))
    assert y.shape == (1, 24, 4, 4) and y[0].numel() == 384
    assert z.shape == (1, 2688)
    assert glow.z_shapes == [(6, 16, 16), (12, 8, 8), (24, 4, 4)]


def test_quantize_formula() -> None:
    k = torch.arange(256)
    x = k.float() / 255.0
    assert torch.equal(Glow(**TINY, n_bits=5).quantize(x), (k // 8).float() * 8.0 / 255.0)
    assert torch.equal(Glow(**TINY, n_bits=8).quantize(x), x)


def test_dequantisation_noise_stays_inside_the_bin() -> None:
    glow = Glow(**TINY)
    x = images(4, 3, 8, 8)
    base = torch.floor(torch.round(x * 255) / 8) / 32 - 0.5  # k / 32 - 0.5
    noisy = glow.preprocess(x) - base
    assert noisy.min() >= 0 and noisy.max() < 1 / 32 and noisy.std() > 0.005
    assert torch.allclose(glow.preprocess(x, deterministic=True) - base, torch.tensor(1 / 64))


@pytest.mark.parametrize("n_bits", [5, 8])
def test_decode_encode_is_quantize_deterministic(n_bits: int) -> None:
    torch.manual_seed(0)
    glow = randomize_(Glow(**TINY, n_bits=n_bits))
    x = images(4, 3, 8, 8)
    latent = glow.encode(x, deterministic=True)
    assert torch.equal(glow.decode(latent), glow.quantize(x))


def test_decode_encode_is_quantize_with_noise() -> None:
    # float64: with noise u can sit 1e-7 from a bin edge, where float32 round-off may flip a level.
    torch.manual_seed(0)
    glow = randomize_(Glow(**TINY)).double()
    x = images(8, 3, 8, 8).double()
    for _ in range(3):
        assert torch.equal(glow.decode(glow.encode(x)), glow.quantize(x))


def test_encode_is_reproducible_under_a_seed() -> None:
    glow = randomize_(Glow(**TINY))
    x = images(2, 3, 8, 8)
    torch.manual_seed(1)
    a = glow.encode(x)
    torch.manual_seed(1)
    b = glow.encode(x)
    c = glow.encode(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])  # the dequantisation noise is really random


def test_bits_per_dim_of_identity_flow_matches_closed_form() -> None:
    # K = 0: the flow is squeeze + split only, a permutation with log-det 0, so
    # -log p(x~) = sum 0.5 (x~^2 + log 2 pi) and bpd = (-log p(x~) + D log 32) / (D ln 2).
    glow = Glow(**{**TINY, "n_steps": 0}).double()
    x = images(3, 3, 8, 8).double()
    x_tilde = torch.floor(torch.round(x * 255) / 8) / 32 - 0.5 + 1 / 64
    d = 3 * 8 * 8
    neg_logp = 0.5 * (x_tilde**2 + math.log(2 * math.pi)).flatten(1).sum(1)
    expected = (neg_logp + d * math.log(32)) / (d * math.log(2))
    torch.testing.assert_close(glow.bits_per_dim(x, deterministic=True), expected)
    torch.testing.assert_close(glow.nll(x, deterministic=True), neg_logp + d * math.log(32))


def test_actnorm_initialisation_normalises_every_actnorm_and_is_saved() -> None:
    torch.manual_seed(0)
    glow = Glow(**TINY).double()
    x = images(32, 3, 8, 8).double()
    glow.initialize(x, deterministic=True)

    outputs = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out[0]))
        for m in glow.modules()
        if isinstance(m, ActNorm)
    ]
    with torch.no_grad():
        glow(glow.preprocess(x, deterministic=True))
    for h in hooks:
        h.remove()
    assert len(outputs) == TINY["n_levels"] * TINY["n_steps"]
    for out in outputs:
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros_like(out[0, :, 0, 0]))
        std = out.std(dim=(0, 2, 3), correction=0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)

    # The init lives in the state dict: a fresh model loading it gives identical outputs.
    torch.manual_seed(123)
    fresh = Glow(**glow.hparams).double()
    xt = glow.preprocess(x, deterministic=True)
    assert not torch.equal(fresh(xt)[0][1], glow(xt)[0][1])
    fresh.load_state_dict(glow.state_dict())
    (y1, z1), ld1 = glow(xt)
    (y2, z2), ld2 = fresh(xt)
    assert torch.equal(y1, y2) and torch.equal(z1, z2) and torch.equal(ld1, ld2)


def test_hparams_rebuild_and_are_json() -> None:
    glow = Glow(**{**TINY, "image_size": [8, 16], "coupling": "sigmoid", "n_bits": 8})
    hp = json.loads(json.dumps(glow.hparams))
    rebuilt = Glow(**hp)
    assert rebuilt.hparams == glow.hparams
    assert rebuilt.load_state_dict(glow.state_dict()) is not None


def test_invalid_configs_raise() -> None:
    with pytest.raises(ValueError, match="divisible"):
        Glow(image_size=28, n_levels=3)
    with pytest.raises(ValueError, match="n_bits"):
        Glow(**TINY, n_bits=9)
    with pytest.raises(ValueError, match="coupling"):
        Glow(**TINY, coupling="additive")


def test_floor_ste_floors_forward_and_passes_gradient() -> None:
    t = torch.tensor([0.2, 1.7, -0.5], requires_grad=True)
    y = floor_ste(t)
    assert y.tolist() == [0.0, 1.0, -1.0]
    (g,) = torch.autograd.grad(y.sum(), t)
    assert g.tolist() == [1.0, 1.0, 1.0]


def test_decode_gradient_is_straight_through() -> None:
    # With K = 0 the flow is a permutation, so d decode / d latent is the STE factor
    # bins * 2^(8-b) / 255 = 256 / 255 for every pixel inside (0, 1).
    glow = Glow(**{**TINY, "n_steps": 0})
    y, z = glow.encode(images(1, 3, 8, 8) * 0.5 + 0.25, deterministic=True)
    y.requires_grad_(True)
    z.requires_grad_(True)
    gy, gz = torch.autograd.grad(glow.decode((y, z)).sum(), (y, z))
    assert torch.allclose(gy, torch.full_like(gy, 256 / 255))
    assert torch.allclose(gz, torch.full_like(gz, 256 / 255))


def test_lvat_gradient_flows_through_decoder_to_both_latent_groups() -> None:
    torch.manual_seed(0)
    glow = randomize_(Glow(**TINY)).eval().requires_grad_(False)
    x = images(4, 3, 8, 8) * 0.8 + 0.1  # away from the clip at 0 and 1
    y, z = (t.detach() for t in glow.encode(x))
    dy = torch.zeros_like(y, requires_grad=True)
    dz = torch.zeros_like(z, requires_grad=True)
    weights = torch.randn(4, 3, 8, 8)
    loss = (glow.decode((y + dy, z + dz)) * weights).sum()
    loss.backward()
    for d in (dy, dz):
        assert torch.isfinite(d.grad).all()
        assert d.grad.abs().sum(dim=tuple(range(1, d.dim()))).min() > 0  # every sample
    assert all(p.grad is None for p in glow.parameters())


@pytest.mark.parametrize("coupling", ["affine", "sigmoid"])
def test_nonfinite_decode_rate_is_zero(coupling: str) -> None:
    torch.manual_seed(0)
    glow = randomize_(Glow(**TINY, coupling=coupling))
    assert nonfinite_decode_rate(glow, images(16, 3, 8, 8), eps=1.0) == 0.0


@pytest.mark.parametrize("coupling", ["affine", "sigmoid"])
def test_reverse_saturates_instead_of_overflowing(coupling: str, monkeypatch) -> None:
    torch.manual_seed(0)
    glow = randomize_(Glow(**TINY, coupling=coupling)).eval()
    x = images(4, 3, 8, 8)
    with torch.no_grad():
        y, z = glow.encode(x, deterministic=True)
        assert torch.equal(glow.decode((y, z)), glow.quantize(x))  # real latents: untouched
        assert glow.last_saturated.tolist() == [False] * 4
        # A latent far off the manifold (what an inverse that expands e^15 per layer makes of a
        # small step, in a deep trained flow): finite, in [0, 1], flagged, instead of NaN.
        far = (y.clone(), z.clone())
        far[1][2:] += 1e36 * torch.randn_like(z[2:])  # samples 2 and 3 only
        out = glow.decode(far)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert glow.last_saturated.tolist() == [False, False, True, True]
        assert torch.equal(out[:2], glow.quantize(x[:2]))
        monkeypatch.setattr(glow_module, "REVERSE_BOUND", math.inf)  # without the bound: NaN
        assert not torch.isfinite(glow.decode(far)).all()


@pytest.mark.parametrize("power_method", ["finite-difference", "exact"])
def test_lvat_reports_saturated_adversarial_decodes(power_method: str) -> None:
    torch.manual_seed(0)
    glow = randomize_(Glow(**TINY))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x = images(6, 3, 8, 8)
    for eps, share in ((1.0, 0.0), (1e36, 1.0)):
        reg = LVAT(glow, eps=eps, power_method=power_method)
        loss, stats = reg.loss_and_stats(model, x)
        assert torch.isfinite(loss) and stats["saturated_decode"].item() == share


def test_nonfinite_decode_rate_detects_nan() -> None:
    class Broken(torch.nn.Module):
        def encode(self, x):
            return x.flatten(1)

        def decode(self, z):
            out = z.clone()
            out[0, 0] = float("nan")  # sample 0 of 4 broken
            return out

    assert nonfinite_decode_rate(Broken(), torch.rand(4, 3)) == 0.25


def test_sample_shape_range_and_grid() -> None:
    torch.manual_seed(0)
    glow = randomize_(Glow(**TINY))
    s = glow.sample(5, temperature=0.7)
    assert s.shape == (5, 3, 8, 8)
    assert s.min() >= 0 and s.max() <= 1
    assert torch.allclose(s * 255 / 8, torch.round(s * 255 / 8), atol=1e-4)  # on the 5-bit grid
    cold = glow.sample(3, temperature=0.0)  # zero latent: all samples the same image
    assert torch.equal(cold[0], cold[1]) and torch.equal(cold[1], cold[2])


def test_glow_loss_is_finite_and_trains() -> None:
    torch.manual_seed(0)
    glow = Glow(**TINY)
    x = images(16, 3, 8, 8)
    glow.initialize(x)
    opt = torch.optim.Adam(glow.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        out = glow_loss(glow, x)
        assert set(out) == {"loss", "nll", "bpd"}
        assert all(torch.isfinite(v) for v in out.values())
        first = out["bpd"].item() if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert glow_loss(glow, x)["bpd"].item() < first - 0.05
