"""`lvat report`: Table 3 cells hold mean ± sample std over seeds, n, and the paper's value."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_flags as _flags

from lvat.analysis.paper import TABLE3, Cell, paper_error
from lvat.cli import main
from lvat.config import Config, load_config
from lvat.errors import LvatError
from lvat.train import train

# The paper's Table 3 (docs/method.md §7.1), verbatim: the paper module must hold exactly these.
PAPER_TABLE3 = """
| VAT (paper's runs) | 5.77 | 2.34 | 5.42 | 2.22 | 16.92 | 8.175 | 11.36 | 5.81 |
| LVAT-VAE | 4.44 | 2.26 | 4.20 | 2.02 | 13.90 | 8.05 | 14.64 | 6.54 |
| LVAT-Glow | 4.20 | 2.23 | 3.83 | 2.13 | 9.94 | 5.24 | 7.34 | 3.94 |
"""
PAPER_COLUMNS = [
    (d, aug, s) for d in ("svhn", "cifar10") for aug in (False, True) for s in ("SSL", "SL")
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(toy_data, transformers, tmp_path_factory) -> Path:
    """Real tiny runs: sup and LVAT-VAE x seeds 0, 1, plus one LVAT-VAE run stopped half-way."""
    root = tmp_path_factory.mktemp("runs")
    lvat = {"method.name": "lvat", "method.transformer": transformers["vae"], "method.eps": 1.0}
    for seed in (0, 1):
        train(load_config(Config, None, _flags(toy_data, root / f"sup/s{seed}", seed=seed,
                                               **{"method.name": "sup"})))  # fmt: skip
        train(
            load_config(Config, None, _flags(toy_data, root / f"lvat/s{seed}", seed=seed, **lvat))
        )
    train(load_config(Config, None, _flags(toy_data, root / "lvat/s2", seed=2, **lvat)), stop_at=3)
    return root


def _csv_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _errors(runs: list[Path]) -> np.ndarray:
    return np.array([json.loads((r / "results.json").read_text())["test_error"] for r in runs])


def test_paper_table_is_table3_exactly():
    rows = [line.strip("| ").split(" | ") for line in PAPER_TABLE3.strip().splitlines()]
    expected = {
        Cell(method, *col): float(v)
        for method, row in zip(("vat", "lvat-vae", "lvat-glow"), rows, strict=True)
        for col, v in zip(PAPER_COLUMNS, row[1:], strict=True)
    }
    assert expected == TABLE3
    assert paper_error(Cell("vat", "cifar10", False, "SL")) == 8.175
    assert paper_error(Cell("vat", "svhn", False, "SSL"), num_labeled=250) is None  # not 1,000


def test_real_runs_give_mean_sample_std_and_n_per_cell(trained, tmp_path, capsys):
    prefix = tmp_path / "out" / "table"
    assert main(["report", str(trained), "--out", str(prefix)]) == 0
    printed = capsys.readouterr().out
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert markdown in printed
    rows = {r["method"]: r for r in _csv_rows(tmp_path / "out" / "table.csv")}
    assert set(rows) == {"sup", "LVAT-VAE"}  # the transformer's kind read from its checkpoint
    for method, folder in (("sup", "sup"), ("LVAT-VAE", "lvat")):
        errors = _errors([trained / folder / "s0", trained / folder / "s1"])
        mean, std = errors.mean(), errors.std(ddof=1)
        row = rows[method]
        assert (row["dataset"], row["aug"], row["setting"]) == ("toy", "false", "SSL")
        assert int(row["n"]) == 2  # the unfinished seed 2 is not averaged
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-4)
        assert float(row["std"]) == pytest.approx(std, abs=1e-4)
        assert row["paper"] == ""  # the paper has no toy dataset
        assert f"| {method} | {mean:.2f} ± {std:.2f} (n=2) |" in markdown
    unfinished = markdown.split("## Running/unfinished")[1]
    assert str(trained / "lvat" / "s2") in unfinished and "step 3/6" in unfinished
    assert len([ln for ln in unfinished.splitlines() if ln.startswith("- ")]) == 1
    assert "## Missing cells" in markdown and "paper 4.44" not in markdown  # toy: none expected


def _fake_run(
    folder: Path,
    method: str,
    dataset: str,
    *,
    error: float | None,
    aug: bool = False,
    num_labeled: int = 1000,
    seed: int = 0,
    eps: float = 2.5,
    validation_error: float | None = None,
    transformer: str = "",
    model: str = "conv-large",
) -> Path:
    """A run folder as `lvat train` leaves it, without training: config, split, results."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(
        f'seed = {seed}\n[data]\nname = "{dataset}"\nnum_labeled = {num_labeled}\n'
        f"augment = {str(aug).lower()}\nnum_validation = 0\n"
        f'[model]\nname = "{model}"\n[train]\nsteps = 48000\n'
        f'[method]\nname = "{method}"\neps = {eps}\ntransformer = "{transformer}"\n'
    )
    num_train = 73257 if dataset == "svhn" else 50000
    labeled = num_train if num_labeled == -1 else num_labeled
    split = {"dataset": dataset, "num_train": num_train, "num_validation": 0,
             "num_labeled": labeled, "seed": seed}  # fmt: skip
    (folder / "split.json").write_text(json.dumps(split))
    if error is not None:
        results = {"method": method, "dataset": dataset, "num_labeled": labeled, "seed": seed,
                   "test_error": error}  # fmt: skip
        if validation_error is not None:
            results["validation_error"] = validation_error
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_svhn_and_cifar_cells_show_the_paper_value_and_list_missing_cells(
    transformers, tmp_path, capsys
):
    root = tmp_path / "runs"
    glow = str(transformers["glow"])
    vat_errors = [5.1, 5.9, 6.3]
    for s, e in enumerate(vat_errors):
        _fake_run(root / f"vat-svhn/{s}", "vat", "svhn", error=e, seed=s)
    glow_errors = [2.0, 2.45]
    for s, e in enumerate(glow_errors):
        model = ["conv-large", "conv-small"][s]
        _fake_run(root / f"glow-aug-sl/{s}", "lvat", "svhn", error=e, aug=True, num_labeled=-1,
                  seed=s, eps=1.0, transformer=glow, model=model)  # fmt: skip
    _fake_run(root / "glow-c10", "lvat", "cifar10", error=9.5, num_labeled=4000, eps=1.0,
              transformer=glow)  # fmt: skip
    _fake_run(root / "vat-250", "vat", "svhn", error=9.0, num_labeled=250)
    _fake_run(root / "lvat-unknown", "lvat", "svhn", error=4.0, eps=1.0, transformer="gone.pt")
    _fake_run(root / "vae-running", "lvat", "cifar10", error=None, num_labeled=4000, eps=1.0,
              transformer=str(transformers["vae"]))  # fmt: skip
    prefix = tmp_path / "t3"
    # A run folder named directly and again through its parent is counted once.
    assert main(["report", str(root / "vat-svhn" / "0"), str(root), "--out", str(prefix)]) == 0
    capsys.readouterr()
    md = (tmp_path / "t3.md").read_text()
    rows = {(r["method"], r["dataset"], r["aug"], r["setting"], r["num_labeled"]): r
            for r in _csv_rows(tmp_path / "t3.csv")}  # fmt: skip

    vat = rows[("VAT", "svhn", "false", "SSL", "1000")]
    e = np.array(vat_errors)
    assert int(vat["n"]) == 3
    assert float(vat["mean"]) == pytest.approx(e.mean(), abs=1e-4)
    assert float(vat["std"]) == pytest.approx(e.std(ddof=1), abs=1e-4)
    assert float(vat["paper"]) == 5.77
    assert f"{e.mean():.2f} ± {e.std(ddof=1):.2f} (n=3) [paper 5.77]" in md

    g = np.array(glow_errors)
    sl = rows[("LVAT-Glow", "svhn", "true", "SL", "73257")]
    assert (int(sl["n"]), float(sl["paper"])) == (2, 2.13)
    assert float(sl["std"]) == pytest.approx(g.std(ddof=1), abs=1e-4)
    assert sl["runs_differ_in"] == "model.name"  # flagged, not hidden
    c10 = rows[("LVAT-Glow", "cifar10", "false", "SSL", "4000")]
    assert (c10["std"], int(c10["n"]), float(c10["paper"])) == ("", 1, 9.94)
    assert "9.50 (n=1) [paper 9.94]" in md  # one seed: no ±
    other = rows[("VAT", "svhn", "false", "SSL", "250")]
    assert other["paper"] == ""  # 250 labels are not the paper's 1,000
    assert "SVHN SSL (250 labels)" in md
    assert ("LVAT", "svhn", "false", "SSL", "1000") in rows  # kind unknown: plain LVAT

    missing = md.split("## Missing cells")[1].split("## Running")[0]
    lines = [ln for ln in missing.splitlines() if ln.startswith("- ")]
    assert len(lines) == 24 - 3  # VAT SVHN SSL, Glow SVHN aug SL and Glow C10 SSL are filled
    assert "- LVAT-VAE, SVHN SSL [paper 4.44]" in lines
    assert "- VAT, C10 aug SL [paper 5.81]" in lines
    assert "- LVAT-VAE, C10 SSL [paper 13.9]; 1 running" in lines
    assert not any(ln.startswith("- VAT, SVHN SSL [") for ln in lines)
    running = md.split("## Running/unfinished")[1]
    assert "vae-running" in running and "LVAT-VAE" in running


