"""Every Glow flow layer, and the whole Glow, obeys forward(x) -> (y, logdet), reverse(y) -> x.

One helper, `assert_flow_contract`, checks for any layer: reverse(forward(x)) == x in float32,
forward(reverse(y)) == y, logdet has shape (B,) and equals log|det J| of autograd's Jacobian
(float64, per sample), and the reverse map's log|det J| is its negative (forward + reverse == 0).
Layers are randomised first (`randomize_`): with the zero-initialised coupling convs and the
identity ActNorm of a fresh model every coupling would be the identity and the checks vacuous.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd.functional import jacobian

from lvat.models.flows import (
    ActNorm,
    AffineCoupling,
    FactorOut,
    FlowStep,
    InvConv2dLU,
    Squeeze,
    squeeze2d,
    unsqueeze2d,
)
from lvat.models.glow import Glow, GlowLevel

pytestmark = pytest.mark.numerics


@torch.no_grad()
def randomize_(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Non-trivial ActNorm b, s and random weights in every zero-initialised coupling conv."""
    for m in module.modules():
        if isinstance(m, ActNorm):
            m.bias.normal_(0.0, 0.3)
            m.logs.uniform_(-0.3, 0.3)
        elif isinstance(m, AffineCoupling):
            m.zero_conv.weight.normal_(0.0, scale)
            m.zero_conv.bias.normal_(0.0, scale)
    return module


def _flat(out) -> torch.Tensor:
    """Tensor or tuple of tensors -> (B, total) (the tuple's parts concatenated)."""
    parts = out if isinstance(out, tuple) else (out,)
    return torch.cat([p.flatten(1) for p in parts], dim=1)


def _unflat(flat: torch.Tensor, template):
    """Inverse of `_flat` for a batch of flat rows shaped like ``template`` (tensor or tuple)."""
    parts = template if isinstance(template, tuple) else (template,)
    sizes = [p[0].numel() for p in parts]
    pieces = [
        f.reshape(flat.shape[0], *p.shape[1:])
        for f, p in zip(torch.split(flat, sizes, dim=1), parts, strict=True)
    ]
    return tuple(pieces) if isinstance(template, tuple) else pieces[0]


def assert_flow_contract(layer: torch.nn.Module, x: torch.Tensor, atol: float = 1e-5) -> None:
    """Round trips (float32) and log-determinants (float64 autograd Jacobians) of ``layer``.

    Tolerances: a float32 round trip through a layer adds a few ulps of |x| <= ~4 (2.4e-7 each)
    times its scale factors (exp(log s) of order 1 for the randomised layers); the tiny Glow's
    ~20 layers stay within 1e-5. The log-determinants are float64 (1e-16 relative), checked to
    1e-6; a wrong log-det (a missing H*W factor) is off by O(1).
    """
    batch = x.shape[0]
    with torch.no_grad():
        out, logdet = layer(x)
        assert logdet.shape == (batch,)
        assert torch.isfinite(logdet).all()
        torch.testing.assert_close(layer.reverse(out), x, atol=atol, rtol=0)
        # reverse is also a right inverse: forward(reverse(y)) == y for y off the data.
        y = _unflat(_flat(out) + 0.1 * torch.randn_like(_flat(out)), out)
        torch.testing.assert_close(_flat(layer(layer.reverse(y))[0]), _flat(y), atol=atol, rtol=0)

    layer64 = copy.deepcopy(layer).double()
    x64 = x.double()
    out64, logdet64 = layer64(x64)
    dim = x[0].numel()
    for b in range(batch):
        jac = jacobian(lambda xb: _flat(layer64(xb[None])[0])[0], x64[b], vectorize=True)
        _, logabsdet = torch.linalg.slogdet(jac.reshape(dim, dim))
        assert abs(logabsdet - logdet64[b]) <= 1e-6, (logabsdet, logdet64[b])

        yb = _flat(out64)[b].detach()
        jac_rev = jacobian(
            lambda f: layer64.reverse(_unflat(f[None], out64))[0].flatten(), yb, vectorize=True
        )
        _, logabsdet_rev = torch.linalg.slogdet(jac_rev)
        assert abs(logdet64[b] + logabsdet_rev) <= 1e-6, (logdet64[b], logabsdet_rev)


