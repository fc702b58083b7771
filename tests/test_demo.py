"""`lvat demo` end to end on the real Fashion-MNIST, with its budget cut to a few steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lvat.experiments import demo

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not FMNIST.is_dir() and not os.environ.get("LVAT_REQUIRE_DATA"),
    reason="apt-get install dataset-fashion-mnist (make test does it)",
)
def test_demo_trains_a_vae_then_three_methods_and_prints_the_table(tmp_path, monkeypatch, capsys):
    for name, value in {
        "VAE_STEPS": 3,
        "VAE_BATCH": 8,
        "CLASSIFIER_STEPS": 3,
        "DECAY_STEPS": 1,
        "BATCH_LABELED": 8,
        "BATCH_UNLABELED": 8,
        "FIGURE_SAMPLES": 16,
    }.items():
        monkeypatch.setattr(demo, name, value)
    rows = demo.demo(tmp_path)
    assert [r["method"] for r in rows] == ["sup", "vat", "lvat-vae"]
    assert all(0 <= r["test_error"] <= 100 and r["validation_error"] is not None for r in rows)
    out = capsys.readouterr().out
    assert "| method | eps | test error % |" in out and "| lvat-vae | 1 |" in out
    for method in ("vat", "lvat"):
        assert (tmp_path / method / "figures" / "fig2_adv_distance.png").stat().st_size > 0
    demo.demo(tmp_path)  # a re-run skips every finished part
    assert "skipped" in capsys.readouterr().out
