"""`lvat figures`: Figs. 2-4, curves and Dec(Enc(x)) accuracy of tiny finished VAT/LVAT runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import lvat.analysis.figures as figures
from lvat.cli import main
from lvat.config import Config, load_config, to_flags
from lvat.train import train

SAMPLES = 37  # not a multiple of the batch size (16): the last batch must count too
TEST_SIZE = 50

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(toy_data, transformers, tmp_path_factory) -> dict[str, Path]:
    """Finished 6-step runs: LVAT-VAE, LVAT-Glow, VAT (eps 3.0) and sup."""
    root = tmp_path_factory.mktemp("runs")
    methods = {
        "lvat-vae": {"method.name": "lvat", "method.transformer": transformers["vae"]},
        "lvat-glow": {"method.name": "lvat", "method.transformer": transformers["glow"]},
        # xi = 1e-3: every VAT r must have norm eps (checked below); at the authors' 1e-6 a
        # float32 probe can round away for a sample on some CPUs, leaving its g and r exactly 0.
        "vat": {"method.name": "vat", "method.eps": 3.0, "method.xi": 1e-3},
        "sup": {"method.name": "sup"},
    }
    for name, kw in methods.items():
        flags = {
            "data.name": toy_data,
            "data.num_labeled": 20,
            "model.name": "conv-small",
            "train.steps": 6,
            "train.batch_labeled": 8,
            "train.batch_unlabeled": 16,
            "train.decay_steps": 3,
            "train.log_every": 2,
            "train.eval_every": 3,
            "train.progress": "false",
            "method.eps": 1.0,
            "device": "cpu",
            "out": root / name,
            **kw,
        }
        train(load_config(Config, None, to_flags(flags)))
    return {name: root / name for name in methods}


def _check_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()  # a truncated or corrupt file raises here
    with Image.open(path) as im:
        im.load()
        return im.size


def _check_pdf(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF"), path  # whole file


def _check_files(info: dict, names: set[str]) -> None:
    """Every figure as a PNG ("files") and, beside it with the same stem, a PDF ("vector_files")."""
    assert set(info["files"]) == set(info["vector_files"]) == names
    for name, png in info["files"].items():
        _check_png(Path(png))
        assert Path(info["vector_files"][name]) == Path(png).with_suffix(".pdf")
        _check_pdf(Path(info["vector_files"][name]))


def _check_histogram(h: dict, n: int) -> None:
    assert h["count"] == n
    assert sum(h["counts"]) == n  # every sample is in a bin, none twice
    assert len(h["edges"]) == len(h["counts"]) + 1
    assert h["min"] <= h["mean"] <= h["max"] and h["std"] >= 0


@pytest.mark.parametrize("method", ["lvat-vae", "lvat-glow"])
def test_lvat_figures_are_written_with_the_requested_sample_count(method, runs, capsys):
    run = runs[method]
    assert main(["figures", str(run), "--samples", str(SAMPLES)]) == 0
    printed = capsys.readouterr().out
    out = run / "figures"
    info = json.loads((out / "figures.json").read_text())
    _check_files(info, {"fig2", "fig3", "fig4", "curves"})
    for name, path in info["files"].items():
        assert path in printed and info["vector_files"][name] in printed
    assert info["method"] == method and info["count"] == SAMPLES
    _check_histogram(info["histograms"]["adv_l2"], SAMPLES)
    _check_histogram(info["histograms"]["recon_l2"], SAMPLES)
    acc = info["accuracy"]
    assert {"x", "recon", "adv"} <= set(acc) and acc["count"] == SAMPLES
    for key in ("x", "recon", "adv"):
        assert 0 <= acc[key] <= 100
        assert acc[key] * SAMPLES / 100 == pytest.approx(round(acc[key] * SAMPLES / 100))
    assert f"Dec(Enc(x)) {acc['recon']:.2f}%" in printed
    assert info["eps_vat"] == {"value": 2.5, "source": "default (paper: SVHN)"}
    w, h = _check_png(out / "fig3_examples.png")
    assert h > 3 * 64 and w > 10 * 64  # 3 rows (original / Dec(Enc(x)) / adversarial) of 10


@pytest.mark.numerics
def test_vat_figures_mark_the_runs_eps_and_its_perturbations_have_norm_eps(runs, capsys):
    run = runs["vat"]
    assert main(["figures", str(run), "--samples", "5000", "--eps-vat", "7"]) == 0
    info = json.loads((run / "figures" / "figures.json").read_text())
    _check_files(info, {"fig2", "fig3", "curves"})  # no transformer: no Fig. 4
    assert info["count"] == TEST_SIZE and info["samples"] == 5000  # capped at the test set
    adv = info["histograms"]["adv_l2"]
    _check_histogram(adv, TEST_SIZE)
    assert adv["min"] == pytest.approx(3.0, rel=1e-4) and adv["max"] == pytest.approx(3.0, rel=1e-4)
    assert info["eps_vat"] == {"value": 3.0, "source": "run config"}  # the run's eps wins
    assert "recon" not in info["accuracy"] and "x" in info["accuracy"]
    w, h = _check_png(run / "figures" / "fig3_examples.png")
    assert 2 * 64 < h < 3 * 64  # two rows: original / x + r_vat


def test_a_vat_run_with_a_transformer_gets_reconstruction_accuracy(runs, transformers, capsys):
    args = ["figures", str(runs["vat"]), "--samples", "20", "--transformer"]
    assert main([*args, str(transformers["glow"]), "--seed", "3"]) == 0
    info = json.loads((runs["vat"] / "figures" / "figures.json").read_text())
    assert "fig4" in info["files"] and 0 <= info["accuracy"]["recon"] <= 100
    _check_pdf(Path(info["vector_files"]["fig4"]))
    _check_histogram(info["histograms"]["recon_l2"], 20)


def test_same_seed_same_numbers_other_seed_other_images(runs):
    a = figures.make_figures(runs["lvat-glow"], samples=30, seed=1, eps_vat=3.5)
    b = figures.make_figures(runs["lvat-glow"], samples=30, seed=1, eps_vat=3.5)
    c = figures.make_figures(runs["lvat-glow"], samples=30, seed=2)
    assert a["histograms"] == b["histograms"] and a["accuracy"] == b["accuracy"]
    assert a["histograms"]["recon_l2"] != c["histograms"]["recon_l2"]
    assert a["eps_vat"] == {"value": 3.5, "source": "--eps-vat"}


def test_perturbations_in_train_mode_accuracy_in_eval_mode(runs, monkeypatch):
    calls: list[tuple[bool, bool]] = []  # (inside the perturbation, model.training) per forward
    inside = [False]
    real_load, real_reg = figures.load_run, figures.build_regularizer

    def load_run(*args, **kwargs):
        run = real_load(*args, **kwargs)
        run.model.register_forward_pre_hook(lambda m, _: calls.append((inside[0], m.training)))
        return run

    def build_regularizer(cfg, device):
        reg = real_reg(cfg, device)
        inner = reg.adversarial_examples

        def adversarial_examples(model, x):
            inside[0] = True
            try:
                return inner(model, x)
            finally:
                inside[0] = False

        reg.adversarial_examples = adversarial_examples
        return reg

    monkeypatch.setattr(figures, "load_run", load_run)
    monkeypatch.setattr(figures, "build_regularizer", build_regularizer)
    figures.make_figures(runs["lvat-vae"], samples=40, batch_size=16)
    perturb = [training for inner, training in calls if inner]
    classify = [training for inner, training in calls if not inner]
    assert perturb and all(perturb)  # BN batch statistics and dropout, as in training
    assert len(classify) == 3 * 3 and not any(classify)  # x, Dec(Enc(x)), x_adv per batch of ~16


def test_a_sup_run_or_too_few_samples_is_refused(runs, capsys):
    assert main(["figures", str(runs["sup"])]) == 2
    assert "figures need a VAT or LVAT run" in capsys.readouterr().err
    assert main(["figures", str(runs["vat"]), "--samples", "1"]) == 2


def test_an_lvat_fit_folder_gets_its_training_and_test_curves(tmp_path, capsys):
    # a VAE fit still training: a cut last line in each log, the -ELBO summed from its terms
    run = tmp_path / "fit"
    run.mkdir()
    (run / "config.toml").write_text("seed = 0\n[model]\nlatent_dim = 8\n[train]\nsteps = 30\n")
    (run / "metrics.jsonl").write_text(
        '{"step": 10, "loss": 5.0, "bce": 4.0, "kl": 10.0}\n'
        '{"step": 20, "loss": 3.0, "bce": 2.5, "kl": 5.0}\n{"step": 3'
    )
    (run / "eval.jsonl").write_text(
        '{"step": 20, "test_neg_elbo": 8.0, "test_bce": 3.0, "test_kl": 5.0}\n{"st'
    )
    assert figures.is_fit_run(run)
    assert main(["figures", str(run)]) == 0
    assert "'neg_elbo': 8.0" in capsys.readouterr().out
    info = figures.fit_curves(run)
    train = {name: (steps, values) for name, steps, values in info["train"]}
    assert train["neg_elbo"] == ([10, 20], [14.0, 7.5]) and set(train) == {"neg_elbo", "bce", "kl"}
    assert [name for name, _, _ in info["test"]] == ["neg_elbo", "bce", "kl"]
    assert Image.open(run / "figures" / "curves.png").size[0] > 0
    (run / "eval.jsonl").unlink()
    (run / "metrics.jsonl").unlink()
    with pytest.raises(figures.LvatError, match="not an `lvat fit` run folder"):
        figures.fit_curves(run)


def test_interval_figures_widen_until_long_labels_and_the_axis_label_fit(tmp_path):
    draw_intervals = figures.draw_intervals
    xlabel = "test error difference, points (A − B per seed; 95% interval)"
    long = "VAT eps=0.125 4800 updates − VAT eps=0.125 2400 updates\nF-MNIST SSL (1000 labels)"
    fig = draw_intervals([(long, [-0.4, 0.2], -0.1, (-0.7, 0.25))] * 3, tmp_path / "a.png", xlabel)
    box = fig.get_tightbbox()
    assert fig.get_figwidth() > 8.0  # an 8 in figure cut the axis label off at the right
    assert box.x0 >= -0.02 and box.x1 <= fig.get_figwidth() + 0.02
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "a.pdf").stat().st_size > 0
    short = draw_intervals([("a − b", [1.0, 2.0], 1.5, (0.5, 2.5))], tmp_path / "b.png", "x")
    assert short.get_figwidth() == 8.0