def test_an_eps_sweep_gets_one_row_per_eps(tmp_path, capsys):
    for eps, errors in ((2.5, [6.0, 7.0]), (8.0, [9.0, 9.5])):
        for s, e in enumerate(errors):
            _fake_run(tmp_path / f"runs/eps{eps}/{s}", "vat", "cifar10", error=e, eps=eps,
                      num_labeled=4000, seed=s)  # fmt: skip
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r")]) == 0
    rows = {r["method"]: r for r in _csv_rows(tmp_path / "r.csv")}
    assert set(rows) == {"VAT eps=2.5", "VAT eps=8"}
    assert float(rows["VAT eps=8"]["mean"]) == pytest.approx(9.25)
    assert "| VAT eps=2.5 | 6.50 ± 0.71 (n=2) [paper 16.92] |" in capsys.readouterr().out


def test_validation_metric_averages_validation_error_without_paper_values(tmp_path, capsys):
    for eps, pairs in ((2.5, [(6.0, 5.0), (7.0, 8.0)]), (8.0, [(9.0, 4.0), (9.5, 4.5)])):
        for s, (test, val) in enumerate(pairs):
            _fake_run(tmp_path / f"runs/eps{eps}/{s}", "vat", "cifar10", error=test, eps=eps,
                      num_labeled=4000, seed=s, validation_error=val)  # fmt: skip
    argv = ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "v"), "--metric"]
    assert main([*argv, "validation"]) == 0
    out = capsys.readouterr().out
    assert "Validation error" in out and "paper" not in out.split("## Missing")[0]
    rows = {r["method"]: r for r in _csv_rows(tmp_path / "v.csv")}
    assert float(rows["VAT eps=2.5"]["mean"]) == pytest.approx(6.5)
    assert float(rows["VAT eps=8"]["mean"]) == pytest.approx(4.25)  # test says 9.25
    assert rows["VAT eps=8"]["paper"] == ""
    with pytest.raises(SystemExit):  # argparse: an unknown metric is a usage error
        main([*argv, "train"])


