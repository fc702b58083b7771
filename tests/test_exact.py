"""The exact power iteration computes the curvature the finite difference approximates."""

from __future__ import annotations

import pytest
import torch
from _reg_helpers import DropoutRecorder, TupleTransformer, buffers, cnn, mlp, sample_norms
from torch import Tensor, nn
from torch.autograd.functional import hessian

from lvat.regularizers import (
    LVAT,
    VAT,
    exact_power_iteration,
    fisher_vector_product,
    kl_divergence,
    normalize,
    power_iteration,
)

pytestmark = pytest.mark.numerics


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample cosine, (B,), in float64 and without F.cosine_similarity's 1e-8 floor on the
    product of norms (finite-difference gradients at xi = 1e-6 have norms ~1e-9)."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def _tanh_mlp(dim: int = 5, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, classes)).double()


def test_exact_vat_direction_is_the_finite_difference_limit_on_a_smooth_model():
    # float64, smooth model: the finite difference at xi = 1e-6 is xi * H d + O(xi^2) with
    # rounding ~1e-16 / 1e-6, so it agrees with the exact product to ~1e-6.
    model, x = _tanh_mlp(), torch.randn(6, 5, dtype=torch.float64)
    d = torch.randn_like(x)
    fn = lambda ds: model(x + ds[0])  # noqa: E731
    fd = power_iteration(fn, model(x).detach(), [d], 1e-6)[0]
    exact = exact_power_iteration(fn, [d])[0]
    assert (_cos(exact, fd) > 0.999).all()
    # ... and is the Hessian of the VAT cost times d_hat, to float64 precision.
    hess = hessian(lambda r: kl_divergence(model(x).detach(), model(x + r)), torch.zeros_like(x))
    hd = torch.einsum("ijkl,kl->ij", hess, normalize(d))
    torch.testing.assert_close(exact, hd, rtol=1e-9, atol=1e-14)


def test_many_exact_iterations_find_the_top_eigenvector_of_the_closed_form_fisher():
    # Linear softmax model: J = W for every sample, so G_i = W^T (diag p_i - p_i p_i^T) W / B.
    batch, dim, classes = 4, 6, 5
    model = nn.Linear(dim, classes).double()
    x = torch.randn(batch, dim, dtype=torch.float64)
    w = model.weight.detach()
    p = model(x).softmax(1).detach()
    g = exact_power_iteration(lambda ds: model(x + ds[0]), [torch.randn_like(x)], 50)[0]
    for i in range(batch):
        fisher = w.T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ w / batch
        evals, evecs = torch.linalg.eigh(fisher)
        assert evals[-2] < 0.9 * evals[-1], "eigengap too small for 50 iterations"
        assert _cos(g[i : i + 1], evecs[:, -1][None]).abs() > 0.999
        # G v is the closed form's product, not just parallel to it.
        v = torch.randn(dim, dtype=torch.float64)
        vs = torch.zeros_like(x)
        vs[i] = v
        gv = fisher_vector_product(lambda ds: model(x + ds[0]), [vs])[0]
        torch.testing.assert_close(gv[i], fisher @ v, rtol=1e-10, atol=1e-14)


