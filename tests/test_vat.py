"""VAT and the shared regularizer maths behave as docs/method.md §1 says, for any model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _reg_helpers import XI, DropoutRecorder, authors_norm, buffers, cnn, mlp, sample_norms
from torch import nn
from torch.autograd.functional import hessian

from lvat.regularizers import (
    VAT,
    entropy,
    frozen_bn_stats,
    kl_divergence,
    normalize,
    normalize_joint,
    power_iteration,
)

pytestmark = pytest.mark.numerics


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity, (B,)."""
    return F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=1)


# --- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4,), (4, 7), (3, 2, 5, 5), (2, 1, 2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_is_the_authors_formula_per_sample_for_any_rank(shape, dtype):
    d = torch.randn(shape, dtype=dtype) * torch.logspace(-9, 2, shape[0], dtype=dtype).reshape(
        (-1,) + (1,) * (len(shape) - 1)
    )
    flat = d.reshape(shape[0], -1)
    ref = flat / (1e-12 + flat.abs().amax(dim=1, keepdim=True))
    ref = ref / torch.sqrt(1e-6 + ref.pow(2).sum(dim=1, keepdim=True))
    out = normalize(d)
    assert out.shape == d.shape and out.dtype == d.dtype
    # The same operations on the same (B, n) layout: equal up to a few ulps at most.
    torch.testing.assert_close(out, ref.reshape(shape), rtol=1e-6, atol=0)
    # Exactly, the norm is s / sqrt(1e-6 + s^2) with 1 <= s^2 <= n: below 1 by 5e-7 / s^2, at
    # least 5e-7 / n >= 1e-8 here. Float64 rounding (~log2(n) * 1e-16) cannot bridge that gap,
    # so "<= 1" is a float64 claim. Float32 rounds each element by up to 6e-8 relative, more
    # than the gap: there only |norm - 1| <= 5e-7 + ~1e-6 holds, checked with margin at 1e-5.
    norms = sample_norms(out)
    if dtype == torch.float64:
        assert (norms < 1).all()
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=0)


def test_normalize_keeps_a_zero_sample_zero():
    d = torch.randn(3, 5)
    d[1] = 0
    out = normalize(d)
    assert (out[1] == 0).all() and (sample_norms(out)[[0, 2]] > 0.99).all()


def test_normalize_joint_is_normalize_of_the_concatenated_groups():
    a, b = torch.randn(4, 3), torch.randn(4, 2, 2, 2) * 10
    na, nb = normalize_joint([a, b])
    ref = normalize(torch.cat([a, b.flatten(1)], dim=1))
    torch.testing.assert_close(torch.cat([na, nb.flatten(1)], dim=1), ref)


def test_kl_divergence_is_the_definition_averaged_over_the_batch():
    p_logits, q_logits = torch.randn(5, 4), torch.randn(5, 4)
    p, q = p_logits.softmax(1).double(), q_logits.softmax(1).double()
    ref = (p * (p.log() - q.log())).sum(1).mean()
    kl = kl_divergence(p_logits, q_logits)
    assert kl.dim() == 0 and kl.dtype == torch.float32
    # float32 log-softmax of O(1) logits: each of the 4 terms p (log p - log q) carries an
    # absolute error of ~|log p| * 6e-8 < 1e-6 in all; the KL itself is ~0.1-1 here.
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-6)
    assert kl_divergence(p_logits, p_logits) == 0
    # Half-precision logits are promoted (1e-6-scale differences survive); float64 is kept.
    assert kl_divergence(p_logits.bfloat16(), q_logits.bfloat16()).dtype == torch.float32
    assert kl_divergence(p_logits.double(), q_logits.double()).dtype == torch.float64


