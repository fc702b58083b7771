"""`lvat fit vae|glow`: files written, test metrics, exact resume, clear errors, real data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_jsonl
from PIL import Image

import lvat
from lvat.cli import main
from lvat.config import GlowFitConfig, VAEFitConfig, load_config, to_flags
from lvat.errors import ConfigError, LvatError
from lvat.fit import KINDS, fit, lr_at
from lvat.fit.setup import check_schedule
from lvat.images import save_grid, save_rows
from lvat.models import Glow
from lvat.train import NonFiniteLoss, checkpoint

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "fit"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = {"vae": VAEFitConfig, "glow": GlowFitConfig}
TINY = {  # tiny models for 1x16x16 toy images
    "vae": {"model.latent_dim": 8},
    "glow": {"model.n_levels": 2, "model.n_steps": 2, "model.width": 8, "train.init_images": 64},
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _flags(kind: str, data: Path, out: Path, **kw) -> list[str]:
    base = {
        "data.name": str(data),
        "train.steps": 6,
        "train.batch_size": 16,
        "train.log_every": 2,
        "train.eval_every": 3,
        "train.checkpoint_every": 3,
        "train.grid_images": 16,
        "train.progress": "false",
        "device": "cpu",
        "out": str(out),
        **TINY[kind],
    }
    base.update(kw)
    return to_flags(base)


@pytest.mark.parametrize("kind", ["vae", "glow"])
def test_a_cli_fit_writes_every_file_and_a_loadable_frozen_transformer(
    kind, toy_data, tmp_path, capsys
):
    out = tmp_path / kind
    assert main(["fit", kind, *_flags(kind, toy_data, out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"{kind} on toy: test ") and str(out / "checkpoint.pt") in line
    assert ("bits/dim (with dequantisation" in line) == (kind == "glow")
    for name in ("config.toml", "metrics.jsonl", "eval.jsonl", "checkpoint.pt", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("test.png", "reconstruction.png", "samples.png"):
        with Image.open(out / name) as im:  # 16 images of 16x16, 4 per row, 2 px separators
            assert im.size == (4 * 18 + 2, 4 * 18 + 2) and im.mode == "L", name
            assert np.asarray(im).std() > 0, name  # not a blank canvas
    assert load_config(CLASSES[kind], out / "config.toml").train.steps == 6

    terms = {"vae": {"bce", "kl"}, "glow": {"nll", "bpd"}}[kind]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # log windows end at checkpoints too
    assert all(terms | {"loss", "lr", "steps_per_s", "recon_mse"} <= set(r) for r in rows)
    assert all(r["nonfinite_decode_rate"] == 0.0 and np.isfinite(r["loss"]) for r in rows)
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [3, 6] and all(e["test_images"] == 50 for e in evals)
    results = json.loads((out / "results.json").read_text())
    for key in {f"test_{t}" for t in terms | {"recon_mse", "nonfinite_decode_rate"}}:
        assert np.isfinite(results[key]), key
    assert results["test_nonfinite_decode_rate"] == 0.0 and results["steps"] == 6
    assert {"hardware", "versions", "wall_time_s"} <= set(results)
    if kind == "glow":  # bpd includes D log 2^n_bits: nll / (D ln 2) == bpd, and bpd > 0
        # The same float32 sum divided in float32 (6e-8), values logged with 6 decimals (bpd ~ 5:
        # 1e-7 relative): 1e-5 is a wide margin; a missing D log 32 term would be off by ~100 %.
        want = results["test_nll"] / (256 * np.log(2))
        assert results["test_bpd"] == pytest.approx(want, rel=1e-5)
        assert results["test_recon_exact"] == 1.0

    model = lvat.load_transformer(out / "checkpoint.pt")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(4, 1, 16, 16)
    if kind == "glow":
        x_rec = model.decode(model.encode(x, deterministic=True))
        assert torch.equal(x_rec, model.quantize(x))
    else:
        assert model.encode(x).shape == (4, 8) and model.decode(model.encode(x)).shape == x.shape


@pytest.mark.parametrize("kind", ["vae", "glow"])
def test_resume_ends_bit_identical_to_an_unstopped_run(kind, toy_data, tmp_path, monkeypatch):
    flags = {"data.augment": "true", "data.flip": "on"}
    whole = load_config(CLASSES[kind], None, _flags(kind, toy_data, tmp_path / "whole", **flags))
    fit(whole)
    parts = load_config(CLASSES[kind], None, _flags(kind, toy_data, tmp_path / "parts", **flags))
    assert fit(parts, stop_at=3) == {"step": 3, "finished": False}
    assert checkpoint.load(tmp_path / "parts" / "checkpoint.pt")["step"] == 3

    def no_init(*args, **kwargs):
        raise AssertionError("ActNorm re-initialised on resume")

    monkeypatch.setattr(Glow, "initialize", no_init)
    torch.manual_seed(1234)  # a resumed process starts with other global RNG state
    fit(parts, resume=True)
    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "parts" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k

    for name in ("metrics.jsonl", "eval.jsonl"):
        whole, parts = (read_jsonl(tmp_path / r / name, untimed=True) for r in ("whole", "parts"))
        assert whole == parts


def test_resume_through_the_cli_refusing_to_overwrite_and_the_wrong_kind(
    toy_data, tmp_path, capsys
):
    out = tmp_path / "run"
    fit(load_config(VAEFitConfig, None, _flags("vae", toy_data, out)), stop_at=3)
    assert main(["fit", "vae", *_flags("vae", toy_data, out)]) == 2
    assert f"already holds a run; add --resume {out}" in capsys.readouterr().err
    assert main(["fit", "glow", "--resume", str(out)]) == 2
    assert "holds a vae run; resume it with lvat fit vae" in capsys.readouterr().err
    assert main(["fit", "vae", "--resume", str(out)]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 6
    assert main(["fit", "vae", "--resume", str(tmp_path / "nothing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["vae", "glow"])
def test_28x28_images_without_pad_to_are_a_one_line_config_error(kind, tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "mnistlike.npz"
    x = rng.integers(0, 256, (30, 28, 28)).astype(np.uint8)
    y = np.arange(30) % 10
    np.savez(path, x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    out = tmp_path / "run"
    flags = ["fit", kind, "--dataset", str(path), "--out", str(out), "--device", "cpu"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "28x28" in err and "--data.pad_to 32" in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoint.pt").exists()
    cfg = load_config(
        CLASSES[kind], None, ["--data.name", str(path), "--data.pad_to", "30", "--out", str(out)]
    )
    with pytest.raises(ConfigError, match="data.pad_to = 30 gives 30x30"):
        fit(cfg)


def test_lr_schedules_follow_the_recipes():
    vae = VAEFitConfig().train  # SVHN defaults: x0.97 every 572 steps after 22,893
    assert lr_at(0, vae) == lr_at(22893 + 571, vae) == 1e-3
    assert lr_at(22893 + 572, vae) == pytest.approx(0.97e-3)
    assert lr_at(22893 + 5 * 572, vae) == pytest.approx(1e-3 * 0.97**5)
    glow = GlowFitConfig().train  # authors: 1e-4, 5e-4, 1e-4, 5e-5, 1e-4; linear warm-up
    assert lr_at(0, glow) == pytest.approx(1e-6) and lr_at(49, glow) == pytest.approx(0.5e-4)
    got = [lr_at(s, glow) for s in (99, 100, 599, 600, 5599, 5600, 10599, 10600, 15599)]
    want = [1e-4, 5e-4, 5e-4, 1e-4, 1e-4, 5e-5, 5e-5, 1e-4, 1e-4]
    assert got == pytest.approx(want)
    bad = load_config(GlowFitConfig, None, ["--train.lr_factors", "1,2"])
    with pytest.raises(ConfigError, match="one value more than train.lr_milestones"):
        check_schedule(bad.train)


def test_a_nonfinite_loss_stops_the_fit_and_keeps_the_last_good_checkpoint(
    toy_data, tmp_path, monkeypatch
):
    out = tmp_path / "nan"
    cfg = load_config(VAEFitConfig, None, _flags("vae", toy_data, out, **{"train.steps": 12}))
    import lvat.fit.setup as setup

    real, calls = setup.vae_loss, {"n": 0}  # calls: steps 1-3, the eval at 3, steps 4-5

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        return {k: v * float("nan") for k, v in terms.items()} if calls["n"] == 6 else terms

    monkeypatch.setattr(setup, "vae_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="non-finite loss between steps 5 and 6.*intact"):
        fit(cfg)
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(setup, "vae_loss", real)
    assert fit(cfg, resume=True)["steps"] == 12


def test_every_shipped_fit_config_parses():
    files = sorted(CONFIGS.glob("*.toml"))
    names = {f.stem for f in files}
    for dataset in ("fashion-mnist", "svhn", "svhn-aug", "cifar10", "cifar10-aug"):
        assert {f"{dataset}-vae", f"{dataset}-glow"} <= names
    for f in files:
        kind = f.stem.rsplit("-", 1)[1]
        cfg = load_config(CLASSES[kind], f)
        check_schedule(cfg.train)
        assert cfg.data.augment == ("-aug" in f.stem), f.name
        assert cfg.train.steps >= 1 and cfg.out == f"runs/fit/{f.stem}", f.name


def test_image_grids_have_the_expected_size_and_pixels(tmp_path):
    x = torch.zeros(5, 3, 4, 6)
    x[0, 0] = 1.0
    x[1, :, 0, 0] = float("nan")  # a broken decode is drawn black, not an exception
    with Image.open(save_grid(x, tmp_path / "g.png", nrow=2, padding=1)) as im:
        assert im.size == (2 * 7 + 1, 3 * 5 + 1) and im.mode == "RGB"
        a = np.asarray(im)
        assert tuple(a[1, 1]) == (255, 0, 0) and tuple(a[1, 8]) == (0, 0, 0)
        assert tuple(a[0, 0]) == (255, 255, 255)  # white separator
    with Image.open(save_rows([x[:, :1], x[:2, :1]], tmp_path / "r.png", padding=0)) as im:
        assert im.size == (5 * 6, 2 * 4) and im.mode == "L"
    with pytest.raises(ValueError, match="all rows"):
        save_rows([x, x[:, :1]], tmp_path / "bad.png")


@pytest.mark.skipif(
    not FMNIST.is_dir() and not os.environ.get("LVAT_REQUIRE_DATA"),
    reason="apt-get install dataset-fashion-mnist (make test does it)",
)
@pytest.mark.parametrize("kind", ["vae", "glow"])
def test_a_short_fit_on_real_fashion_mnist_lowers_the_training_loss(kind, tmp_path):
    small = {
        "vae": {"model.latent_dim": 32, "train.batch_size": 16},
        "glow": {
            "model.n_levels": 3,
            "model.n_steps": 2,
            "model.width": 16,
            "train.batch_size": 32,
            "train.lr": 1e-3,
            "train.warmup_steps": 5,
            "train.lr_milestones": "",
            "train.lr_factors": "",
        },
    }[kind]
    flags = {
        "data.name": "fashion-mnist",
        "data.pad_to": 32,
        "data.verify": "false",
        "data.download": "false",
        "train.steps": 40,
        "train.log_every": 10,
        "train.eval_every": 40,
        "train.checkpoint_every": 40,
        "train.final_eval_images": 200,
        "train.grid_images": 16,
        "train.progress": "false",
        "device": "cpu",
        "out": str(tmp_path / kind),
        **small,
    }
    cfg = load_config(CLASSES[kind], None, to_flags(flags))
    results = fit(cfg)
    rows = read_jsonl(tmp_path / kind / "metrics.jsonl")
    assert len(rows) == 4 and rows[-1]["loss"] < 0.9 * rows[0]["loss"], rows
    assert results["test_images"] == 200 and results["test_nonfinite_decode_rate"] == 0.0
    assert results["image_shape"] == [1, 32, 32]
    with Image.open(tmp_path / kind / "samples.png") as im:
        assert im.size == (4 * 34 + 2, 4 * 34 + 2)


def test_kinds_registry_matches_the_transformer_registry():
    assert set(KINDS) == set(lvat.models.TRANSFORMERS)
    with pytest.raises(LvatError, match="nothing to resume"):
        fit(VAEFitConfig(out="/nonexistent/run"), resume=True)


@pytest.mark.numerics
def test_batchnorm_recalibration_gives_the_exact_mean_and_keeps_momentum():
    from lvat.fit.loop import recalibrate_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.BatchNorm2d(3, momentum=0.01))
    batches = [torch.randn(4, 1, 5, 5) * (i + 1) + i for i in range(3)]

    class Stream:
        i = 0

        def next(self):
            self.i += 1
            return batches[self.i - 1]

    recalibrate_batchnorm(model, Stream(), 3)
    bn = model[1]
    with torch.no_grad():
        means = torch.stack([model[0](b).mean(dim=(0, 2, 3)) for b in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    assert bn.momentum == 0.01 and model.training


@pytest.mark.parametrize("clip", [0.0, 5.0])
def test_clip_grad_norm_bounds_every_update_even_a_spiked_one(
    clip, toy_data, tmp_path, monkeypatch
):
    import lvat.fit.setup as setup

    real, calls = setup.vae_loss, {"n": 0}

    def spiked(*args, **kwargs):  # one batch whose loss (and so gradient) is 1e6 times too big
        calls["n"] += 1
        terms = real(*args, **kwargs)
        return {**terms, "loss": terms["loss"] * 1e6} if calls["n"] == 2 else terms

    norms = []
    step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(setup, "vae_loss", spiked)
    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    flags = _flags("vae", toy_data, tmp_path / "run", **{"train.clip_grad_norm": clip})
    fit(load_config(VAEFitConfig, None, flags))
    assert len(norms) == 6
    if clip:
        assert max(norms) <= clip * (1 + 1e-4)
    else:  # unclipped, the spiked update's gradient is far beyond the clip used above
        assert norms[1] > 1e3 * max(norms[:1] + norms[2:]) > 5.0