def test_exact_lvat_is_the_fisher_at_the_reconstruction_without_the_first_order_term():
    t, model = TupleTransformer().double(), mlp().double()
    x = torch.rand(5, 6, dtype=torch.float64)
    za, zb = t.encode(x)

    def logits(ra: Tensor, rb: Tensor) -> Tensor:
        return model(t.decode((za + ra, zb + rb)))

    torch.manual_seed(1)
    ra, rb = LVAT(t, 1.0, power_method="exact").perturbation(model, x)
    # The same d, then one product with the Hessian of KL(q(dec(z)) || q(dec(z + r))) at r = 0.
    torch.manual_seed(1)
    # d is drawn in float32 whatever the latent precision (the same d as a float32 run)
    da = torch.randn_like(za, dtype=torch.float32).double()
    db = torch.randn_like(zb, dtype=torch.float32).double()
    q = logits(torch.zeros_like(za), torch.zeros_like(zb)).detach()
    flat = torch.cat([za.flatten(1), zb.flatten(1)], 1)
    na = za[0].numel()

    def cost(r: Tensor) -> Tensor:
        return kl_divergence(q, logits(r[:, :na].reshape(za.shape), r[:, na:].reshape(zb.shape)))

    hess = hessian(cost, torch.zeros_like(flat))
    d = torch.cat([normalize(da).flatten(1), normalize(db).flatten(1)], 1)
    gd = torch.einsum("ijkl,kl->ij", hess, d)
    assert (_cos(ra, gd[:, :na]) > 0.999999).all() and (_cos(rb, gd[:, na:]) > 0.999999).all()
    # The authors' finite difference is dominated by the first-order term instead: the gradient
    # of KL(p(x) || p(dec(z + r))) at r = 0, which does not depend on d at all.
    fd_a, _ = LVAT(t, 1.0, xi=1e-6).perturbation(model, x)
    zero = [torch.zeros_like(za, requires_grad=True), torch.zeros_like(zb, requires_grad=True)]
    (first_a, _) = torch.autograd.grad(kl_divergence(model(x), logits(*zero)), zero)
    assert (_cos(fd_a, first_a) > 0.999).all()
    assert (_cos(ra, first_a).abs() < 0.99).any()


@pytest.mark.parametrize(("model_fn", "shape"), [(mlp, (8, 6)), (cnn, (4, 2, 6, 6))])
def test_exact_r_has_norm_eps_and_survives_bf16_autocast(model_fn, shape):
    model, x, eps = model_fn(), torch.rand(shape), 2.0
    torch.manual_seed(1)
    r32 = VAT(eps, power_method="exact").perturbation(model, x)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r16 = VAT(eps, power_method="exact").perturbation(model, x)
        loss = VAT(eps, power_method="exact")(model, x)
    assert r16.dtype == torch.float32 and torch.isfinite(loss)
    for r in (r32, r16):
        torch.testing.assert_close(
            sample_norms(r), torch.full((shape[0],), eps).double(), rtol=1e-3, atol=0
        )
    # No xi: bf16 only rounds the product's factors (~4e-3 relative), never the whole direction.
    assert (_cos(r16, r32) > 0.99).all()


def test_exact_lvat_norms_per_group_under_bf16_autocast():
    t, model, x, eps = TupleTransformer(), mlp(), torch.rand(5, 6), 1.5
    torch.manual_seed(1)
    a32, b32 = LVAT(t, eps, power_method="exact").perturbation(model, x)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a16, b16 = LVAT(t, eps, power_method="exact").perturbation(model, x)
    for g in (a32, b32, a16, b16):
        torch.testing.assert_close(
            sample_norms(g), torch.full((5,), eps).double(), rtol=1e-3, atol=0
        )
    assert (_cos(a16, a32) > 0.99).all() and (_cos(b16, b32) > 0.99).all()


def test_exact_mode_keeps_bn_buffers_and_shares_dropout_masks():
    model, x = cnn(p=0.3), torch.rand(4, 2, 6, 6)
    before = buffers(model)
    reg = VAT(1.0, power_iterations=2, power_method="exact")
    reg(model, x).backward()
    assert all(torch.equal(v, buffers(model)[k]) for k, v in before.items())

    model, x = mlp(p=0.5), torch.rand(8, 6)
    rec = DropoutRecorder(model)
    reg(model, x)
    assert len(rec.masks) == 3  # 2 exact products (the first is VAT's clean pass), adversarial
    assert all(torch.equal(m, rec.masks[0]) for m in rec.masks)
    rec.masks = []
    LVAT(TupleTransformer(), 1.0, power_method="exact")(model, x)
    assert len(rec.masks) == 3  # LVAT: clean (at x), product (at decode(z)), adversarial
    assert all(torch.equal(m, rec.masks[0]) for m in rec.masks)


