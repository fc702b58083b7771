"""The transformers lvat ships (src/lvat/weights/DATASET/KIND.safetensors + KIND.json): each loads
by name without unpickling, matches its model card, and reconstructs real test images as well as
the card says. Needs the dataset (`make test` installs Fashion-MNIST)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lvat
from lvat.config import DataConfig
from lvat.data import load_from_config
from lvat.fit.export import CHECK_IMAGES, read_card, reconstruction_check
from lvat.models.transformers import SAFETENSORS

PACKAGE = Path(lvat.__file__).resolve().parent / "weights"
SHIPPED = sorted(
    f.relative_to(PACKAGE).with_suffix("").as_posix() for f in PACKAGE.rglob(f"*{SAFETENSORS}")
)
MAX_BYTES = 80e6  # everything shipped together


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_weights_stay_small_and_each_has_a_card():
    files = list(PACKAGE.rglob(f"*{SAFETENSORS}"))
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    for f in files:
        assert f.with_suffix(".json").is_file(), f"{f} has no model card"


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_transformer_loads_by_name_matches_its_card_and_reconstructs(name, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("shipped weights must load without torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    model = lvat.load_transformer(name)
    card = read_card(name)
    dataset_name, kind = name.split("/")
    assert (card["name"], card["kind"], card["dataset"]) == (name, kind, dataset_name)
    assert dict(model.hparams) == card["hparams"]
    shared = card["config"]["model"].keys() & card["hparams"].keys()  # the fit config's model.*
    assert shared and all(card["config"]["model"][k] == card["hparams"][k] for k in shared)
    assert card["steps_total"] == sum(s["steps"] for s in card["history"]) > 0
    data = load_from_config(DataConfig(name=dataset_name, pad_to=card["check"]["pad_to"]))
    assert data.fingerprint == card["data_fingerprint"]
    x = data.x_test[: card["check"]["images"]]
    assert len(x) == CHECK_IMAGES
    # Same file, same images, same seed: only float rounding differs between CPUs (~1e-6 rel.)
    assert reconstruction_check(model, x) == pytest.approx(card["check"]["recon_mse"], rel=1e-3)
    # LVAT encodes every unlabeled image: the weights must encode and decode all of them
    assert card["nonfinite"]["train"] == card["nonfinite"]["test"] == 0
    assert card["nonfinite"]["images"] == {"train": len(data.x_train), "test": len(data.x_test)}