def test_a_folder_without_runs_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no run folders" in capsys.readouterr().err


def test_find_runs_skips_the_abandoned_attempts_kept_inside_a_run(tmp_path):
    from lvat.analysis.runs import find_runs

    run = tmp_path / "sweep" / "vat" / "seed0"
    for folder in (run, run / "abandoned-1"):
        folder.mkdir(parents=True)
        (folder / "config.toml").write_text("")
        (folder / "split.json").write_text("{}")
    (run / "results.json").write_text("{}")
    assert find_runs([tmp_path / "sweep"]) == [run]


def test_the_paired_interval_is_the_t_interval_computed_by_hand():
    from lvat.analysis.report import paired_interval

    # diffs 1, 2, 4: mean 7/3, sample sd sqrt(7/3) = 1.52753, se = 0.881917; t(0.975, 2) =
    # 4.302653 (tables): half-width 3.794583.
    lo, hi = paired_interval([1.0, 2.0, 4.0])
    assert lo == pytest.approx(7 / 3 - 3.794583, abs=1e-5)
    assert hi == pytest.approx(7 / 3 + 3.794583, abs=1e-5)
    assert paired_interval([1.5]) is None


def test_seeds_to_resolve_is_the_first_n_whose_interval_excludes_zero():
    from lvat.analysis.report import seeds_to_exclude_zero

    # mean 1, sd 2: t(0.975, n - 1) * 2 / sqrt(n) is 2.119905 * 2 / sqrt(17) = 1.0283 at n = 17
    # and 2.109816 * 2 / sqrt(18) = 0.9946 at n = 18 (t from tables)
    assert seeds_to_exclude_zero(1.0, 2.0) == 18
    assert seeds_to_exclude_zero(-1.0, 2.0, start=10) == 18  # the sign does not matter
    assert seeds_to_exclude_zero(1.0, 2.0, start=25) == 25  # never fewer than one has
    assert seeds_to_exclude_zero(0.01, 2.0, cap=100) is None
    assert seeds_to_exclude_zero(0.0, 2.0) is None


