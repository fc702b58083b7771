"""Transformer weights users exchange: .safetensors (no code on load), model cards, names."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_run_flags

import lvat
from lvat.config import Config, load_config
from lvat.errors import LvatError
from lvat.models import VAE, Glow
from lvat.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "vae":
        return VAE(in_channels=1, image_size=16, latent_dim=8).eval()
    glow = Glow(in_channels=1, image_size=16, n_levels=2, n_steps=1, width=8)
    glow.initialize(torch.rand(16, 1, 16, 16))
    return glow.eval()


@pytest.mark.parametrize("kind", ["vae", "glow"])
def test_safetensors_round_trip_rebuilds_the_same_transformer(kind, tmp_path):
    model = _tiny(kind)
    card = {"architecture": model.hparams, "steps": 0}
    path = lvat.export_transformer(model, tmp_path / f"{kind}.safetensors", card=card)
    assert path.read_bytes()[:8] != b"PK\x03\x04"  # not a torch zip: no pickle anywhere
    assert json.loads(path.with_suffix(".json").read_text())["architecture"] == model.hparams
    loaded = lvat.load_transformer(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    state, back = model.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    x = torch.rand(4, 1, 16, 16)
    if kind == "glow":  # exact decode(encode(x)) == the 5-bit image, with the same weights
        torch.testing.assert_close(
            loaded.decode(loaded.encode(x, deterministic=True)), loaded.quantize(x), rtol=0, atol=0
        )
    else:  # the same computation on the same weights
        assert torch.equal(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))


def test_a_name_is_looked_up_in_the_weight_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("LVAT_WEIGHTS", str(tmp_path))
    (tmp_path / "toy").mkdir()
    lvat.export_transformer(_tiny("vae"), tmp_path / "toy" / "vae.safetensors")
    assert "toy/vae" in lvat.available_transformers()
    assert isinstance(lvat.load_transformer("toy/vae"), VAE)
    with pytest.raises(LvatError, match=r"toy/glow is neither a file nor a shipped name.*toy/vae"):
        lvat.load_transformer("toy/glow")


def test_a_corrupt_or_foreign_safetensors_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(LvatError, match="not a readable lvat .safetensors file") as err:
        lvat.load_transformer(bad)
    assert "\n" not in str(err.value)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))  # no kind metadata
    with pytest.raises(LvatError, match="not a transformer checkpoint"):
        lvat.load_transformer(tmp_path / "plain.safetensors")


def test_method_transformer_takes_a_name(toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LVAT_WEIGHTS", str(tmp_path / "weights"))
    (tmp_path / "weights" / "toy").mkdir(parents=True)
    lvat.export_transformer(_tiny("vae"), tmp_path / "weights" / "toy" / "vae.safetensors")
    flags = {"method.name": "lvat", "method.transformer": "toy/vae", "method.eps": 1.0}
    res = train(load_config(Config, None, tiny_run_flags(toy_data, tmp_path / "run", **flags)))
    assert res["method"] == "lvat" and 0 <= res["test_error"] <= 100


def test_the_report_reads_the_kind_of_a_named_or_safetensors_transformer(tmp_path, monkeypatch):
    from lvat.analysis.runs import transformer_kind

    monkeypatch.setenv("LVAT_WEIGHTS", str(tmp_path))
    (tmp_path / "toy").mkdir()
    lvat.export_transformer(_tiny("glow"), tmp_path / "toy" / "glow.safetensors")
    assert transformer_kind("toy/glow", tmp_path / "run") == "glow"
    assert transformer_kind(str(tmp_path / "toy" / "glow.safetensors"), tmp_path) == "glow"
    assert transformer_kind("toy/nothing", tmp_path) == ""
