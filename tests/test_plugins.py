"""Plugins: a method and a transformer kind registered from outside the package.

The toy method ("noise": consistency under random input noise of norm eps) and the toy kind
("toy": a linear autoencoder) below are defined here, registered by a fixture that undoes the
registration, and run through `lvat train`, `lvat fit` (a sweep's [[fit]]), `lvat sweep`,
`lvat report` and `lvat figures` like the built-ins.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import read_jsonl, tiny_run_flags
from torch import nn

from lvat.cli import main
from lvat.config import DataConfig, FitTrainConfig
from lvat.errors import ConfigError
from lvat.experiments import plan
from lvat.fit import fit_config
from lvat.models import KINDS, TransformerKind, load_transformer, register_kind, unregister_kind
from lvat.regularizers import (
    METHODS,
    Method,
    Regularizer,
    kl_divergence,
    register_method,
    unregister_method,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the toy method
class NoiseConsistency:
    """KL(p(x) || p(x + r)), r random of norm eps per image: a `Regularizer` in a few lines."""

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def loss_and_stats(self, model: nn.Module, x: torch.Tensor, **cached):
        with torch.no_grad():
            target = model(x)
        r = torch.randn_like(x)
        r = self.eps * r / r.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        kl = kl_divergence(target, model(x + r))
        return kl, {"kl": kl.detach()}  # an open dict: entropy, adv_l2, ... count as 0


NOISE = Method("noise", "Noise", build=lambda cfg, transformer: NoiseConsistency(cfg.eps))


# ------------------------------------------------------------------ the toy transformer kind
class ToyAutoencoder(nn.Module):
    """A linear autoencoder with a sigmoid decoder: `encode`, `decode` and `hparams` suffice."""

    def __init__(self, shape: list[int], latent_dim: int = 4) -> None:
        super().__init__()
        self.hparams = {"shape": list(shape), "latent_dim": latent_dim}
        self.shape, self.latent_dim = tuple(shape), latent_dim
        self.enc = nn.Linear(math.prod(shape), latent_dim)
        self.dec = nn.Linear(latent_dim, math.prod(shape))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(z)).view(-1, *self.shape)


@dataclass
class ToyModelConfig:
    """The toy autoencoder."""

    latent_dim: int = 4
    """Latent dimension."""


@dataclass
class ToyFitConfig:
    """`lvat fit toy`: the sections and keys every fit config has, and its own `model`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: FitTrainConfig = field(default_factory=FitTrainConfig)
    seed: int = 0
    device: str = "auto"
    out: str = ""

    RESUME_FIXED: ClassVar[tuple[str, ...]] = ("data.name", "model.*", "seed")


class ToyKind(TransformerKind):
    name, display, model, config = "toy", "Toy", ToyAutoencoder, ToyFitConfig
    help = "a toy linear autoencoder (test plugin)"
    terms = ("loss", "mse")

    def build(self, cfg: ToyFitConfig, shape):
        return ToyAutoencoder(list(shape), cfg.model.latent_dim)

    def loss(self, model, x, cfg):
        mse = (model.decode(model.encode(x)) - x).square().mean()
        return {"loss": mse, "mse": mse}

    def sample(self, model, n, cfg, generator):
        z = torch.randn(n, model.latent_dim, device=generator.device, generator=generator)
        return model.decode(z)


@pytest.fixture
def plugins():
    """The toy method and kind registered for one test, and unregistered after it."""
    method, kind = register_method(NOISE), register_kind(ToyKind())
    try:
        yield method, kind
    finally:
        unregister_method(method.name)
        unregister_kind(kind.name)


# ------------------------------------------------------------------ tests
def test_registration_adds_and_the_fixture_removes(plugins):
    assert METHODS.names() == ["sup", "vat", "lvat", "noise"]
    assert KINDS.names() == ["vae", "glow", "toy"]
    assert isinstance(NoiseConsistency(1.0), Regularizer)
    with pytest.raises(ValueError, match="already registered"):
        register_method(NOISE)


def test_unknown_names_are_refused_with_the_registered_ones(toy_data, tmp_path, capsys):
    assert "noise" not in METHODS and "toy" not in KINDS  # no test leaves its plugins behind
    flags = tiny_run_flags(toy_data, tmp_path / "run", **{"method.name": "noise"})
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err
    assert "method.name: 'noise' is not allowed; choose one of ['sup', 'vat', 'lvat']" in err
    with pytest.raises(ConfigError, match="unknown transformer kind 'toy'; registered: vae, glow"):
        fit_config("toy")
    (tmp_path / "s.toml").write_text('[[fit]]\nkind = "toy"\nconfig = "f.toml"\n')
    with pytest.raises(ConfigError, match='needs kind = "vae" \\| "glow"'):
        plan(tmp_path / "s.toml")