def _tiny_glow(**kw) -> Glow:
    cfg = dict(in_channels=3, image_size=8, n_levels=2, n_steps=2, width=16)
    cfg.update(kw)
    return randomize_(Glow(**cfg))


LAYERS = {
    "actnorm": lambda: ActNorm(4),
    "invconv": lambda: InvConv2dLU(4),
    "coupling-affine": lambda: AffineCoupling(4, width=8, coupling="affine"),
    "coupling-sigmoid": lambda: AffineCoupling(4, width=8, coupling="sigmoid"),
    "coupling-odd-channels": lambda: AffineCoupling(5, width=8),
    "squeeze": lambda: Squeeze(),
    "factor-out": lambda: FactorOut(),
    "flow-step": lambda: FlowStep(4, width=8),
    "glow-level": lambda: GlowLevel(1, n_steps=2, width=8, coupling="affine"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_obeys_flow_contract(name: str) -> None:
    torch.manual_seed(0)
    layer = randomize_(LAYERS[name]())
    channels = 5 if name == "coupling-odd-channels" else 4
    channels = 1 if name == "glow-level" else channels
    x = torch.randn(2, channels, 4, 4)
    assert_flow_contract(layer, x)


@pytest.mark.parametrize("coupling", ["affine", "sigmoid"])
def test_whole_glow_obeys_flow_contract(coupling: str) -> None:
    torch.manual_seed(0)
    glow = _tiny_glow(coupling=coupling)
    x_tilde = glow.preprocess(torch.rand(2, 3, 8, 8))
    assert_flow_contract(glow, x_tilde)


def test_randomized_layers_are_not_the_identity() -> None:
    # Guards the contract tests above: they must exercise real, sample-dependent couplings.
    torch.manual_seed(0)
    step = randomize_(FlowStep(4, width=8))
    x = torch.randn(2, 4, 4, 4)
    y, logdet = step.coupling(x)
    assert not torch.allclose(y, x, atol=1e-3)
    assert abs(logdet[0] - logdet[1]) > 1e-4  # per-sample log-det, not a constant


def test_contract_helper_catches_a_wrong_logdet() -> None:
    class BadActNorm(ActNorm):
        def forward(self, x):
            y, _ = super().forward(x)
            return y, self.logs.sum().repeat(x.shape[0])  # forgets the H * W factor

    torch.manual_seed(0)
    with pytest.raises(AssertionError):
        assert_flow_contract(randomize_(BadActNorm(4)), torch.randn(2, 4, 4, 4))


def test_coupling_starts_as_identity() -> None:
    layer = AffineCoupling(4, width=8)
    x = torch.randn(2, 4, 4, 4)
    y, logdet = layer(x)
    assert torch.equal(y, x)
    assert torch.equal(logdet, torch.zeros(2))


def test_coupling_log_scale_is_clamped() -> None:
    # The clamp is what keeps decoding of perturbed latents finite: |log scale| <= 15 per element.
    layer = AffineCoupling(2, width=4)
    with torch.no_grad():
        layer.zero_conv.bias.fill_(1e3)
    x = torch.randn(1, 2, 2, 2)
    _, logdet = layer(x)
    assert torch.allclose(logdet, torch.tensor([15.0 * 4]))
    assert torch.isfinite(layer.reverse(layer(x)[0])).all()


def test_invconv_lu_parametrisation() -> None:
    torch.manual_seed(0)
    conv = InvConv2dLU(6)
    params = dict(conv.named_parameters())
    # sign(s) and P are fixed buffers (saved in the state dict); L, U, log|s| are learned.
    assert set(params) == {"w_l", "w_s", "w_u"}
    assert {"w_p", "s_sign"} <= set(conv.state_dict())
    w = conv.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(6), atol=1e-5, rtol=0)  # init: a rotation
    torch.testing.assert_close(conv.inverse_weight() @ w, torch.eye(6), atol=1e-5, rtol=0)


def test_squeeze_is_space_to_depth() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    s = squeeze2d(x)
    assert s.shape == (1, 4, 2, 2)
    assert s[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]  # one 2x2 block -> channels
    assert torch.equal(unsqueeze2d(s), x)