def test_exact_vat_takes_its_clean_target_from_the_first_product():
    """No clean pass of its own: the loss is still KL(p(x) || p(x + r)), float64 to rounding."""
    from lvat.regularizers.common import kl_divergence

    model, x = cnn(p=0.0).double().train(), torch.rand(5, 2, 6, 6, dtype=torch.float64)
    reg = VAT(0.7, power_iterations=2, power_method="exact")
    torch.manual_seed(1)
    loss = reg(model, x)
    torch.manual_seed(1)
    r = reg.perturbation(model, x)
    with torch.no_grad():  # train mode: batch statistics, as the regularizer's passes
        expected = kl_divergence(model(x), model(x + r))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-14)
    assert loss.requires_grad and expected > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_exact_mode_runs_a_compiled_classifier_and_decoder_eagerly_to_the_same_numbers():
    """`train.compile`: a compiled graph has no forward-mode AD (conv-small's failed with "You
    must implement the jvp function"); the exact products run it eagerly, the rest compiled.
    aot_eager compiles as inductor does up to code generation, in seconds."""
    import copy

    from lvat.models.classifiers import build_classifier

    model = build_classifier("conv-small", 1, 10, dropout=0.0).double().train()
    x = torch.rand(4, 1, 12, 12, dtype=torch.float64)
    compiled = copy.deepcopy(model)
    compiled.compile(backend="aot_eager")
    compiled(x).sum().backward()  # a compiled graph exists before the regularizer's passes
    losses = []
    for m in (model, compiled):
        torch.manual_seed(1)
        losses.append(VAT(0.7, power_method="exact")(m, x))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=0)

    t, model, x = TupleTransformer().double(), mlp().double(), torch.rand(5, 6, dtype=torch.float64)
    compiled_t, compiled = copy.deepcopy(t), copy.deepcopy(model)
    compiled_t.decode = torch.compile(compiled_t.decode, backend="aot_eager")
    compiled.compile(backend="aot_eager")
    losses = []
    for tt, m in ((t, model), (compiled_t, compiled)):
        torch.manual_seed(1)
        losses.append(LVAT(tt, 1.5, power_method="exact")(m, x))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=0)


def test_power_method_is_validated():
    with pytest.raises(ValueError, match="power_method"):
        VAT(1.0, power_method="newton")
    assert "power_method='exact'" in repr(LVAT(TupleTransformer(), 1.0, power_method="exact"))


@pytest.mark.parametrize("shape", [(16, 5), (8, 3, 4), (6, 4, 5, 5)])
def test_forward_mode_batch_norm_has_pytorchs_tangent_and_gradient_in_float64(shape):
    import torch.autograd.forward_ad as fwAD

    from lvat.regularizers.exact import forward_mode

    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](shape[1]).double()
    nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)
    bn.track_running_stats = False  # as inside the regularizer's passes (frozen statistics)
    x, t, g = (torch.randn(shape, dtype=torch.float64) for _ in range(3))

    def run() -> tuple[Tensor, Tensor, Tensor]:
        xr = x.clone().requires_grad_()
        with fwAD.dual_level():
            y, jt = fwAD.unpack_dual(bn(fwAD.make_dual(xr, t)))
        (gx,) = torch.autograd.grad(y, xr, g)
        return y, jt, gx

    reference = run()  # PyTorch's own forward-AD formula and backward
    with forward_mode(bn):
        ours = run()
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert "forward" not in bn.__dict__  # the layer's own forward is back


def test_forward_mode_leaves_running_statistics_layers_to_pytorch():
    from lvat.regularizers.exact import forward_mode

    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    with forward_mode(bn):  # train mode with tracked statistics: they must still update
        bn(x)
    assert bn.num_batches_tracked == 1 and not torch.equal(bn.running_mean, torch.zeros(3))
    expected = bn.eval()(x)  # eval mode: the running statistics normalise
    with forward_mode(bn):
        assert torch.equal(bn(x), expected)