def _run_files(
    folder: Path, seed: int, error: float, amp: str = "off", train: dict | None = None, **method
) -> None:
    import tomli_w

    folder.mkdir(parents=True)
    config = {"seed": seed, "data": {"name": "toy.npz", "num_labeled": 20, "split_seed": seed},
              "method": {"name": "vat", "eps": 2.0, **method}, "train": train or {}}  # fmt: skip
    (folder / "config.toml").write_text(tomli_w.dumps(config))
    (folder / "split.json").write_text(json.dumps({"num_train": 100, "num_labeled": 20}))
    results = {"method": "vat", "test_error": error, "amp": amp}
    (folder / "results.json").write_text(json.dumps(results))


def test_rows_split_by_power_method_and_paired_differences_per_seed(tmp_path):
    from lvat.analysis.report import paired, summarize
    from lvat.analysis.runs import find_runs, read_run

    exact = [30.0, 28.0, 33.0]
    fd = [31.0, 30.5, 33.5]
    for s in range(3):
        _run_files(tmp_path / "exact" / f"s{s}", s, exact[s], power_method="exact", xi=1e-6)
        _run_files(tmp_path / "fd" / f"s{s}", s, fd[s], power_method="finite-difference", xi=1e-6)
    _run_files(tmp_path / "fd" / "s9", 9, 50.0, power_method="finite-difference", xi=1e-6)
    report = summarize([read_run(p) for p in find_runs([tmp_path])])
    assert set(report.rows()) == {"VAT exact", "VAT xi=1e-06"}
    (pair,) = paired(report, "VAT exact", "VAT xi=1e-06")
    assert pair.diffs == [-1.0, -2.5, -0.5] and pair.n == 3  # seed 9 has no partner
    # mean -4/3, sd 1.040833, half-width 4.302653 * 1.040833 / sqrt(3) = 2.585573: spans 0
    lo, hi = pair.interval
    assert (lo, hi) == pytest.approx((-4 / 3 - 2.585573, -4 / 3 + 2.585573), abs=1e-5)
    assert not pair.resolved and "-1.33 [-3.92, +1.25] (n=3, not resolved)" in pair.text()
    # at mean -4/3 and sd 1.040833: n = 4 gives t(0.975, 3) * sd / 2 = 3.182446 * 0.520417 =
    # 1.656 > 4/3, n = 5 gives 2.776445 * 1.040833 / sqrt(5) = 1.292 < 4/3 (tables)
    assert pair.seeds_to_resolve == 5
    with pytest.raises(LvatError, match="no row 'VAT'"):
        paired(report, "VAT", "VAT exact")