def test_entropy_is_the_mean_entropy_of_softmax():
    logits = torch.randn(6, 5)
    p = logits.softmax(1).double()
    # Computed in float32 (~1e-7 relative per term, 5 terms of size <= 0.4); the float64
    # reference's own error is negligible. float64's default tolerance (1e-7) would be too tight.
    torch.testing.assert_close(
        entropy(logits).double(), -(p * p.log()).sum(1).mean(), rtol=1e-5, atol=1e-6
    )
    assert math.isclose(entropy(torch.zeros(2, 5)).item(), math.log(5), rel_tol=1e-5)


# --- the perturbation -----------------------------------------------------------------------


@pytest.mark.parametrize(("model_fn", "shape"), [(mlp, (8, 6)), (cnn, (4, 2, 6, 6))])
def test_r_has_norm_eps_per_sample(model_fn, shape):
    model, x, eps = model_fn(), torch.rand(shape), 2.5
    r = VAT(eps, xi=XI).perturbation(model, x)
    assert r.shape == x.shape and r.dtype == torch.float32 and not r.requires_grad
    norms = sample_norms(r)
    torch.testing.assert_close(norms, authors_norm(r, eps), rtol=1e-5, atol=0)
    torch.testing.assert_close(norms, torch.full_like(norms, eps), rtol=1e-3, atol=0)


def test_r_is_eps_times_normalized_kl_gradient_at_xi_d():
    """End to end against a direct transcription of Algorithm 1 (same random d).

    float64: two different programs computing the same maths agree to ~1e-16 relative, and the
    probe (1e-6) stays far above that, so r and the loss agree to float64's default tolerance.
    In float32 the probe sits at rounding level and the direction would be rounding noise.
    """
    model, x, eps, xi = mlp().double(), torch.rand(5, 6, dtype=torch.float64), 2.0, 1e-6
    torch.manual_seed(1)
    r = VAT(eps, xi=xi).perturbation(model, x)
    torch.manual_seed(1)
    loss = VAT(eps, xi=xi)(model, x)

    torch.manual_seed(1)
    d = (xi * normalize(torch.randn_like(x, dtype=torch.float32).double())).requires_grad_()
    target = model(x).detach()
    (g,) = torch.autograd.grad(kl_divergence(target, model(x + d)), d)
    r_ref = eps * normalize(g)
    torch.testing.assert_close(r, r_ref)
    torch.testing.assert_close(loss, kl_divergence(target, model(x + r_ref)))


def test_adversarial_examples_are_x_plus_r():
    model, x = cnn(), torch.rand(4, 2, 6, 6)
    torch.manual_seed(3)
    r = VAT(1.5).perturbation(model, x)
    torch.manual_seed(3)
    x_adv = VAT(1.5).adversarial_examples(model, x)
    assert not x_adv.requires_grad
    torch.testing.assert_close(x_adv, x + r)


def test_kl_gradient_matches_central_finite_differences_in_float64():
    """g at xi*normalize(d) equals central differences of the KL, coordinate by coordinate.

    float64 and xi = 1e-3: at xi = 1e-6 the KL itself is ~1e-12, so the difference quotient
    (rounding ~1e-16 / h) would be too noisy to check 1e-3-level agreement.
    """
    model, x, xi, h = mlp(5, 8, 3).double(), torch.randn(3, 5, dtype=torch.float64), 1e-3, 1e-6
    target = model(x).detach()
    d0 = torch.randn_like(x)
    g = power_iteration(lambda ds: model(x + ds[0]), target, [d0], xi, 1)[0]

    point = xi * normalize(d0)
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for idx in range(x.numel()):
            e = torch.zeros(x.numel(), dtype=x.dtype)
            e[idx] = h
            e = e.reshape(x.shape)
            fd.view(-1)[idx] = (
                kl_divergence(target, model(x + point + e))
                - kl_divergence(target, model(x + point - e))
            ) / (2 * h)
    assert (_cos(g, fd) > 0.999).all()
    torch.testing.assert_close(g, fd, rtol=1e-4, atol=1e-10)

    # The VAT class computes the same direction from the same random d.
    torch.manual_seed(7)
    d_same = torch.randn_like(x, dtype=torch.float32).double()  # d is drawn in float32
    torch.manual_seed(7)
    r = VAT(1.0, xi=xi).perturbation(model, x)
    g_same = power_iteration(lambda ds: model(x + ds[0]), target, [d_same], xi, 1)[0]
    assert (_cos(r, g_same) > 0.999).all()


