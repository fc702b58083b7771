"""`lvat diagnose`: the direction diagnostic writes its report and its references are sound."""

from __future__ import annotations

import json

import pytest
import torch
from _reg_helpers import TupleTransformer, mlp
from conftest import tiny_run_flags
from torch import nn

from lvat.analysis.directions import direction_quality
from lvat.cli import main
from lvat.config import Config, load_config
from lvat.regularizers import LVAT, VAT
from lvat.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_float64_run_agrees_with_its_own_float64_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.rand(5, 6, dtype=torch.float64)
    cos = direction_quality(model, VAT(1.0), x)
    assert set(cos) == {"float64", "top_eigenvector", "finite_vs_exact"}
    # The run's computation is already float64: the reference is the same computation.
    torch.testing.assert_close(cos["float64"], torch.ones(5, dtype=torch.float64))
    # A smooth model: the float64 finite difference at 1e-6 is the exact product up to O(xi).
    assert (cos["finite_vs_exact"] > 0.9999).all()
    assert ((cos["top_eigenvector"] >= 0) & (cos["top_eigenvector"] <= 1 + 1e-12)).all()


def test_exact_mode_with_many_iterations_is_the_top_eigenvector():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.rand(5, 6, dtype=torch.float64)
    reg = VAT(1.0, power_method="exact", power_iterations=30)
    cos = direction_quality(model, reg, x, reference_iterations=30)
    torch.testing.assert_close(cos["top_eigenvector"], torch.ones(5, dtype=torch.float64))


def test_lvat_reports_the_first_order_term_and_restores_the_model_mode():
    torch.manual_seed(0)
    model, t = mlp(p=0.5), TupleTransformer()
    model.eval()
    cos = direction_quality(model, LVAT(t, 1.0), torch.rand(6, 6))
    assert set(cos) == {"float64", "top_eigenvector", "finite_vs_exact", "first_order"}
    assert not model.training  # restored
    # The toy transformer reconstructs badly: the authors' finite difference at 1e-6 returns
    # (almost) the first-order gradient, whatever d (0.999 in float64, test_exact.py; the run
    # here is float32, whose rounding noise at xi = 1e-6 costs a few hundredths).
    assert (cos["first_order"] > 0.9).all()


@pytest.mark.parametrize("method", ["vat", "lvat"])
def test_diagnose_writes_json_and_figures_for_a_tiny_run(
    method, toy_data, transformers, tmp_path, capsys
):
    kw = {"method.name": method}
    if method == "lvat":
        kw["method.transformer"] = transformers["vae"]
    run = tmp_path / method
    train(load_config(Config, None, tiny_run_flags(toy_data, run, **kw)))
    assert main(["diagnose", str(run), "--images", "20", "--reference-iterations", "5"]) == 0
    printed = capsys.readouterr().out
    assert "median" in printed and "directions.json" in printed
    info = json.loads((run / "diagnostics" / "directions.json").read_text())
    assert info["count"] == 20 and info["power_method"] == "finite-difference"
    for key, values in info["cosines"].items():
        assert len(values) == 20 and all(-1.0001 <= v <= 1.0001 for v in values), key
        assert info["summary"][key]["count"] == 20
    assert ("first_order" in info["cosines"]) == (method == "lvat")
    for name in ("directions.png", "directions.pdf"):
        assert (run / "diagnostics" / name).stat().st_size > 1000


def test_diagnose_refuses_a_supervised_run(toy_data, tmp_path, capsys):
    run = tmp_path / "sup"
    train(load_config(Config, None, tiny_run_flags(toy_data, run, **{"method.name": "sup"})))
    assert main(["diagnose", str(run)]) == 2
    assert "no perturbation to diagnose" in capsys.readouterr().err


def test_diagnose_judges_another_xi_power_method_and_precision_on_the_same_run(
    toy_data, tmp_path, capsys
):
    run = tmp_path / "vat"
    train(load_config(Config, None, tiny_run_flags(toy_data, run)))
    out = tmp_path / "exact-bf16"
    args = ["diagnose", str(run), "--images", "16", "--reference-iterations", "3",
            "--power-method", "exact", "--amp", "bf16", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "(exact, xi=1e-06, bf16)" in capsys.readouterr().out
    info = json.loads((out / "directions.json").read_text())
    assert (info["power_method"], info["amp"], info["count"]) == ("exact", "bf16", 16)
    assert not (run / "diagnostics").exists()
    assert main(["diagnose", str(run), "--images", "16", "--xi", "0.001", "--out", str(out)]) == 0
    assert json.loads((out / "directions.json").read_text())["xi"] == 0.001


def test_the_float64_reference_of_a_float32_run_draws_the_same_d():
    # Far above float32 rounding (xi = 1e-2) a float32 run's direction is the float64 one: this
    # holds only if both computations start from the same random d (drawn in float32 for both).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    cos = direction_quality(model, VAT(1.0, xi=1e-2), torch.rand(5, 6))
    assert (cos["float64"] > 0.999).all()


def test_diagnose_judges_lvat_on_any_runs_classifier(toy_data, transformers, tmp_path, capsys):
    run = tmp_path / "sup"
    train(load_config(Config, None, tiny_run_flags(toy_data, run, **{"method.name": "sup"})))
    out = tmp_path / "as-lvat"
    args = ["diagnose", str(run), "--images", "8", "--reference-iterations", "2",
            "--transformer", str(transformers["vae"]), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    info = json.loads((out / "directions.json").read_text())
    assert info["method"] == "lvat-vae" and "first_order" in info["cosines"]