def test_joint_intervals_widen_each_pair_to_bonferroni_level(tmp_path):
    from lvat.analysis.report import paired, paired_markdown, summarize
    from lvat.analysis.runs import find_runs, read_run

    for s, (e, f) in enumerate([(30.0, 31.0), (28.0, 30.5), (33.0, 33.5)]):
        _run_files(tmp_path / "exact" / f"s{s}", s, e, power_method="exact", xi=1e-6)
        _run_files(tmp_path / "fd" / f"s{s}", s, f, power_method="finite-difference", xi=1e-6)
    report = summarize([read_run(p) for p in find_runs([tmp_path])])
    pairs = paired(report, "VAT exact", "VAT xi=1e-06") + paired(
        report, "VAT xi=1e-06", "VAT exact"
    )
    # two pairs: each at level 1 - 0.05/2, t(0.9875, 2) = 6.205347 (tables); diffs -1, -2.5,
    # -0.5 (sd 1.040833): half-width 6.205347 * 1.040833 / sqrt(3) = 3.728949 around -4/3
    text = paired_markdown(pairs)
    assert "95% jointly over all 2 (Bonferroni)" in text
    assert "| [-5.06, +2.40] (not resolved) |" in text  # -4/3 -/+ 3.728949
    assert "| [-2.40, +5.06] (not resolved) |" in text  # the reverse pair
    assert "[-3.92, +1.25] (n=3, not resolved)" in text  # the 95% interval of each stays
    one = paired_markdown(pairs[:1])  # one pair: nothing to adjust, the rest as before
    assert "jointly" not in one and "None yet" not in one and "Seeds to resolve" in one
    assert "None yet" in paired_markdown([])


def test_lvat_report_paired_prints_the_interval_and_refuses_unknown_rows(tmp_path, capsys):
    for s, (e, f) in enumerate([(30.0, 31.0), (28.0, 30.5), (33.0, 33.5)]):
        _run_files(tmp_path / "exact" / f"s{s}", s, e, power_method="exact", xi=1e-6)
        _run_files(tmp_path / "fd" / f"s{s}", s, f, power_method="finite-difference", xi=1e-6)
    out = tmp_path / "rep"
    assert (
        main(["report", str(tmp_path), "--out", str(out), "--paired", "VAT exact:VAT xi=1e-06"])
        == 0
    )
    row = "| VAT exact − VAT xi=1e-06 | toy SSL (20 labels) | -1.33 [-3.92, +1.25] (n=3, "
    assert row + "not resolved) | 5 |" in out.with_suffix(".md").read_text()
    for suffix in (".png", ".pdf"):  # the figure of the differences, beside the table
        assert (tmp_path / f"rep_paired{suffix}").stat().st_size > 0
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain_paired.png").exists()  # no pairs asked: no figure
    # --seeds keeps only those seeds' runs: seeds 1 and 2 differ by -2.5 and -0.5
    sub = tmp_path / "sub"
    args = ["report", str(tmp_path / "exact"), str(tmp_path / "fd"), "--out", str(sub)]
    assert main([*args, "--paired", "VAT exact:VAT xi=1e-06", "--seeds", "1,2"]) == 0
    md = sub.with_suffix(".md").read_text()
    assert "| -1.50 [-14.21, +11.21] (n=2, not resolved) |" in md  # t(0.975, 1) = 12.7062
    assert "(n=2)" in md and "(n=3)" not in md
    capsys.readouterr()
    assert main([*args, "--seeds", "1,x"]) == 2
    assert "--seeds '1,x': give seeds as integers" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--out", str(out), "--paired", "VAT"]) == 2
    assert "give two row names" in capsys.readouterr().err