def test_power_iterations_converge_to_the_top_eigenvector_of_the_kl_hessian():
    """With 10 iterations r aligns with the dominant eigenvector of Hess_r KL(p(x)||p(x+r)) at 0.

    float64, xi = 1e-4: g = H (xi d) + O(xi^2), so the power iteration multiplies by H up to 1e-4.
    """
    batch, dim = 3, 5
    model = mlp(dim, 8, 3).double()
    x = torch.randn(batch, dim, dtype=torch.float64)
    target = model(x).detach()
    hess = hessian(lambda r: kl_divergence(target, model(x + r)), torch.zeros_like(x))
    top = []
    for i in range(batch):  # the batch-mean KL's Hessian is block diagonal, one block per sample
        evals, evecs = torch.linalg.eigh(hess[i, :, i, :])
        assert evals[-2] < 0.7 * evals[-1], "eigengap too small for this check"
        top.append(evecs[:, -1])
    top = torch.stack(top)

    r10 = VAT(1.0, xi=1e-4, power_iterations=10).perturbation(model, x)
    assert (_cos(r10, top).abs() > 0.99).all()
    r1 = VAT(1.0, xi=1e-4, power_iterations=1).perturbation(model, x)
    assert (_cos(r1, top).abs() < 0.99).any(), "one iteration should not already be aligned"


def test_float64_input_keeps_float64_maths():
    model, x = mlp().double(), torch.rand(4, 6, dtype=torch.float64)
    loss, stats = VAT(1.0).loss_and_stats(model, x)
    assert VAT(1.0).perturbation(model, x).dtype == torch.float64
    assert loss.dtype == torch.float64 and stats["kl"].dtype == torch.float64


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_under_bf16_autocast_r_is_the_float32_one(x_dtype):
    model, x, eps = cnn(), torch.rand(4, 2, 6, 6), 2.0
    # Why float32: in bf16, x + xi*d with xi = 1e-6 is x again wherever half a bf16 ulp of x
    # (x * 2^-9) exceeds |xi*d| <= 1e-6, i.e. for every pixel above 5e-4.
    d = 1e-6 * normalize(torch.randn_like(x))
    bright = x.clamp(min=1e-3)
    assert torch.equal(bright.bfloat16() + d.bfloat16(), bright.bfloat16())
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = VAT(eps).perturbation(model, x.to(x_dtype))
        loss = VAT(eps)(model, x.to(x_dtype))
    assert r.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)
    # The probe passes run in float32 with autocast off: the same kernels as without autocast,
    # so r is the float32 r bit for bit (a sample whose float32 g is exactly 0 keeps r = 0).
    torch.manual_seed(1)
    r32 = VAT(eps).perturbation(model, x.to(x_dtype).float())
    assert torch.equal(r, r32)
    moved = (r.reshape(4, -1) != 0).any(dim=1)
    assert moved.any()
    torch.testing.assert_close(
        sample_norms(r)[moved], torch.full((4,), eps, dtype=torch.float64)[moved], rtol=1e-3, atol=0
    )


# --- BatchNorm, dropout, gradients ----------------------------------------------------------


def test_bn_running_stats_unchanged_by_vat_but_changed_by_a_labeled_pass():
    model, x, reg = cnn(), torch.rand(4, 2, 6, 6), VAT(1.0, power_iterations=2, entropy_weight=1.0)
    model.train()
    before = buffers(model)
    reg(model, x).backward()
    reg.loss_and_stats(model, x)
    reg.perturbation(model, x)
    reg.adversarial_examples(model, x)
    after = buffers(model)
    assert before.keys() == after.keys() and len(before) == 6
    assert all(torch.equal(before[k], after[k]) for k in before)

    model(x)  # the labeled pass updates them
    after_labeled = buffers(model)
    for k in before:
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert not torch.equal(before[k], after_labeled[k]), k