def test_lvat_train_runs_a_registered_method(plugins, toy_data, tmp_path, capsys):
    out = tmp_path / "noise"
    flags = tiny_run_flags(toy_data, out, **{"method.name": "noise", "method.eps": 0.5})
    assert main(["train", *flags]) == 0
    assert capsys.readouterr().out.startswith("noise on toy: test error")
    assert json.loads((out / "results.json").read_text())["method"] == "noise"
    rows = read_jsonl(out / "metrics.jsonl")
    assert all(r["kl"] > 0 and r["adv_l2"] == 0 and r["zero_direction"] == 0 for r in rows)
    # Resume of a finished run is a no-op; the config keeps the plugin's name.
    assert main(["train", "--resume", str(out)]) == 0
    assert 'name = "noise"' in (out / "config.toml").read_text()


def _sweep_files(root: Path, data: Path) -> None:
    (root / "toy-fit.toml").write_text(
        f'device = "cpu"\nout = "fits/toy"\n[data]\nname = "{data}"\n[model]\nlatent_dim = 4\n'
        "[train]\nsteps = 4\nbatch_size = 16\nlr = 0.01\neval_every = 4\nlog_every = 2\n"
        "checkpoint_every = 4\ngrid_images = 4\nprogress = false\n"
    )
    (root / "cfg").mkdir()
    common = (
        f'device = "cpu"\n[data]\nname = "{data}"\nnum_labeled = 20\n[model]\nname = "conv-small"\n'
        "[train]\nsteps = 4\nbatch_labeled = 8\nbatch_unlabeled = 16\ndecay_steps = 2\n"
        "log_every = 2\neval_every = 2\ncheckpoint_every = 2\nprogress = false\n"
    )
    methods = {
        "noise": 'name = "noise"\neps = 0.5\n',
        "lvat-toy": 'name = "lvat"\neps = 1.0\ntransformer = "fits/toy/checkpoint.pt"\n',
    }
    for stem, method in methods.items():
        (root / "cfg" / f"{stem}.toml").write_text(f"{common}[method]\n{method}")
    (root / "sweep.toml").write_text(
        'out = "runs"\n[[fit]]\nkind = "toy"\nconfig = "toy-fit.toml"\n'
        '[[runs]]\nconfigs = ["cfg/*.toml"]\nseeds = [0, 1]\n'
    )


def test_sweep_fits_the_kind_trains_both_and_report_and_figures_name_them(
    plugins, toy_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _sweep_files(tmp_path, toy_data)
    with pytest.raises(SystemExit) as help_exit:  # the kind's own fit config in --help
        main(["fit", "toy", "--help"])
    assert help_exit.value.code == 0
    assert "--model.latent_dim int (default 4)" in capsys.readouterr().out

    jobs = plan("sweep.toml")
    assert [j.kind for j in jobs] == ["fit:toy"] + ["train"] * 4
    assert {p for j in jobs for p in j.needs} == {Path("fits/toy/checkpoint.pt")}
    assert main(["sweep", "sweep.toml"]) == 0
    out = capsys.readouterr().out
    assert out.count("[done]") == 5 and "[failed]" not in out
    assert all(j.status == "done" for j in plan("sweep.toml"))
    fitted = json.loads((tmp_path / "fits/toy/results.json").read_text())
    assert fitted["kind"] == "toy" and {"test_loss", "test_mse", "test_recon_mse"} <= set(fitted)
    assert (tmp_path / "fits/toy/samples.png").is_file()
    assert isinstance(load_transformer("fits/toy/checkpoint.pt"), ToyAutoencoder)

    assert main(["report", "runs", "--out", "report"]) == 0
    capsys.readouterr()
    with open("report.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"LVAT-Toy", "Noise"}  # display names from both registries
    assert all(int(r["n"]) == 2 for r in rows.values())
    md = Path("report.md").read_text()
    assert md.index("| LVAT-Toy |") < md.index("| Noise |")  # registration order

    info = _figures("runs/cfg/lvat-toy/seed0")
    assert info["method"] == "lvat-toy" and info["transformer"] == "fits/toy/checkpoint.pt"
    assert main(["figures", "runs/cfg/noise/seed0"]) == 2
    assert "figures need a VAT or LVAT run" in capsys.readouterr().err


def _figures(run: str) -> dict:
    from lvat.analysis.figures import make_figures

    return make_figures(run, samples=20, batch_size=10)
