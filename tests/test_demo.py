"""`lvat demo` end to end on the real Fashion-MNIST, with its budget cut to a few steps and tiny
stand-ins for the shipped transformers (the real ones are tested in test_shipped_weights.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lvat.errors import LvatError
from lvat.experiments import demo

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def tiny_budget(tmp_path, monkeypatch) -> None:
    from lvat.models import VAE, Glow
    from lvat.models.transformers import export_transformer

    torch.manual_seed(0)
    glow = Glow(in_channels=1, image_size=32, n_levels=3, n_steps=1, width=8)
    glow.initialize(torch.rand(16, 1, 32, 32))
    vae = VAE(in_channels=1, image_size=32, latent_dim=8)
    weights = {
        "lvat-vae": str(export_transformer(vae, tmp_path / "w" / "vae.safetensors")),
        "lvat-glow": str(export_transformer(glow, tmp_path / "w" / "glow.safetensors")),
    }
    monkeypatch.setattr(demo, "TRANSFORMERS", weights)
    for name, value in {
        "CLASSIFIER_STEPS": 3,
        "DECAY_STEPS": 1,
        "BATCH_LABELED": 8,
        "BATCH_UNLABELED": 8,
        "FIGURE_SAMPLES": 16,
    }.items():
        monkeypatch.setattr(demo, name, value)


@pytest.mark.skipif(
    not FMNIST.is_dir() and not os.environ.get("LVAT_REQUIRE_DATA"),
    reason="apt-get install dataset-fashion-mnist (make test does it)",
)
def test_a_bad_demo_learning_rate_is_refused_before_any_run(tmp_path):
    with pytest.raises(LvatError, match="--lr 0.0: give a positive learning rate"):
        demo.demo(tmp_path / "demo", lr=0.0)
    assert not (tmp_path / "demo").exists()


def test_demo_runs_its_methods_in_two_processes_and_prints_the_table(tiny_budget, tmp_path, capsys):
    rows = demo.demo(tmp_path / "demo", workers=2)
    assert [r["method"] for r in rows] == list(demo.RUNS) == ["sup", "vat", "lvat-vae", "lvat-glow"]
    assert all(0 <= r["test_error"] <= 100 and r["validation_error"] is not None for r in rows)
    out = capsys.readouterr().out
    assert "2 process(es)" in out and "| method | eps | test error % |" in out
    assert "| lvat-vae | 0.5 |" in out and "| lvat-glow | 0.5 |" in out and "| sup | - |" in out
    for run in (r for r in demo.RUNS if r != "sup"):
        assert (tmp_path / "demo" / run / "figures" / "fig2_adv_distance.png").stat().st_size > 0
    config = (tmp_path / "demo" / "lvat-vae" / "config.toml").read_text()
    assert 'amp = "off"' in config  # the same precision on every CPU
    assert "lr = 0.001" in config  # the paper's, unless --lr says otherwise
    demo.demo(tmp_path / "demo", workers=1)  # a re-run skips every finished part
    assert capsys.readouterr().out.count("finished earlier, skipped") == len(demo.RUNS)


def test_the_demo_stops_before_training_when_a_shipped_transformer_is_missing(
    tiny_budget, tmp_path, monkeypatch
):
    monkeypatch.setattr(demo, "TRANSFORMERS", {**demo.TRANSFORMERS, "lvat-vae": "mnist/nope"})
    with pytest.raises(LvatError, match="needs the shipped transformer 'mnist/nope'"):
        demo.demo(tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
    with pytest.raises(LvatError, match="at least 1"):
        demo.demo(tmp_path / "demo", workers=0)