def test_rows_split_by_precision_only_where_a_row_ran_in_more_than_one(tmp_path):
    from lvat.analysis.report import summarize
    from lvat.analysis.runs import find_runs, read_run

    for s in range(2):
        _run_files(tmp_path / "f32" / f"s{s}", s, 30.0, power_method="exact")
        _run_files(tmp_path / "bf16" / f"s{s}", s, 31.0, amp="bfloat16", power_method="exact")
    report = summarize([read_run(p) for p in find_runs([tmp_path])])
    assert set(report.rows()) == {"VAT bf16", "VAT float32"}
    report = summarize([read_run(p) for p in find_runs([tmp_path / "f32"])])
    assert set(report.rows()) == {"VAT"}


def test_runs_of_different_budgets_are_never_averaged_together(tmp_path):
    from lvat.analysis.report import paired, summarize
    from lvat.analysis.runs import find_runs, read_run

    for s in range(2):
        _run_files(tmp_path / "short" / f"s{s}", s, 30.0 + s, train={"steps": 1200})
        _run_files(tmp_path / "long" / f"s{s}", s, 27.0 + 2 * s, train={"steps": 2400})
    report = summarize([read_run(p) for p in find_runs([tmp_path])])
    assert {c.row: (c.n, c.mean) for c in report.cells} == {
        "VAT 1200 updates": (2, 30.5),
        "VAT 2400 updates": (2, 28.0),
    }
    (pair,) = paired(report, "VAT 2400 updates", "VAT 1200 updates")
    assert pair.diffs == [-3.0, -2.0]
    report = summarize([read_run(p) for p in find_runs([tmp_path / "long"])])
    assert report.rows() == ["VAT"]  # one budget: no suffix


def test_an_lvat_row_is_named_by_results_json_when_the_transformer_file_is_gone(tmp_path):
    from lvat.analysis.runs import read_run

    _run_files(tmp_path / "r", 0, 30.0, transformer="runs/fit/gone/checkpoint.pt")
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    results.update(method="lvat", transformer_kind="vae")
    (tmp_path / "r" / "results.json").write_text(json.dumps(results))
    assert read_run(tmp_path / "r").row == "LVAT-VAE"


def test_the_convergence_check_reads_the_last_20_percent_of_each_curve(tmp_path):
    # Two cells of 2 runs, evaluated every 100 of 1,000 updates. The exact run's error moves by
    # 0.5 and 0.8 between update 800 and 1,000 (flattened); the finite difference's second run
    # moves by 1.5 (not flattened). Update 700 moves a lot in both: it is outside the window.
    curves = {
        "exact": [{700: 40.0, 800: 30.5, 900: 30.2, 1000: 30.0}, {800: 28.8, 1000: 28.0}],
        "fd": [{800: 31.5, 1000: 31.0}, {700: 50.0, 800: 32.0, 900: 31.0, 1000: 30.5}],
    }
    for name, runs in curves.items():
        for s, curve in enumerate(runs):
            folder = tmp_path / "runs" / name / f"s{s}"
            method = "exact" if name == "exact" else "finite-difference"
            _run_files(folder, s, curve[1000], power_method=method, xi=1e-6)
            lines = [json.dumps({"step": k, "test_error": v}) for k, v in curve.items()]
            (folder / "eval.jsonl").write_text("\n".join([*lines, '{"step": 10']))  # a cut line
    (tmp_path / "runs/fd/s2").mkdir()  # not a run: ignored
    prefix = tmp_path / "rep"
    assert main(["report", str(tmp_path / "runs"), "--out", str(prefix)]) == 0
    md = prefix.with_suffix(".md").read_text()
    assert "| VAT exact | toy SSL (20 labels) | -0.65 (n=2) | -0.80 | yes |" in md
    assert "| VAT xi=1e-06 | toy SSL (20 labels) | -1.00 (n=2) | -1.50 | no |" in md
    rows = {r["method"]: r for r in _csv_rows(prefix.with_suffix(".csv"))}
    assert float(rows["VAT exact"]["last_20pc_change"]) == pytest.approx(-0.65)
    assert (tmp_path / "rep_curves.png").stat().st_size > 0

    from lvat.analysis.report import summarize
    from lvat.analysis.runs import find_runs, read_run

    report = summarize([read_run(p) for p in find_runs([tmp_path / "runs"])])
    exact = next(c for c in report.cells if c.row == "VAT exact")
    assert exact.mean_curve() == ([800, 1000], [pytest.approx(29.65), pytest.approx(29.0)])


