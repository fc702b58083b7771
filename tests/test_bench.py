"""`lvat bench` end to end on a tiny setting; the naive baseline computes what we compute."""

from __future__ import annotations

import json

import pytest
import torch

from lvat.bench.naive import NaiveData, host_normalize, naive_consistency
from lvat.bench.timing import count_flops, time_steps
from lvat.cli import main
from lvat.data import make_split
from lvat.models import VAE, build_classifier
from lvat.regularizers import LVAT, VAT, normalize

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier("conv-small", in_channels=channels, num_classes=10, dropout=0.0)


def test_a_tiny_bench_writes_its_report_with_positive_timings(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--models", "conv-small", "--methods", "sup,vat,lvat-vae",
            "--batch-labeled", "4", "--batch-unlabeled", "8", "--warmup", "0", "--repeats", "1",
            "--steps-per-repeat", "1", "--num-images", "40", "--peak-size", "64",
            "--cache-latents", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "randomly initialised" in text and "target vat <= 3.0 x sup-12" in text
    report = json.loads(out.read_text())
    assert {"environment", "note", "options", "matmul_peak", "models"} <= set(report)
    assert {"hardware", "versions"} <= set(report["environment"])
    assert report["matmul_peak"]["tflops"] > 0
    model = report["models"]["conv-small"]
    assert model["image_shape"] == [1, 32, 32] and model["conv_reference"]["tflops"] > 0
    rows = {(r["method"], r["impl"]): r for r in model["rows"]}
    assert set(rows) == {
        ("sup-12", "ours"),
        ("lvat-vae+f32", "ours"),  # the transformer channels-last (auto on a CPU) vs NCHW
        ("lvat-vae+cache", "ours"),
        ("vat+exact", "ours"),
        ("lvat-vae+exact", "ours"),
        *((m, impl) for m in ("sup", "vat", "lvat-vae") for impl in ("ours", "naive")),
    }
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["images_per_s"] > 0 and r["flops_per_step"] > 0
        assert r["tflops"] > 0 and r["conv_floor_ms"] > 0
    # VAT does more work than the plain step, and the naive probe also computes weight gradients.
    assert rows["vat", "ours"]["flops_per_step"] > rows["sup", "ours"]["flops_per_step"]
    assert rows["vat", "naive"]["flops_per_step"] > rows["vat", "ours"]["flops_per_step"]
    # The exact product adds a forward-mode tangent to the probe pass: more FLOPs, no xi.
    assert rows["vat+exact", "ours"]["flops_per_step"] > rows["vat", "ours"]["flops_per_step"]
    # The cache skips the encoder pass.
    assert (
        rows["lvat-vae+cache", "ours"]["flops_per_step"]
        < rows["lvat-vae", "ours"]["flops_per_step"]
    )
    assert {t["target"] for t in model["targets"]} >= {
        "vat <= 3.0 x sup-12",
        "vat >= 1x faster than naive (cpu)",
    }
    assert all(isinstance(t["met"], bool) for t in model["targets"])


def test_unknown_models_or_methods_are_refused(capsys):
    assert main(["bench", "--methods", "vat,mixup"]) == 2
    assert "--methods: choose from" in capsys.readouterr().err


@pytest.mark.numerics
def test_the_naive_vat_computes_the_same_r_and_loss_as_ours():
    # Two implementations of the same maths, compared in float64: their rounding (~1e-16) stays
    # far below the probe xi*d even at the authors' xi = 1e-6, so the directions agree to ~1e-9.
    # In float32 the probe of a [0, 1] image is at rounding level and g is rounding noise, which
    # two correct implementations do not share. Both draw d in float32 from the same seed (the
    # naive port as `torch.randn(shape)`); the naive one normalises it in float32 (~6e-8).
    torch.manual_seed(5)
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64)
    model = _classifier().double().train()
    vat = VAT(eps=2.5)
    torch.manual_seed(1)  # the same seed -> the same d (both draw randn on the CPU first)
    ours, stats = vat.loss_and_stats(model, x)
    torch.manual_seed(1)
    r_ours = vat.perturbation(model, x)
    torch.manual_seed(1)
    naive, (r_naive,) = naive_consistency(model, x, eps=2.5)
    assert ours.dtype == r_ours.dtype == torch.float64
    assert ((r_naive - r_ours).norm() / r_ours.norm()).item() < 1e-6
    torch.testing.assert_close(naive, ours, atol=1e-9, rtol=1e-6)
    assert stats["kl"] > 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # zeroed


