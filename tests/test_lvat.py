"""LVAT as docs/method.md §1 says: latent groups, frozen transformer, target p(x), shared passes."""

from __future__ import annotations

import math

import pytest
import torch
from _reg_helpers import (
    XI,
    DropoutRecorder,
    TupleTransformer,
    authors_norm,
    buffers,
    mlp,
    sample_norms,
)
from torch import Tensor, nn

from lvat.regularizers import LVAT, Transformer, kl_divergence, normalize

pytestmark = pytest.mark.numerics


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class VectorTransformer(nn.Module):
    """One-tensor latent (like the VAE's mu): x (B, 6) -> z (B, 4) -> x, lossy."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(6, 4), nn.Linear(4, 6)

    def encode(self, x: Tensor) -> Tensor:
        return self.enc(x)

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.dec(z))


class ListTransformer(TupleTransformer):
    """The two-group transformer, returning a list instead of a tuple."""

    def encode(self, x: Tensor) -> list[Tensor]:
        return list(super().encode(x))


def test_toy_transformers_satisfy_the_protocol():
    assert isinstance(TupleTransformer(), Transformer)
    assert isinstance(VectorTransformer(), Transformer)
    assert not isinstance(nn.Linear(2, 2), Transformer)


@pytest.mark.parametrize("transformer_cls", [TupleTransformer, ListTransformer, VectorTransformer])
def test_r_has_the_structure_of_the_latent(transformer_cls):
    t, model, x = transformer_cls(), mlp(), torch.rand(5, 6)
    z = t.encode(x)
    r = LVAT(t, 1.0).perturbation(model, x)
    assert type(r) is type(z)
    z_groups, r_groups = ([z], [r]) if isinstance(z, Tensor) else (z, r)
    assert [g.shape for g in r_groups] == [g.shape for g in z_groups]
    assert all(g.dtype == torch.float32 and not g.requires_grad for g in r_groups)
    assert LVAT(t, 1.0).adversarial_examples(model, x).shape == x.shape


def test_separate_groups_each_have_norm_eps():
    t, model, x, eps = TupleTransformer(), mlp(), torch.rand(5, 6), 1.5
    a, b = LVAT(t, eps, xi=XI, latent_groups="separate").perturbation(model, x)
    for g in (a, b):
        torch.testing.assert_close(sample_norms(g), authors_norm(g, eps), rtol=1e-5, atol=0)
        torch.testing.assert_close(
            sample_norms(g), torch.full((5,), eps).double(), rtol=1e-3, atol=0
        )
    total = torch.sqrt(sample_norms(a) ** 2 + sample_norms(b) ** 2)
    torch.testing.assert_close(
        total, torch.full((5,), eps * math.sqrt(2)).double(), rtol=1e-3, atol=0
    )


def test_joint_groups_have_total_norm_eps():
    t, model, x, eps = TupleTransformer(), mlp(), torch.rand(5, 6), 1.5
    a, b = LVAT(t, eps, xi=XI, latent_groups="joint").perturbation(model, x)
    flat = torch.cat([a, b.flatten(1)], dim=1)
    torch.testing.assert_close(sample_norms(flat), authors_norm(flat, eps), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        sample_norms(flat), torch.full((5,), eps).double(), rtol=1e-3, atol=0
    )
    assert (sample_norms(a) < 0.99 * eps).all() and (sample_norms(b) < 0.99 * eps).all()


def test_lvat_is_algorithm_2_on_the_same_random_d():
    """End to end against a direct transcription of Algorithm 2 with separate groups.

    float64, as for VAT: the two programs agree to rounding (~1e-16), far below the probe.
    """
    t, model = TupleTransformer().double(), mlp().double()
    x, eps, xi = torch.rand(5, 6, dtype=torch.float64), 1.0, 1e-6
    torch.manual_seed(1)
    r = LVAT(t, eps, xi=xi).perturbation(model, x)
    torch.manual_seed(1)
    loss = LVAT(t, eps, xi=xi)(model, x)

    torch.manual_seed(1)
    with torch.no_grad():
        za, zb = t.encode(x)
    # d is drawn in float32 whatever the latent's precision (the same d as a float32 run)
    da = (xi * normalize(torch.randn_like(za, dtype=torch.float32).double())).requires_grad_()
    db = (xi * normalize(torch.randn_like(zb, dtype=torch.float32).double())).requires_grad_()
    target = model(x).detach()  # p(x), not p(decode(encode(x)))
    ga, gb = torch.autograd.grad(
        kl_divergence(target, model(t.decode((za + da, zb + db)))), [da, db]
    )
    ra, rb = eps * normalize(ga), eps * normalize(gb)
    torch.testing.assert_close(r[0], ra)
    torch.testing.assert_close(r[1], rb)
    x_adv = t.decode((za + ra, zb + rb))
    torch.testing.assert_close(loss, kl_divergence(target, model(x_adv)))
    # The target matters: the reconstruction is not x, so p(decode(encode(x))) gives another loss.
    recon_target = model(t.decode((za, zb))).detach()
    assert not torch.allclose(loss, kl_divergence(recon_target, model(x_adv)))


def test_gradient_reaches_d_through_decode_and_only_where_decode_uses_it():
    class PartialDecoder(TupleTransformer):
        def decode(self, z):  # ignores a[:, 2] and all of b
            a, _ = z
            return torch.tanh(self.dec(torch.cat([a[:, :2], torch.zeros(a.shape[0], 9)], dim=1)))

    t, model, x, eps = PartialDecoder(), mlp(), torch.rand(5, 6), 1.0
    a, b = LVAT(t, eps, xi=XI).perturbation(model, x)
    assert (b == 0).all() and (a[:, 2] == 0).all()
    torch.testing.assert_close(sample_norms(a), torch.full((5,), eps).double(), rtol=1e-3, atol=0)
    a, b = LVAT(t, eps, xi=XI, latent_groups="joint").perturbation(model, x)
    assert (b == 0).all() and (a[:, 2] == 0).all()
    torch.testing.assert_close(sample_norms(a), torch.full((5,), eps).double(), rtol=1e-3, atol=0)


def test_transformer_is_frozen_and_the_classifier_learns():
    t, model, x = TupleTransformer(), mlp(), torch.rand(5, 6)
    t.train()
    reg = LVAT(t, 1.0)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    t_before = {k: v.clone() for k, v in t.state_dict().items()}
    m_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([*model.parameters(), *t.parameters()], lr=0.1, weight_decay=0.1)
    reg(model, x).backward()
    assert all(p.grad is None for p in t.parameters())
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in t_before.items())
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in m_before.items())


def test_eval_mode_is_reasserted_on_every_call():
    t, model, x = TupleTransformer(), mlp(), torch.rand(5, 6)
    reg = LVAT(t, 1.0)
    t.train()  # e.g. a parent module's .train()
    torch.manual_seed(4)
    x_adv = reg.adversarial_examples(model, x)
    assert not t.training
    torch.manual_seed(4)
    torch.testing.assert_close(reg.adversarial_examples(model, x), x_adv)  # decode not random


def test_encode_runs_without_grad_and_perturbation_touches_no_grad():
    class Recording(TupleTransformer):
        grad_enabled: list[bool] = []

        def encode(self, x):
            self.grad_enabled.append(torch.is_grad_enabled())
            return super().encode(x)

    t, model, x = Recording(), mlp(), torch.rand(5, 6)
    LVAT(t, 1.0).perturbation(model, x)
    LVAT(t, 1.0)(model, x)
    assert t.grad_enabled == [False, False]
    LVAT(t, 1.0).perturbation(model, x)
    assert all(p.grad is None for p in model.parameters())


def test_a_plain_object_with_encode_and_decode_is_a_transformer():
    class Affine:  # not an nn.Module: no freezing needed, nothing to train
        def encode(self, x):
            return 2 * x - 1

        def decode(self, z):
            return (z + 1) / 2

    model, x = mlp(), torch.rand(5, 6)
    r = LVAT(Affine(), 2.0, xi=XI).perturbation(model, x)
    torch.testing.assert_close(sample_norms(r), torch.full((5,), 2.0).double(), rtol=1e-3, atol=0)
    _, stats = LVAT(Affine(), 2.0, xi=XI).loss_and_stats(model, x)
    assert math.isclose(stats["adv_l2"].item(), 1.0, rel_tol=1e-3)  # decode halves distances


def test_bn_running_stats_unchanged_by_lvat_but_changed_by_a_labeled_pass():
    t, model, x = TupleTransformer(), mlp(bn=True, p=0.3), torch.rand(5, 6)
    reg = LVAT(t, 1.0, power_iterations=2, entropy_weight=1.0)
    before, t_before = buffers(model), buffers(t)
    reg(model, x).backward()
    reg.perturbation(model, x)
    assert len(before) == 3 and all(torch.equal(v, buffers(model)[k]) for k, v in before.items())
    assert all(torch.equal(v, buffers(t)[k]) for k, v in t_before.items())
    model(x)
    assert not any(torch.equal(v, buffers(model)[k]) for k, v in before.items())


@pytest.mark.parametrize("power_iterations", [1, 3])
def test_dropout_masks_shared_even_when_decode_draws_random_numbers(power_iterations):
    class NoisyDecoder(TupleTransformer):
        def decode(self, z):  # random draws between the passes must not shift the masks
            return super().decode(z) + 0 * torch.randn(z[0].shape[0], 6)

    t, model, x = NoisyDecoder(), mlp(p=0.5), torch.rand(8, 6)
    rec = DropoutRecorder(model)
    reg = LVAT(t, 1.0, power_iterations=power_iterations)
    reg(model, x)
    first = rec.masks
    assert len(first) == 2 + power_iterations
    assert all(torch.equal(m, first[0]) for m in first)
    rec.masks = []
    reg(model, x)
    assert all(torch.equal(m, rec.masks[0]) for m in rec.masks)
    assert not torch.equal(rec.masks[0], first[0])


def test_under_bf16_autocast_latent_r_is_float32_with_norm_eps_per_group():
    t, model, x, eps = TupleTransformer(), mlp(), torch.rand(5, 6), 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert t.encode(x)[0].dtype == torch.bfloat16  # the latent itself comes out bf16
        a, b = LVAT(t, eps).perturbation(model, x)
        loss = LVAT(t, eps)(model, x)
    assert a.dtype == b.dtype == loss.dtype == torch.float32 and torch.isfinite(loss)
    for g in (a, b):
        torch.testing.assert_close(
            sample_norms(g), torch.full((5,), eps).double(), rtol=1e-3, atol=0
        )


def test_entropy_weight_adds_exactly_weight_times_entropy():
    t, model, x, w = TupleTransformer(), mlp(), torch.rand(5, 6), 2.0
    torch.manual_seed(2)
    loss0, stats0 = LVAT(t, 1.0).loss_and_stats(model, x)
    torch.manual_seed(2)
    loss1, stats1 = LVAT(t, 1.0, entropy_weight=w).loss_and_stats(model, x)
    assert torch.equal(stats0["kl"], stats1["kl"])
    torch.testing.assert_close(loss1, loss0 + w * stats0["entropy"], rtol=0, atol=1e-7)
    assert loss1.requires_grad


def test_stats_are_detached_scalars_and_adv_l2_is_the_input_space_distance():
    t, model, x = TupleTransformer(), mlp(), torch.rand(5, 6)
    torch.manual_seed(3)
    loss, stats = LVAT(t, 1.0).loss_and_stats(model, x)
    torch.manual_seed(3)
    x_adv = LVAT(t, 1.0).adversarial_examples(model, x)
    assert {"kl", "entropy", "adv_l2"} <= stats.keys()
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert torch.equal(stats["kl"], loss.detach())
    torch.testing.assert_close(stats["adv_l2"], (x_adv - x).norm(dim=1).mean())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 1.0, "latent_groups": "both"}, "'separate', 'joint'"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 1.0, "xi": -1e-6}, "xi"),
        ({"eps": 1.0, "power_iterations": 0}, "power_iterations"),
        ({"eps": 1.0, "entropy_weight": float("inf")}, "entropy_weight"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LVAT(TupleTransformer(), **kwargs)


def test_an_object_without_encode_and_decode_is_rejected():
    with pytest.raises(TypeError, match="encode"):
        LVAT(nn.Linear(2, 2), 1.0)


def test_latents_a_transformer_cannot_encode_are_counted_and_named_when_the_loss_breaks(
    tmp_path,
):
    from lvat.train.monitor import NonFiniteLoss, window_means
    from lvat.train.step import STATS

    class Overflowing(TupleTransformer):  # a flow whose couplings overflow on images 1 and 3
        def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
            a, b = super().encode(x)
            odd = (torch.arange(len(x)) % 2 == 1).reshape(-1, 1, 1, 1)
            return a, b.masked_fill(odd, float("inf"))

    x, model = torch.rand(4, 6), mlp()
    loss, stats = LVAT(TupleTransformer(), 1.0).loss_and_stats(model, x)
    assert stats["nonfinite_latent"].item() == 0.0 and torch.isfinite(loss)
    loss, stats = LVAT(Overflowing(), 1.0).loss_and_stats(model, x)
    assert stats["nonfinite_latent"].item() == 0.5 and not torch.isfinite(loss)
    sums = torch.zeros(len(STATS))
    sums[STATS.index("loss")], sums[STATS.index("nonfinite_latent")] = float("nan"), 0.5
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(NonFiniteLoss, match=r"encoded 25.00% of the unlabeled images to non-fin"):
        window_means(sums, 2, 10, ckpt, "train.lr", STATS)
    sums[STATS.index("nonfinite_latent")] = 0.0  # a NaN of another cause: the usual advice
    with pytest.raises(NonFiniteLoss, match="Lower train.lr"):
        window_means(sums, 2, 10, ckpt, "train.lr", STATS)
