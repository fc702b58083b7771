"""The fast path keeps the method's maths: bf16 autocast, channels-last, latent cache, compile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _reg_helpers import XI, buffers, sample_norms
from conftest import read_jsonl

from lvat.config import Config, TrainConfig, load_config, to_flags
from lvat.data import Batch
from lvat.errors import ConfigError
from lvat.models import VAE, Glow, build_classifier, load_transformer, save_transformer
from lvat.regularizers import LVAT, VAT
from lvat.regularizers.common import full_precision, no_tf32_convs
from lvat.train import fast, train
from lvat.train.step import STATS, train_step

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


def _images(n: int = 12, c: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, c, size, size), generator=g).float() / 255  # no exact 0s


def _classifier(c: int = 1, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier("conv-small", in_channels=c, num_classes=10, dropout=dropout).train()


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vae = VAE(in_channels=1, image_size=16, latent_dim=8)
    return save_transformer(vae, tmp_path_factory.mktemp("t") / "vae.pt")


def _flags(data: Path, out: Path, **kw) -> list[str]:
    base = {
        "data.name": str(data),
        "data.num_labeled": 20,
        "model.name": "conv-small",
        "train.steps": 4,
        "train.batch_labeled": 8,
        "train.batch_unlabeled": 16,
        "train.decay_steps": 2,
        "train.log_every": 1,
        "train.eval_every": 4,
        "train.checkpoint_every": 4,
        "train.progress": "false",
        "device": "cpu",
        "out": str(out),
    }
    base.update(kw)
    return to_flags(base)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_auto_means_bf16_and_channels_last_where_bf16_is_fast(native_bf16, monkeypatch):
    monkeypatch.setattr("lvat.environment.native_bf16", lambda: native_bf16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = (
        fast.FastPath(torch.bfloat16, True, False, True)
        if native_bf16
        else fast.FastPath(None, False, False, True)
    )
    assert fast.resolve(TrainConfig(), cpu) == on_cpu
    assert fast.resolve(TrainConfig(), cuda) == fast.FastPath(torch.bfloat16, True, False, True)
    forced = TrainConfig(amp="bf16", channels_last="on", compile=True)
    assert fast.resolve(forced, cpu) == fast.FastPath(torch.bfloat16, True, True, True)
    assert fast.resolve(TrainConfig(amp="off", channels_last="off"), cuda).amp_dtype is None
    # float32 on a CPU: the classifier channels-last only when asked for (it gains nothing
    # there), the transformer unless "off"
    assert fast.resolve(TrainConfig(amp="off"), cpu) == fast.FastPath(None, False, False, True)
    assert fast.resolve(TrainConfig(amp="bf16"), cpu) == fast.FastPath(
        torch.bfloat16, True, False, True
    )
    pinned = TrainConfig(amp="off", channels_last="off")  # the study's: both layouts NCHW
    assert fast.resolve(pinned, cpu) == fast.FastPath(None, False, False, False)
    # LVAT: auto stays float32 on every device (bf16 trained worse); asking for bf16 still works
    for device in (cpu, cuda):
        assert fast.resolve(TrainConfig(), device, "lvat").amp_dtype is None
        assert fast.resolve(TrainConfig(), device, "vat") == fast.resolve(TrainConfig(), device)
    assert fast.resolve(TrainConfig(amp="bf16"), cpu, "lvat").amp_dtype == torch.bfloat16


def test_the_test_suite_resolves_auto_to_float32_on_every_cpu():
    # conftest pins it: the suite's numbers must not depend on the machine's bf16 units
    assert fast.resolve(TrainConfig(), torch.device("cpu")).amp_dtype is None


def test_under_bf16_autocast_the_vat_perturbation_is_the_float32_one_bit_for_bit():
    # A bf16 probe x + xi*d rounds back to x; the regularizer runs the probe in float32, so r
    # must not change at all under autocast (without the guard its direction is noise).
    model, x = _classifier(), _images()
    torch.manual_seed(1)
    r32 = VAT(eps=2.5).perturbation(model, x)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r16 = VAT(eps=2.5).perturbation(model, x)
    assert r16.dtype == torch.float32
    assert torch.equal(r16, r32)


@pytest.mark.parametrize("power_method", ["finite-difference", "exact"])
@pytest.mark.parametrize("method", ["vat", "lvat-vae"])
def test_on_the_cpu_fast_path_r_has_norm_eps_and_bn_buffers_stay_untouched(
    method, power_method, vae_path
):
    # The path `amp = "auto"` takes on a CPU with bf16 units: bf16 autocast, channels-last.
    model, x = _classifier(), _images(12)
    fast.apply(model, None, fast.FastPath(torch.bfloat16, True, False))
    if method == "vat":
        reg = VAT(eps=2.5, xi=XI, power_method=power_method)
    else:  # the VAE latent is one group
        reg = LVAT(load_transformer(vae_path), eps=1.5, xi=XI, power_method=power_method)
    before = buffers(model)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = reg.loss_and_stats(model, x)
        torch.manual_seed(1)
        r = reg.perturbation(model, x)
    assert torch.isfinite(loss) and stats["zero_direction"] == 0
    assert all(torch.equal(v, buffers(model)[k]) for k, v in before.items())
    assert r.dtype == torch.float32
    torch.testing.assert_close(
        sample_norms(r), torch.full((len(x),), reg.eps).double(), rtol=1e-3, atol=0
    )


def test_the_amp_step_runs_classifier_passes_in_bf16_and_probe_passes_in_float32():
    model, x = _classifier(), _images(12)
    seen: list[tuple[bool, torch.dtype]] = []
    conv = model.features[0]
    conv.register_forward_hook(
        lambda m, inp, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
    )
    batch = Batch(x[:4], torch.arange(4), x[4:])
    opt = torch.optim.Adam(model.parameters())
    stats = train_step(model, VAT(eps=2.5), opt, batch, 1.0, torch.bfloat16)
    # labeled (bf16), clean target (f32), probe (f32), adversarial (bf16)
    assert seen == [
        (True, torch.bfloat16),
        (False, torch.float32),
        (False, torch.float32),
        (True, torch.bfloat16),
    ]
    assert stats.dtype == torch.float32 and stats.shape == (len(STATS),)
    assert torch.isfinite(stats).all() and stats[STATS.index("kl")] > 0


def test_a_bf16_training_run_on_cpu_stays_finite(toy_data, tmp_path):
    # xi = 1e-3: adv_l2 is eps only if no sample's float32 probe rounds away (see _reg_helpers.XI).
    amp = {"train.amp": "bf16", "method.xi": 1e-3}
    cfg = load_config(Config, None, _flags(toy_data, tmp_path / "amp", **amp))
    res = train(cfg)
    assert res["amp"] == "bfloat16"
    rows = read_jsonl(tmp_path / "amp" / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) and r["kl"] > 0 for r in rows)
    assert all(r["adv_l2"] == pytest.approx(2.5, rel=1e-3) for r in rows)


def test_channels_last_gives_the_same_logits_and_gradients():
    x = _images(8, c=3, size=32)
    dense, nhwc = _classifier(3), _classifier(3)
    fast.apply(nhwc, None, fast.FastPath(None, True, False))
    assert nhwc.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(x), dense(x), atol=1e-4, rtol=1e-4)  # train-mode BN
    # Gradients, compared norm-wise: oneDNN's float32 weight-gradient kernels are themselves
    # ~1e-3 (relative norm) from float64 here, in either layout; a layout bug would be O(1).
    for m in (dense, nhwc):
        m.eval()(x).square().sum().backward()  # eval: train-mode BN on 8 images is ill-posed
    g_dense, g_nhwc = dense.features[0].weight.grad, nhwc.features[0].weight.grad
    assert ((g_nhwc - g_dense).norm() / g_dense.norm()).item() < 1e-2


def test_cached_latents_are_the_encoded_images_and_give_the_uncached_loss():
    torch.manual_seed(0)
    vae = VAE(in_channels=1, image_size=16, latent_dim=8)  # eval-mode encode: deterministic
    reg, model = LVAT(vae, eps=1.5), _classifier()
    pool = (torch.rand(30, 1, 16, 16) * 255).to(torch.uint8)
    cache = fast.LatentCache.build(vae, pool, torch.device("cpu"), seed=0, batch_size=7)
    assert len(cache) == 30 and cache.nbytes == 30 * 8 * 4
    idx = torch.tensor([3, 17, 0, 29, 11, 5])
    x = pool[idx].float() / 255
    with torch.no_grad():
        z = vae.eval().encode(x)
    # 1. The cache holds encode(x) of the right images. Encoded in batches of 7 rather than 6,
    # the conv and matmul kernels may sum in another order: float32, <= 8192 products per
    # output, a few 1e-7 relative at most in practice; 1e-5 still tells any two images apart.
    torch.testing.assert_close(cache.lookup(idx), z, rtol=1e-5, atol=1e-5)
    # 2. Given the same latent, LVAT computes the same thing whether it encodes x itself or is
    # handed z: the same operations on the same shapes and RNG state, so bit for bit. (Comparing
    # losses from the two slightly different z would test rounding noise: at xi = 1e-6 the power
    # iteration's direction amplifies a 1e-7 change of z into a visible change of the loss.)
    torch.manual_seed(2)
    loss, stats = reg.loss_and_stats(model, x)
    torch.manual_seed(2)
    given, gstats = reg.loss_and_stats(model, x, z=z)
    assert torch.equal(given, loss)
    assert all(torch.equal(gstats[k], stats[k]) for k in stats)


def test_a_cached_lvat_run_matches_an_uncached_one_and_augmentation_is_refused(
    toy_data, vae_path, tmp_path, capsys
):
    # The cache encodes 200 images at once, the plain run each step's 16: z differs by float32
    # rounding (~1e-7). At the authors' xi = 1e-6 the power iteration may amplify that into a
    # visible change of the direction; at xi = 0.1 the direction is a smooth function of z and
    # moves by ~1e-7 / 0.1 relative, so the KL moves by < 1e-6. Reading the wrong latents (a
    # wiring bug: the batch's latents in reverse order) moves a step's loss by 2e-4. The lr is
    # tiny so that every step compares the same classifier on a new batch: at a real lr, Adam
    # turns rounding-level gradient entries into +-lr updates of either sign, and the two runs'
    # losses drift apart by 1e-4 or more within four steps on some CPUs (seen on an AVX-512
    # EPYC), which would hide a wiring bug after the first step. At lr 1e-9 that drift is < 1e-7.
    lvat = {
        "method.name": "lvat",
        "method.transformer": str(vae_path),
        "method.eps": 1.0,
        "method.xi": 0.1,
        "train.lr": 1e-9,
    }
    plain = load_config(Config, None, _flags(toy_data, tmp_path / "plain", **lvat))
    cached = load_config(
        Config, None, _flags(toy_data, tmp_path / "cached", **lvat, **{"train.cache_latents": 1})
    )
    train(plain)
    res = train(cached)
    assert "cache_latents: 200 latents" in capsys.readouterr().err
    assert res["latent_cache_mib"] >= 0
    plain, cached = (read_jsonl(tmp_path / r / "metrics.jsonl") for r in ("plain", "cached"))
    assert len(plain) == 4  # every step, each on its own batch
    for a, b in zip(plain, cached, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["kl"] == pytest.approx(a["kl"], abs=1e-5)

    aug = _flags(toy_data, tmp_path / "aug", **lvat, **{"train.cache_latents": 1})
    with pytest.raises(ConfigError, match="cache_latents needs data.augment = false"):
        train(load_config(Config, None, [*aug, "--data.augment", "true"]))
    vat = _flags(toy_data, tmp_path / "vat", **{"train.cache_latents": 1})
    with pytest.raises(ConfigError, match="only LVAT encodes"):
        train(load_config(Config, None, vat))


def test_full_precision_turns_off_autocast_and_tf32_and_restores_them():
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with full_precision("cpu"):
                assert not torch.is_autocast_enabled("cpu")
                assert torch.get_float32_matmul_precision() == "highest"
            assert torch.is_autocast_enabled("cpu")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(matmul)
    before = torch.backends.cudnn.allow_tf32
    with no_tf32_convs():  # the CUDA branch of full_precision; the flag exists on CPU builds
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 == before


def test_a_channels_last_transformer_decodes_and_perturbs_as_the_dense_one():
    torch.manual_seed(0)
    glow = Glow(in_channels=1, image_size=16, n_levels=2, n_steps=2, width=16)
    for p in glow.parameters():  # away from the identity init, so every coupling acts
        p.data.add_(0.05 * torch.randn_like(p))
    x = _images(6, c=1, size=16)
    dense_latent = glow.encode(x, deterministic=True)
    dense_x = glow.decode(dense_latent)
    model = _classifier(1)
    fast.apply(model, LVAT(glow, eps=1.0), fast.FastPath(None, False, False, True))
    assert (
        glow.levels[0]
        .steps[0]
        .coupling.zero_conv.weight.is_contiguous(memory_format=torch.channels_last)
    )
    latent = glow.encode(x, deterministic=True)
    for a, b in zip(latent, dense_latent, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(glow.decode(latent), dense_x)  # exact: decode re-quantises
    # the training stats run (and stay finite) with the NHWC transformer
    loss, stats = LVAT(glow, eps=1.0).loss_and_stats(model.eval(), x)
    assert torch.isfinite(loss) and stats["adv_l2"] > 0


def test_compile_wraps_the_classifier_and_decode_in_place():
    model = _classifier()
    keys = set(model.state_dict())
    vae = VAE(in_channels=1, image_size=16, latent_dim=8)
    fast.apply(model, LVAT(vae, eps=1.0), fast.FastPath(None, False, True))
    assert model._compiled_call_impl is not None  # compiled on first call, not here
    assert set(model.state_dict()) == keys  # checkpoints keep their keys
    assert "decode" in vars(vae)  # the instance attribute shadows VAE.decode