@pytest.mark.numerics
def test_the_naive_lvat_computes_the_same_latent_r_as_ours():
    torch.manual_seed(0)
    vae = VAE(in_channels=1, image_size=16, latent_dim=8).double()
    reg = LVAT(vae, eps=1.5)
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64)
    model = _classifier().double().train()
    torch.manual_seed(3)
    r_ours = reg.perturbation(model, x)
    torch.manual_seed(3)
    _, (r_naive,) = naive_consistency(model, x, eps=1.5, transformer=vae)
    assert r_ours.dtype == torch.float64
    assert ((r_naive - r_ours).norm() / r_ours.norm()).item() < 1e-6


@pytest.mark.numerics
def test_host_normalize_is_the_authors_normalisation():
    d = torch.randn(4, 3, 5, 5) * 1e-9
    torch.testing.assert_close(host_normalize(d), normalize(d))


def test_naive_data_draws_float_batches_from_dataloaders():
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(40) % 10
    split = make_split(y.numpy(), 20, 0)
    data = NaiveData(x, y, split.labeled, split.unlabeled, 4, 8)
    for _ in range(12):  # past an epoch of the labeled loader (5 batches)
        x_l, y_l, x_u = data.next(torch.device("cpu"))
    assert x_l.dtype == torch.float32 and x_l.shape == (4, 1, 8, 8) and x_u.shape == (8, 1, 8, 8)
    assert x_u.min() >= 0 and x_u.max() <= 1 and y_l.dtype == torch.long


def test_flop_counting_sees_autograd_grad_and_timing_returns_each_repeat():
    a = torch.randn(16, 16, requires_grad=True)
    b = torch.randn(16, 16)
    fwd = count_flops(lambda: a @ b)
    assert fwd == 2 * 16**3
    both = count_flops(lambda: torch.autograd.grad((a @ b).sum(), a))
    assert both == 2 * fwd  # forward + the gradient w.r.t. a only
    times = time_steps(lambda: a @ b, torch.device("cpu"), warmup=1, repeats=3, steps=2)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_a_bf16_bench_times_float32_beside_it_and_reports_the_cpu_speedup_targets(tmp_path):
    # bf16 is emulated where the CPU has no bf16 units: slower, but the rows and targets exist.
    out = tmp_path / "bench.json"
    args = ["bench", "--models", "conv-small", "--methods", "vat", "--amp", "bf16",
            "--batch-labeled", "4", "--batch-unlabeled", "8", "--warmup", "0", "--repeats", "1",
            "--steps-per-repeat", "1", "--num-images", "40", "--peak-size", "64", "--no-naive",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert (report["options"]["amp"], report["options"]["channels_last"]) == ("bfloat16", True)
    model = report["models"]["conv-small"]
    assert [r["method"] for r in model["rows"]] == [
        "sup-12", "sup-12+f32", "vat", "vat+f32", "vat+exact"
    ]  # fmt: skip
    rows = {r["method"]: r for r in model["rows"]}
    assert rows["vat+f32"]["flops_per_step"] == rows["vat"]["flops_per_step"]  # same maths
    targets = {t["target"]: t for t in model["targets"]}
    fd, exact = (
        targets["vat >= 1.3x faster than vat+f32"],
        targets["vat+exact >= 1.8x faster than vat+f32"],
    )
    assert fd["value"] == pytest.approx(rows["vat+f32"]["ms_per_step"] / rows["vat"]["ms_per_step"])
    assert exact["value"] == pytest.approx(
        rows["vat+f32"]["ms_per_step"] / rows["vat+exact"]["ms_per_step"]
    )
    # --no-float32 drops the float32 rows
    assert main([*args[:-2], "--no-float32", "--no-exact", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]["conv-small"]["rows"]
    assert [r["method"] for r in rows] == ["sup-12", "vat"]