def test_the_compute_section_adds_up_core_hours_per_row_and_names_the_hardware(tmp_path):
    # Three VAT runs: 1,800 s on 1 thread, 900 s on 2 threads, 3,600 s of 1 thread on a GPU box
    # where threads do not count; 1,000 updates each: 1.5 core-hours, median 1.8 core-s/update.
    runs = [
        (1800.0, {"device": "cpu", "cpu": "EPYC", "torch_threads": 1}),
        (900.0, {"device": "cpu", "cpu": "EPYC", "torch_threads": 2}),
        (1800.0, {"device": "cuda", "cpu": "Xeon", "gpu": "H200", "torch_threads": 8}),
    ]
    for seed, (wall, hw) in enumerate(runs):
        folder = tmp_path / "runs" / f"s{seed}"
        _run_files(folder, seed, 30.0)
        results = json.loads((folder / "results.json").read_text())
        results |= {"wall_time_s": wall, "steps": 1000, "processes": 1, "hardware": hw}
        (folder / "results.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep.md").read_text()
    assert "| VAT | 3 | 1.50 | 1.80 | EPYC (2), H200 (1) |" in md
    assert "In all: 3 finished runs, 1.50 core-hours." in md


def test_chosen_keeps_each_columns_eps_with_the_most_runs_and_pairs_by_method(tmp_path, capsys):
    """After an eps search (one seed per eps) and four more seeds at the chosen eps, the final
    table has one row per method; a column whose search has not chosen yet is listed."""
    from lvat.analysis.report import paired, summarize
    from lvat.analysis.runs import find_runs, read_run

    def run(name: str, seed: int, error: float, eps: float, labels: int = 20) -> None:
        _run_files(tmp_path / name / f"s{seed}", seed, error, eps=eps)
        cfg = tmp_path / name / f"s{seed}" / "config.toml"
        cfg.write_text(cfg.read_text().replace("num_labeled = 20", f"num_labeled = {labels}"))
        split = tmp_path / name / f"s{seed}" / "split.json"
        split.write_text(json.dumps({"num_train": 100, "num_labeled": labels}))

    for eps, err in ((1.0, 30.0), (2.0, 25.0), (4.0, 27.0)):  # the search, seed 0
        run(f"vat{eps:g}", 0, err, eps)
        run(f"wide{eps:g}", 0, err, eps, labels=40)  # 40 labels: searched, nothing chosen yet
    for s, err in zip(range(1, 5), (24.0, 26.0, 25.5, 24.5), strict=True):  # eps 2, seeds 1-4
        run("vat2", s, err, 2.0)
    report = summarize([read_run(p) for p in find_runs([tmp_path])], chosen=True)
    (cell,) = report.cells
    assert (cell.row, cell.n, cell.mean) == ("VAT", 5, 25.0)
    assert cell.text(False) == "25.00 ± 0.79 (n=5, eps=2)"
    assert [(row, col[3]) for row, col in report.undecided] == [("VAT", 40)]
    assert len(summarize([read_run(p) for p in find_runs([tmp_path])]).cells) == 6  # all eps
    (pair,) = paired(report, "VAT", "VAT")
    assert pair.diffs == [0.0] * 5
    report = summarize([read_run(p) for p in find_runs([tmp_path / "wide1"])], chosen=True)
    assert report.cells == [] and paired(report, "VAT", "VAT") == []  # not chosen: no pair yet
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path), "--chosen", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "| VAT | 25.00 ± 0.79 (n=5, eps=2) |\n" in md  # the 40-label column: undecided
    assert "No eps chosen yet" in md and "- VAT, toy SSL (40 labels)" in md