def test_passes_inside_the_regularizer_normalise_with_batch_statistics():
    model, x = cnn(), torch.rand(4, 2, 6, 6)
    bn = model[1]
    bn.running_mean.fill_(5.0)  # normalising with these would shift every output by about -5
    outputs = []
    bn.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
    VAT(1.0)(model, x)
    assert len(outputs) == 3  # clean, x + xi*d, x + r
    for out in outputs:
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)


def test_track_running_stats_restored_even_if_the_model_raises():
    class Bomb(nn.Module):
        calls = 0

        def forward(self, x):
            Bomb.calls += 1
            if Bomb.calls == 2:
                raise RuntimeError("boom")
            return x

    model = nn.Sequential(cnn(), Bomb())
    untracked = nn.BatchNorm1d(3, track_running_stats=False)
    model.append(untracked)
    with pytest.raises(RuntimeError, match="boom"):
        VAT(1.0)(model, torch.rand(4, 2, 6, 6))
    flags = [m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats")]
    assert flags == [True, True, False]
    with frozen_bn_stats(model):
        assert not any(
            m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats")
        )
    assert [
        m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats")
    ] == flags


@pytest.mark.parametrize("power_iterations", [1, 2])
def test_dropout_masks_shared_within_one_call_and_fresh_in_the_next(power_iterations):
    model, x = mlp(p=0.5), torch.rand(8, 6)
    rec = DropoutRecorder(model)
    reg = VAT(1.0, power_iterations=power_iterations)
    reg(model, x)
    first = rec.masks
    assert len(first) == 2 + power_iterations  # clean, power iterations, adversarial
    assert all(torch.equal(m, first[0]) for m in first)
    rec.masks = []
    reg(model, x)
    assert all(torch.equal(m, rec.masks[0]) for m in rec.masks)
    assert not torch.equal(rec.masks[0], first[0])


def test_rng_ends_one_classifier_pass_past_the_snapshot():
    model, x = mlp(p=0.5), torch.rand(8, 6)
    torch.manual_seed(5)
    VAT(1.0, power_iterations=3)(model, x)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    torch.randn_like(x)  # the random d
    model(x)  # one pass of dropout
    assert torch.equal(after, torch.get_rng_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reused_dropout_masks_are_atens_masks_bit_for_bit(dtype, channels_last):
    from lvat.regularizers.common import ReusedDropoutMasks

    drop = nn.Dropout(0.3).train()
    x = torch.rand(4, 3, 5, 6).to(dtype) + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    native32 = F.dropout(x.float(), 0.3)  # bernoulli_ draws one stream whatever the dtype
    torch.manual_seed(3)
    native = F.dropout(x, 0.3)
    after_one = torch.get_rng_state()
    torch.manual_seed(3)
    with ReusedDropoutMasks(drop) as masks:
        masks.new_pass()
        first = drop(x)
        assert torch.equal(torch.get_rng_state(), after_one)
        masks.new_pass()
        again = drop(x.float())  # another dtype: the same 0/1 draw, scaled in float32
        assert torch.equal(torch.get_rng_state(), after_one)  # nothing drawn
        second_call = drop(x)  # a second call in one pass draws a mask of its own
    assert torch.equal(first, native)
    assert torch.equal(again, native32)
    assert not torch.equal(second_call == 0, native == 0)
    assert "forward" not in drop.__dict__  # the module's own forward is back


def test_reused_dropout_masks_leave_a_compiled_model_alone():
    """A patched forward would change the compiled graph's guards every step (recompiles)."""
    from lvat.regularizers.common import ReusedDropoutMasks

    for wrap in (lambda m: m.compile() or m, torch.compile):
        model = mlp(p=0.5)
        compiled = wrap(model)  # nothing compiles until it is called
        with ReusedDropoutMasks(compiled):
            assert all("forward" not in m.__dict__ for m in model.modules())
    model = mlp(p=0.5)
    with ReusedDropoutMasks(model):
        assert sum("forward" in m.__dict__ for m in model.modules()) == 1


@pytest.mark.parametrize("power_method", ["finite-difference", "exact"])
def test_reusing_dropout_masks_changes_no_number(monkeypatch, power_method):
    """The regularizer with masks reused equals it with every pass drawing again from the
    restored generator (the convention), bit for bit: r, loss, and the generator after."""
    import lvat.regularizers.passes as passes

    class DrawAgain:  # each pass draws its masks from the restored generator
        def __init__(self, model):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def new_pass(self):
            pass

    model, x = cnn(p=0.3), torch.rand(6, 2, 6, 6)
    reg = VAT(1.0, xi=XI, power_iterations=2, power_method=power_method)
    results = []
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(passes, "ReusedDropoutMasks", DrawAgain)
        torch.manual_seed(0)
        out = reg.loss_and_stats(model, x)[0], reg.perturbation(model, x)
        results.append((*out, torch.get_rng_state()))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_perturbation_touches_no_parameter_grad():
    model, x = cnn(p=0.3), torch.rand(4, 2, 6, 6)
    VAT(1.0, power_iterations=2).perturbation(model, x)
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    VAT(1.0).perturbation(model, x)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_loss_backward_gives_the_classifier_gradients():
    model, x = cnn(), torch.rand(4, 2, 6, 6)
    loss = VAT(2.0, xi=XI)(model, x)
    assert loss.dim() == 0 and loss.requires_grad and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


def test_perturbation_works_under_no_grad():
    model, x = mlp(), torch.rand(4, 6)
    with torch.no_grad():
        r = VAT(1.0, xi=XI).perturbation(model, x)
    assert (sample_norms(r) > 0.99).all()


def test_entropy_weight_adds_exactly_weight_times_entropy_and_its_gradient():
    # float64: the gradient check subtracts two gradients of size ~|g|, so it carries their
    # rounding (1e-16 |g| here, 6e-8 |g| in float32, too close to the 1e-7 we check).
    model, x, w = mlp().double(), torch.rand(6, 6, dtype=torch.float64), 0.5
    torch.manual_seed(2)
    loss0, stats0 = VAT(1.0).loss_and_stats(model, x)
    torch.manual_seed(2)
    loss1, stats1 = VAT(1.0, entropy_weight=w).loss_and_stats(model, x)
    assert torch.equal(stats0["kl"], stats1["kl"]) and torch.equal(
        stats0["entropy"], stats1["entropy"]
    )
    # The same two operations (w * entropy, then +) on the same values: equal to the last bit.
    torch.testing.assert_close(loss1, loss0 + w * stats0["entropy"], rtol=0, atol=1e-15)

    params = list(model.parameters())
    g0 = torch.autograd.grad(loss0, params)
    g1 = torch.autograd.grad(loss1, params)
    g_ent = torch.autograd.grad(entropy(model(x)), params)
    for a, b, e in zip(g0, g1, g_ent, strict=True):
        torch.testing.assert_close(b - a, w * e, rtol=1e-9, atol=1e-12)


def test_stats_are_detached_scalars():
    model, x, eps = cnn(), torch.rand(4, 2, 6, 6), 1.5
    loss, stats = VAT(eps, xi=XI).loss_and_stats(model, x)
    assert {"kl", "entropy", "adv_l2"} <= stats.keys()
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert torch.equal(stats["kl"], loss.detach())
    assert math.isclose(stats["adv_l2"].item(), eps, rel_tol=1e-3)
    assert 0 < stats["entropy"] <= math.log(3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": -1.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": 1.0, "xi": 0.0}, "xi"),
        ({"eps": 1.0, "power_iterations": 0}, "power_iterations"),
        ({"eps": 1.0, "power_iterations": 1.5}, "power_iterations"),
        ({"eps": 1.0, "entropy_weight": -0.1}, "entropy_weight"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAT(**kwargs)
