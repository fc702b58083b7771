"""`lvat export` writes safetensors + model card; `train.init` continues a fit from weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lvat
from lvat.cli import main
from lvat.config import DataConfig, GlowFitConfig, VAEFitConfig, load_config, to_flags
from lvat.data import load_from_config, to_float
from lvat.errors import LvatError
from lvat.fit import fit
from lvat.fit.export import CHECK_IMAGES, nonfinite_count, read_card, reconstruction_check
from lvat.train import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"vae": VAEFitConfig, "glow": GlowFitConfig}
TINY = {
    "vae": {"model.latent_dim": 8},
    "glow": {"model.n_levels": 2, "model.n_steps": 2, "model.width": 8, "train.init_images": 64},
}


def _cfg(kind: str, data: Path, out: Path, **kw):
    flags = {
        "data.name": str(data),
        "train.steps": 3,
        "train.batch_size": 16,
        "train.log_every": 3,
        "train.eval_every": 3,
        "train.checkpoint_every": 3,
        "train.grid_images": 4,
        "train.progress": "false",
        "device": "cpu",
        "out": str(out),
        **TINY[kind],
        **kw,
    }
    return load_config(CLASSES[kind], None, to_flags(flags))


@pytest.fixture(scope="module", params=["vae", "glow"])
def exported(request, toy_data, tmp_path_factory):
    kind, folder = request.param, tmp_path_factory.mktemp(request.param)
    fit(_cfg(kind, toy_data, folder / "run"))
    weights = folder / "weights" / "toy" / f"{kind}.safetensors"
    args = ["export", str(folder / "run"), "--out", str(weights), "--name", f"toy/{kind}"]
    assert main([*args, "--command", f"lvat fit {kind} --config tiny.toml"]) == 0
    return kind, folder, weights


def test_export_writes_the_checkpoints_weights_and_a_card_that_describes_them(exported, toy_data):
    kind, folder, weights = exported
    ckpt = checkpoint.load(folder / "run" / "checkpoint.pt")
    tensors = load_file(weights)
    assert tensors.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(tensors[k], ckpt["state_dict"][k]) for k in tensors)
    card = read_card(weights)
    results = json.loads((folder / "run" / "results.json").read_text())
    assert (card["name"], card["kind"], card["dataset"]) == (f"toy/{kind}", kind, "toy")
    assert card["hparams"] == ckpt["hparams"] == results["model"]
    assert card["data_fingerprint"] == results["data_fingerprint"] and card["data_fingerprint"]
    assert card["steps_total"] == 3 and len(card["history"]) == 1
    (segment,) = card["history"]
    assert segment["command"] == f"lvat fit {kind} --config tiny.toml"
    assert (segment["steps"], segment["batch_size"]) == (3, 16)
    assert segment["hardware"] and segment["versions"]["torch"] == torch.__version__
    assert card["test"] == {k: v for k, v in results.items() if k.startswith("test_")}
    # The check is decode(encode(x)) of the first 64 test images, recomputed from the file.
    x = load_from_config(DataConfig(name=str(toy_data))).x_test[:CHECK_IMAGES]
    model = lvat.load_transformer(weights)
    assert card["check"]["images"] == CHECK_IMAGES
    assert reconstruction_check(model, x) == pytest.approx(card["check"]["recon_mse"], rel=1e-6)
    data = load_from_config(DataConfig(name=str(toy_data)))
    assert card["nonfinite"]["images"] == {"train": len(data.x_train), "test": len(data.x_test)}
    assert card["nonfinite"]["train"] == card["nonfinite"]["test"] == 0


def test_nonfinite_count_finds_the_images_a_transformer_cannot_encode(exported, toy_data):
    kind, _, weights = exported
    model = lvat.load_transformer(weights)
    x = load_from_config(DataConfig(name=str(toy_data))).x_test[:10]
    assert nonfinite_count(model, x, batch_size=4) == 0
    encode = model.encode

    sums = to_float(x).flatten(1).sum(1)
    assert len(set(sums.tolist())) == 10  # an image's pixel sum tells which one a batch holds
    bad = torch.stack([sums[2], sums[7]])

    def overflowing(images, *args, **kwargs):  # images 2 and 7 overflow, as a bad flow's do
        latent = encode(images, *args, **kwargs)
        first = latent[0] if isinstance(latent, tuple) else latent
        first[torch.isin(images.flatten(1).sum(1), bad)] = float("inf")
        return latent

    model.encode = overflowing
    assert nonfinite_count(model, x, batch_size=4) == 2


def test_exported_weights_load_by_name_from_lvat_weights(exported, monkeypatch):
    kind, _, weights = exported
    monkeypatch.setenv("LVAT_WEIGHTS", str(weights.parent.parent))
    assert f"toy/{kind}" in lvat.available_transformers()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("safetensors weights must load without torch.load")

    monkeypatch.setattr(torch, "load", no_unpickling)
    model = lvat.load_transformer(f"toy/{kind}")
    assert dict(model.hparams) == read_card(weights)["hparams"]


def test_a_fit_continues_from_exported_weights_and_keeps_their_history(exported, toy_data):
    kind, folder, weights = exported
    # lr 1e-12: Adam moves each weight by ~1e-12, so the trained weights are the initial ones
    more = _cfg(kind, toy_data, folder / "more", **{"train.init": str(weights), "train.lr": 1e-12})
    results = fit(more)
    assert results["init"]["source"] == str(weights)
    assert [s["steps"] for s in results["init"]["history"]] == [3]
    start = load_file(weights)
    after = checkpoint.load(folder / "more" / "checkpoint.pt")["state_dict"]
    for name, _ in lvat.load_transformer(weights).named_parameters():
        torch.testing.assert_close(after[name], start[name], rtol=0, atol=1e-9)
    out = folder / "more.safetensors"
    assert main(["export", str(folder / "more"), "--out", str(out)]) == 0
    card = read_card(out)
    assert card["steps_total"] == 6 and len(card["history"]) == 2
    assert (
        card["history"][1]["command"] == f"lvat fit {kind} --config {folder / 'more'}/config.toml"
    )


def test_init_refuses_another_kind_or_architecture(exported, toy_data, tmp_path, capsys):
    kind, _, weights = exported
    other = "glow" if kind == "vae" else "vae"
    with pytest.raises(LvatError, match=f"holds a {kind}; this is a {other} fit"):
        fit(_cfg(other, toy_data, tmp_path / "a", **{"train.init": str(weights)}))
    bigger = {"vae": {"model.latent_dim": 9}, "glow": {"model.width": 9}}[kind]
    with pytest.raises(LvatError, match="set the same model.. keys"):
        fit(_cfg(kind, toy_data, tmp_path / "b", **{"train.init": str(weights), **bigger}))
    with pytest.raises(LvatError, match="--train.init nowhere/none: transformer not found"):
        fit(_cfg(kind, toy_data, tmp_path / "c", **{"train.init": "nowhere/none"}))


def test_export_refuses_an_unfinished_run_and_a_wrong_suffix(toy_data, tmp_path, capsys):
    fit(_cfg("vae", toy_data, tmp_path / "run", **{"train.steps": 6}), stop_at=3)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not a finished `lvat fit` run" in err and "--train.steps N" in err
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "w.pt")]) == 2
    assert "end in .safetensors" in capsys.readouterr().err
