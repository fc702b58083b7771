"""Shipped config files parse, and the paper's carry docs/method.md §5's values."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvat.config import Config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNS = sorted(p for p in CONFIGS.glob("**/*.toml") if p.parent.name not in ("fit", "sweeps"))

VAT_EPS = {"svhn": 2.5, "svhn-aug": 3.5, "cifar10": 10.0, "cifar10-aug": 8.0}
LVAT_VAE_EPS = {"svhn": 1.5, "cifar10": 1.0}


@pytest.mark.parametrize("path", RUNS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_training_config_parses(path):
    load_config(Config, path)


@pytest.mark.parametrize("setting", ["svhn", "svhn-aug", "cifar10", "cifar10-aug"])
@pytest.mark.parametrize("regime", ["ssl", "sl"])
def test_paper_configs_match_the_recipe(setting, regime):
    dataset = setting.removesuffix("-aug")
    folder = CONFIGS / "paper" / f"{setting}-{regime}"
    assert sorted(p.stem for p in folder.glob("*.toml")) == ["lvat-glow", "lvat-vae", "sup", "vat"]
    outs = set()
    for method in ("sup", "vat", "lvat-vae", "lvat-glow"):
        cfg = load_config(Config, folder / f"{method}.toml")
        outs.add(cfg.out)
        assert cfg.data.name == dataset and cfg.data.augment == setting.endswith("-aug")
        assert cfg.data.flip == (
            "on" if setting == "cifar10-aug" else "off" if "aug" in setting else "auto"
        )
        labels = {"svhn": 1000, "cifar10": 4000}[dataset] if regime == "ssl" else -1
        assert cfg.data.num_labeled == labels
        assert cfg.model.name == "conv-large" and cfg.model.top_bn == (dataset == "svhn")
        t = cfg.train
        assert (
            t.steps,
            t.batch_labeled,
            t.batch_unlabeled,
            t.lr,
            t.decay_steps,
            t.decay_beta1,
        ) == ({"svhn": 48000, "cifar10": 200000}[dataset], 32, 128, 1e-3, 16000, 0.5)
        m = cfg.method
        assert (m.alpha, m.xi, m.power_iterations) == (1.0, 1e-6, 1)
        if method == "vat":
            assert (m.name, m.eps) == ("vat", VAT_EPS[setting])
        if method.startswith("lvat"):
            kind = method[5:]
            assert m.name == "lvat" and m.transformer == f"runs/fit/{setting}-{kind}/checkpoint.pt"
            assert m.eps == (LVAT_VAE_EPS[dataset] if kind == "vae" else 1.0)
    assert len(outs) == 4  # every method writes its own run folder
