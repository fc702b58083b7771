"""Sweeps: a grid from one file; finished runs are skipped, interrupted ones resumed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lvat.config import Config, load_config
from lvat.errors import ConfigError
from lvat.experiments import plan, sweep
from lvat.experiments.sweep import parse_shard
from lvat.train import checkpoint, train


@pytest.fixture
def grid(tmp_path) -> Path:
    """2 methods x 2 seeds on a toy dataset, a few steps each."""
    rng = np.random.default_rng(0)
    y = np.arange(120) % 10
    x = rng.integers(0, 256, (120, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "toy.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    (tmp_path / "cfg").mkdir()
    common = (
        '[data]\nname = "toy.npz"\nnum_labeled = 20\n[model]\nname = "conv-small"\n'
        "[train]\nsteps = 4\nbatch_labeled = 4\nbatch_unlabeled = 8\ndecay_steps = 2\n"
        "log_every = 2\neval_every = 2\ncheckpoint_every = 2\nprogress = false\n"
    )
    for method in ("sup", "vat"):
        (tmp_path / "cfg" / f"{method}.toml").write_text(
            f'device = "cpu"\n{common}[method]\nname = "{method}"\n'
        )
    (tmp_path / "grid.toml").write_text(
        'out = "runs"\n[[runs]]\nconfigs = ["cfg/*.toml"]\nseeds = [0, 1]\n'
        'seed_keys = ["seed", "data.split_seed"]\n'
    )
    return tmp_path


def test_plan_lists_every_config_and_seed(grid, monkeypatch):
    monkeypatch.chdir(grid)
    jobs = plan("grid.toml")
    assert [str(j.out) for j in jobs] == [
        f"runs/cfg/{m}/seed{s}" for m in ("sup", "vat") for s in (0, 1)
    ]
    cfg = load_config(Config, jobs[3].config, jobs[3].flags)
    assert (cfg.seed, cfg.data.split_seed, cfg.method.name) == (1, 1, "vat")


def test_sweep_runs_skips_finished_and_resumes_interrupted(grid, monkeypatch, capsys):
    monkeypatch.chdir(grid)
    assert sweep("grid.toml", dry_run=True) == 0
    assert capsys.readouterr().out.count("[todo]") == 4
    # interrupt one run half-way, as if killed
    job = plan("grid.toml")[2]
    train(load_config(Config, job.config, job.flags), stop_at=2)
    assert job.status == "partial"
    assert sweep("grid.toml") == 0
    out = capsys.readouterr().out
    assert out.count("[start]") == 3 and out.count("[resume]") == 1
    for j in plan("grid.toml"):
        assert j.status == "done" and checkpoint.load(j.out / "checkpoint.pt")["step"] == 4
    first = (grid / "runs/cfg/vat/seed0/results.json").read_text()
    assert sweep("grid.toml") == 0  # everything finished: nothing re-runs
    assert capsys.readouterr().out.count("[done]") == 4
    assert (grid / "runs/cfg/vat/seed0/results.json").read_text() == first
    assert json.loads(first)["seed"] == 0


def test_shards_partition_the_jobs(grid, monkeypatch, capsys):
    monkeypatch.chdir(grid)
    sweep("grid.toml", shard=(1, 2))
    done = {str(j.out) for j in plan("grid.toml") if j.status == "done"}
    assert done == {"runs/cfg/sup/seed1", "runs/cfg/vat/seed1"}
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_only_runs_the_matching_part_of_the_grid_before_sharding(grid, monkeypatch, capsys):
    monkeypatch.chdir(grid)
    sweep("grid.toml", only="vat/*", shard=(0, 2))
    assert {str(j.out) for j in plan("grid.toml") if j.status == "done"} == {"runs/cfg/vat/seed0"}
    with pytest.raises(ConfigError, match="--only 'lvat' matches none of the 4 run folders"):
        sweep("grid.toml", only="lvat", dry_run=True)


def test_bad_sweep_files_are_clear_errors(tmp_path):
    (tmp_path / "a.toml").write_text('[[runs]]\nconfigs = ["nothing/*.toml"]\n')
    with pytest.raises(ConfigError, match="no config file matches"):
        plan(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text("colour = 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        plan(tmp_path / "b.toml")


def test_the_shipped_table3_sweep_covers_the_whole_table():
    path = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "table3.toml"
    jobs = plan(path)
    fits = [j for j in jobs if j.kind.startswith("fit")]
    runs = [j for j in jobs if j.kind == "train"]
    assert len(fits) == 8 and len(runs) == 4 * 4 * 5 + 4 * 4 * 3  # SSL 5 seeds, SL 3 runs
    trained = {j.out / "checkpoint.pt" for j in fits}
    needed = {p for j in runs for p in j.needs}
    assert needed == trained  # every LVAT run's transformer is trained by the sweep itself
    assert jobs.index(fits[-1]) < jobs.index(runs[0])  # transformers first


def test_the_study_sweep_pins_what_its_results_depend_on_and_searches_eps_on_seed_0():
    path = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "fashion-mnist-study.toml"
    runs = [j for j in plan(path) if j.kind == "train"]
    cfgs = [load_config(Config, j.config, j.flags) for j in runs]
    assert len({j.out for j in runs}) == len(runs)
    for job, c in zip(runs, cfgs, strict=True):
        # pinned in the sweep file itself, not inherited from a default that may change
        flags = " ".join(job.flags)
        assert "--train.amp off" in flags and c.train.amp == "off"
        assert (c.train.steps, c.train.batch_labeled, c.train.batch_unlabeled) == (1200, 32, 32)
        assert c.data.split_seed == c.seed and c.data.num_labeled in (100, 1000)
        assert c.train.steps % c.train.eval_every == 0  # an evaluation at the end ...
        assert c.train.steps * 4 // 5 % c.train.eval_every == 0  # ... and at 80 % of the run
        if job.config.stem != "sup":
            assert "--method.power_method finite-difference --method.xi 1e-6" in flags
        if c.method.name == "lvat":
            assert f"--method.transformer fashion-mnist/{job.config.stem[5:]}" in flags
    for labels in (100, 1000):
        for method in ("vat", "lvat-vae", "lvat-glow"):
            mine = [(None if j.pending else c.method.eps, c.seed)
                    for j, c in zip(runs, cfgs, strict=True)
                    if j.config.stem == method and c.data.num_labeled == labels]  # fmt: skip
            searched = sorted(eps for eps, seed in mine if seed == 0)
            assert len(searched) >= 3  # an optimum inside the grid is bracketed
            assert sorted(s for _, s in mine if s > 0) == [1, 2, 3, 4]  # four more label seeds
            chosen = {eps for eps, seed in mine if seed > 0}
            assert len(chosen) == 1  # one eps for all four, chosen or still to choose (None)
            if chosen != {None}:  # chosen: among the searched, never at an edge of the grid
                assert chosen <= set(searched) and searched[0] < min(chosen) < searched[-1]
        sups = [c.seed for j, c in zip(runs, cfgs, strict=True)
                if j.config.stem == "sup" and c.data.num_labeled == labels]  # fmt: skip
        assert sorted(sups) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "before, after, prefix",
    [
        (
            ("fashion-mnist-study", "fashion-mnist-more-seeds"),
            "fashion-mnist-budget",
            "results/budget",
        ),
        (("fashion-mnist-budget",), "fashion-mnist-budget-4800", "results/budget-4800"),
        (("fashion-mnist-budget-4800",), "fashion-mnist-budget-9600", "results/budget-9600"),
    ],
)
def test_each_budget_check_is_its_predecessor_at_twice_the_updates_and_nothing_else(
    before, after, prefix
):
    sweeps = Path(__file__).resolve().parents[1] / "configs" / "sweeps"
    earlier = {}
    for name in before:
        for j in plan(sweeps / f"{name}.toml"):
            c = load_config(Config, j.config, j.flags)
            earlier[j.config, c.data.num_labeled, c.seed, c.method.eps] = c
    checks = [j for j in plan(sweeps / f"{after}.toml") if j.kind == "train"]
    assert checks
    for job in checks:
        c = load_config(Config, job.config, job.flags)
        twin = earlier[job.config, c.data.num_labeled, c.seed, c.method.eps]
        assert (c.train.steps, c.train.decay_steps) == (
            2 * twin.train.steps,
            2 * twin.train.decay_steps,
        )
        assert c.train.steps * 4 // 5 % c.train.eval_every == 0  # the last-20 % check still works
        for section in ("data", "model", "method"):
            assert getattr(c, section) == getattr(twin, section)
        # besides the budget, only the cadence of logs, evaluations and checkpoints may differ:
        # it leaves the training bit-identical (tests/test_train.py)
        free = ("steps", "decay_steps", "out", "eval_every", "checkpoint_every", "log_every")
        same = {k: v for k, v in vars(c.train).items() if k not in free}
        assert same == {k: v for k, v in vars(twin.train).items() if k in same}
        assert c.seed == twin.seed and str(c.out).startswith(prefix + "/")


def test_the_extra_seeds_are_the_studys_chosen_runs_with_new_seeds_and_nothing_else():
    sweeps = Path(__file__).resolve().parents[1] / "configs" / "sweeps"
    study = {}
    for j in plan(sweeps / "fashion-mnist-study.toml"):
        c = load_config(Config, j.config, j.flags)
        study[j.config, c.data.num_labeled, c.method.eps, c.seed] = (j, c)
    extra = [j for j in plan(sweeps / "fashion-mnist-more-seeds.toml") if j.kind == "train"]
    assert extra
    for job in extra:
        c = load_config(Config, job.config, job.flags)
        assert c.seed >= 5 and c.data.split_seed == c.seed
        # its twin: a study run with label seed 1 at the same eps, i.e. at the study's choice
        twin_job, twin = study[job.config, c.data.num_labeled, c.method.eps, 1]
        assert not twin_job.pending
        assert c.method == twin.method and c.model == twin.model and c.train == twin.train
        assert vars(c.data) == {**vars(twin.data), "split_seed": c.seed}
        assert job.out.parent == twin_job.out.parent  # beside the study's runs: one report cell


def test_grid_runs_every_value_and_later_blocks_reuse_runs(grid, monkeypatch):
    monkeypatch.chdir(grid)
    (grid / "eps.toml").write_text(
        'out = "runs"\n'
        '[[runs]]\nconfigs = ["cfg/vat.toml"]\nseeds = [0]\n'
        'grid = { "data.num_labeled" = [20, 30], "method.eps" = [0.5, 2.0] }\n'
        '[[runs]]\nconfigs = ["cfg/vat.toml"]\nseeds = [0, 1]\n'
        'grid = { "data.num_labeled" = [30], "method.eps" = [2.0] }\n'
    )
    jobs = plan("eps.toml")
    outs = [str(j.out) for j in jobs]
    assert outs == [
        "runs/cfg/vat/num_labeled20_eps0.5/seed0",
        "runs/cfg/vat/num_labeled20_eps2/seed0",
        "runs/cfg/vat/num_labeled30_eps0.5/seed0",
        "runs/cfg/vat/num_labeled30_eps2/seed0",
        "runs/cfg/vat/num_labeled30_eps2/seed1",  # seed 0 of the 2nd block is the 1st block's
    ]
    cfgs = [load_config(Config, j.config, j.flags) for j in jobs]
    assert [(c.data.num_labeled, c.method.eps, c.seed) for c in cfgs] == [
        (20, 0.5, 0),
        (20, 2.0, 0),
        (30, 0.5, 0),
        (30, 2.0, 0),
        (30, 2.0, 1),
    ]
    assert all(c.out == o for c, o in zip(cfgs, outs, strict=True))


def test_bad_grid_and_clashing_runs_are_config_errors(grid, monkeypatch):
    monkeypatch.chdir(grid)
    (grid / "bad.toml").write_text(
        '[[runs]]\nconfigs = ["cfg/vat.toml"]\ngrid = { "method.eps" = 1.0 }\n'
    )
    with pytest.raises(ConfigError, match="grid"):
        plan("bad.toml")
    (grid / "clash.toml").write_text(
        '[[runs]]\nconfigs = ["cfg/vat.toml"]\ngrid = { "method.eps" = [1.0] }\n'
        '[[runs]]\nconfigs = ["cfg/vat.toml"]\ngrid = { "method.eps" = [1.0] }\n'
        'set = ["--train.steps", "8"]\n'
    )
    with pytest.raises(ConfigError, match="set differently"):
        plan("clash.toml")


def test_lvat_runs_wait_until_their_transformer_fit_has_finished(grid, monkeypatch, capsys):
    monkeypatch.chdir(grid)
    fit = grid / "fit"
    fit.mkdir()
    (grid / "cfg" / "lvat.toml").write_text(
        (grid / "cfg" / "vat.toml").read_text().replace('"vat"', '"lvat"')
        + 'transformer = "fit/checkpoint.pt"\n'
    )
    (grid / "one.toml").write_text('[[runs]]\nconfigs = ["cfg/lvat.toml"]\n')

    def state() -> str:
        sweep("one.toml", dry_run=True)
        return capsys.readouterr().out.splitlines()[-1].split()[0]

    assert state() == "[waiting]"  # nothing yet
    (fit / "config.toml").write_text("")
    (fit / "checkpoint.pt").write_bytes(b"")
    assert state() == "[waiting]"  # a fit still training (another shard) has a checkpoint
    (fit / "results.json").write_text("{}")
    assert state() == "[todo]"
    (fit / "config.toml").unlink()
    (fit / "results.json").unlink()
    assert state() == "[todo]"  # a checkpoint on its own (not a fit folder) is taken as is


def test_a_run_naming_a_shipped_transformer_waits_until_that_name_is_installed(
    grid, monkeypatch, capsys
):
    from lvat.models import VAE
    from lvat.models.transformers import export_transformer

    monkeypatch.chdir(grid)
    monkeypatch.setenv("LVAT_WEIGHTS", str(grid / "weights"))
    (grid / "cfg" / "lvat.toml").write_text(
        (grid / "cfg" / "vat.toml").read_text().replace('"vat"', '"lvat"')
        + 'transformer = "toy/vae"\n'
    )
    (grid / "one.toml").write_text('[[runs]]\nconfigs = ["cfg/lvat.toml"]\n')
    sweep("one.toml", dry_run=True)
    assert "[waiting]" in capsys.readouterr().out  # not installed: the name stays a path
    shipped = export_transformer(VAE(1, 16, 4), grid / "weights" / "toy" / "vae.safetensors")
    (job,) = plan("one.toml")
    assert job.needs == [shipped]
    sweep("one.toml", dry_run=True)
    assert "[todo]" in capsys.readouterr().out


def test_a_committed_run_without_its_checkpoint_counts_as_finished(grid, monkeypatch, capsys):
    """Studies grow across machines: the small files of finished runs are committed (never
    checkpoints); a later sweep on another machine skips them and the report counts them."""
    from lvat.analysis.report import summarize
    from lvat.analysis.runs import find_runs, read_run

    monkeypatch.chdir(grid)
    assert sweep("grid.toml") == 0
    kept = ("config.toml", "split.json", "metrics.jsonl", "eval.jsonl", "results.json")
    for j in plan("grid.toml"):  # what a clone of the repository holds
        for f in j.out.iterdir():
            if f.name not in kept:
                f.unlink()
    capsys.readouterr()
    assert sweep("grid.toml") == 0
    out = capsys.readouterr().out
    assert out.count("[done]") == 4 and "[start]" not in out and "[resume]" not in out
    report = summarize([read_run(p) for p in find_runs(["runs"])])
    assert sorted(c.n for c in report.cells) == [2, 2]


def test_the_time_estimate_is_updates_times_the_measured_rate_or_the_prior(grid, monkeypatch):
    from lvat.experiments.sweep import estimate

    monkeypatch.chdir(grid)
    jobs = plan("grid.toml")  # sup seeds 0, 1; vat seeds 0, 1; 4 updates each
    before = estimate(jobs, {"vat": 2.0})
    assert (before.todo, before.steps, before.seconds, before.unknown) == (4, 16, 16.0, ["sup"] * 2)
    assert "no rate yet for sup" in before.line()
    for job, wall in ((jobs[0], 10.0), (jobs[2], 30.0)):  # as if finished (a committed run)
        job.out.mkdir(parents=True)
        (job.out / "results.json").write_text(json.dumps({"wall_time_s": wall, "steps": 4}))
    after = estimate(jobs, {"vat": 2.0})  # measured 7.5 s per vat update beats the prior
    assert (after.todo, after.steps, after.unknown) == (2, 8, [])
    assert after.seconds == pytest.approx(4 * 10.0 / 4 + 4 * 30.0 / 4)
    assert "2 runs to go (8 updates)" in after.line(2)
    with pytest.raises(ConfigError, match="seconds_per_step"):
        (grid / "bad.toml").write_text(
            (grid / "grid.toml").read_text() + '[seconds_per_step]\nvat = "slow"\n'
        )
        plan("bad.toml")


CHOOSE = (
    'out = "runs"\n'
    '[[runs]]\nconfigs = ["cfg/vat.toml"]\nseeds = [0]\nseed_keys = ["seed", "data.split_seed"]\n'
    'grid = { "data.num_labeled" = [20, 30], "method.eps" = [0.5, 1.0, 2.0] }\n'
    '[[runs]]\nconfigs = ["cfg/vat.toml"]\nseeds = [1, 2]\n'
    'seed_keys = ["seed", "data.split_seed"]\n'
    'grid = { "data.num_labeled" = [20, 30] }\n'
    'choose = { key = "method.eps", among = [0.5, 1.0, 2.0], seed = 0 }\n'
)


def _finish(run: Path, **results) -> None:
    """As if the run had finished (a committed run: its results.json is what counts)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(results))


def test_choose_runs_more_seeds_at_the_value_with_the_lowest_validation_error(grid, monkeypatch):
    monkeypatch.chdir(grid)
    (grid / "choose.toml").write_text(CHOOSE)
    jobs = plan("choose.toml")
    later = jobs[6:]
    assert len(jobs) == 10 and all(j.pending for j in later)  # placeholders, in place
    assert all("search has finished (3 to go)" in j.pending for j in later)
    base = Path("runs/cfg/vat")
    # 20 labels: eps 1 is best on validation (test error would say eps 2: never used)
    for eps, val, test in (("0.5", 30.0, 20.0), ("1", 25.0, 21.0), ("2", 27.0, 10.0)):
        _finish(base / f"num_labeled20_eps{eps}" / "seed0", validation_error=val, test_error=test)
    # 30 labels: the best is eps 0.5, the grid's edge: wait for a wider search
    for eps, val in (("0.5", 20.0), ("1", 22.0), ("2", 24.0)):
        _finish(base / f"num_labeled30_eps{eps}" / "seed0", validation_error=val)
    jobs = plan("choose.toml")
    assert [str(j.out) for j in jobs[6:8]] == [
        "runs/cfg/vat/num_labeled20_eps1/seed1",
        "runs/cfg/vat/num_labeled20_eps1/seed2",
    ]
    c = load_config(Config, jobs[6].config, jobs[6].flags)
    assert (c.method.eps, c.seed, c.data.split_seed, c.data.num_labeled) == (1.0, 1, 1, 20)
    assert not jobs[6].pending and jobs[6].status == "todo"
    assert all("0.5, is at an edge of [0.5, 1.0, 2.0]" in j.pending for j in jobs[8:])
    (grid / "edge.toml").write_text(CHOOSE.replace("seed = 0 }", "seed = 0, allow_edge = true }"))
    assert [str(j.out) for j in plan("edge.toml")[8:]] == [
        "runs/cfg/vat/num_labeled30_eps0.5/seed1",
        "runs/cfg/vat/num_labeled30_eps0.5/seed2",
    ]
    _finish(base / "num_labeled20_eps1" / "seed0", test_error=1.0)  # no validation split
    assert "has no validation error" in plan("choose.toml")[6].pending


def test_bad_choose_tables_are_config_errors(grid, monkeypatch):
    monkeypatch.chdir(grid)
    among = "among = [0.5, 1.0, 2.0]"
    bad = {
        "key not also in grid": CHOOSE.replace('"data.num_labeled" = [20, 30] }\nchoose',
                                               '"method.eps" = [1.0] }\nchoose'),
        "expected": CHOOSE.replace(among, "among = 1.0"),
        "not planned by an earlier block": CHOOSE.replace(among, "among = [1.0, 4.0]"),
    }  # fmt: skip
    for match, text in bad.items():
        (grid / "bad.toml").write_text(text)
        with pytest.raises(ConfigError, match=match):
            plan("bad.toml")


def test_a_sweep_starts_the_chosen_runs_once_its_search_has_finished(grid, monkeypatch, capsys):
    monkeypatch.chdir(grid)
    for f in ("sup", "vat"):  # a validation split to choose by
        cfg = grid / "cfg" / f"{f}.toml"
        cfg.write_text(
            cfg.read_text().replace("num_labeled = 20\n", "num_labeled = 20\nnum_validation = 20\n")
        )
    (grid / "choose.toml").write_text(
        'out = "runs"\n'
        '[[runs]]\nconfigs = ["cfg/vat.toml"]\nseeds = [0]\n'
        'grid = { "method.eps" = [0.5, 1.0] }\n'
        '[[runs]]\nconfigs = ["cfg/vat.toml"]\nseeds = [1]\n'
        'choose = { key = "method.eps", among = [0.5, 1.0], allow_edge = true }\n'
    )
    assert sweep("choose.toml", dry_run=True) == 0
    assert (
        "[waiting] train runs/cfg/vat/eps?/seed1: method.eps is chosen" in capsys.readouterr().out
    )
    assert sweep("choose.toml") == 0  # one pass: the search, then the chosen run
    out = capsys.readouterr().out
    assert out.count("[start]") == 3 and "[waiting]" not in out
    results = {eps: Path(f"runs/cfg/vat/eps{eps}/seed0/results.json") for eps in ("0.5", "1")}
    errors = {eps: json.loads(p.read_text())["validation_error"] for eps, p in results.items()}
    best = min(errors, key=errors.get)  # ties: the first listed
    assert Path(f"runs/cfg/vat/eps{best}/seed1/results.json").is_file()
    assert sweep("choose.toml") == 0 and capsys.readouterr().out.count("[done]") == 3


def test_with_wait_a_choice_only_an_edit_can_make_returns_at_once(grid, monkeypatch, capsys):
    import sys
    import time

    sweep_module = sys.modules["lvat.experiments.sweep"]  # the package exports `sweep`, a function
    monkeypatch.chdir(grid)
    (grid / "choose.toml").write_text(CHOOSE)
    base = Path("runs/cfg/vat")
    for labels in (20, 30):  # both searches finished, eps 0.5 best: the grid's lower edge
        for eps, val in (("0.5", 20.0), ("1", 22.0), ("2", 24.0)):
            _finish(base / f"num_labeled{labels}_eps{eps}" / "seed0", validation_error=val)
    monkeypatch.setattr(sweep_module, "in_use", lambda path: True)  # another process is busy

    def nap(seconds: float) -> None:
        raise AssertionError("waited for a choice that no run can make")

    monkeypatch.setattr(time, "sleep", nap)
    assert sweep("choose.toml", wait=7.0) == 0
    out = capsys.readouterr().out
    assert out.count("is at an edge of [0.5, 1.0, 2.0]") == 4
    assert out.count("edit the sweep file, then re-run") == 4
    jobs = plan("choose.toml")
    assert all(j.stuck for j in jobs[6:]) and not any(j.stuck for j in jobs[:6])


def test_with_wait_a_shard_waits_for_the_search_another_shard_is_running(grid, monkeypatch, capsys):
    import os
    import subprocess
    import time

    monkeypatch.chdir(grid)
    (grid / "choose.toml").write_text(
        'out = "runs"\n'
        '[[runs]]\nconfigs = ["cfg/vat.toml"]\nseeds = [0]\ngrid = { "method.eps" = [0.5, 1.0] }\n'
        '[[runs]]\nconfigs = ["cfg/vat.toml"]\nseeds = [1]\n'
        'choose = { key = "method.eps", among = [0.5, 1.0], allow_edge = true }\n'
    )
    # "another shard" runs both search runs: a live process holds their folders
    other = subprocess.Popen(["sleep", "60"])
    try:
        for eps in ("0.5", "1"):
            run = Path(f"runs/cfg/vat/eps{eps}/seed0")
            run.mkdir(parents=True)
            (run / ".lock").write_text(f"{other.pid}\n")
        naps = []

        def nap(seconds: float) -> None:  # the other shard finishes while we sleep
            naps.append(seconds)
            for eps, err in (("0.5", 40.0), ("1", 30.0)):
                run = Path(f"runs/cfg/vat/eps{eps}/seed0")
                (run / ".lock").unlink()
                _finish(run, validation_error=err)

        monkeypatch.setattr(time, "sleep", nap)
        only = "seed1"  # this shard holds only the chosen run
        assert sweep("choose.toml", only=only) == 0  # no --wait: returns, the run left waiting
        assert "[waiting]" in capsys.readouterr().out and naps == []
        assert sweep("choose.toml", only=only, wait=7.0) == 0
        assert naps == [7.0]
        assert Path("runs/cfg/vat/eps1/seed1/results.json").is_file()  # eps 1: lower validation
        assert sweep("choose.toml", only=only, wait=7.0) == 0 and naps == [
            7.0
        ]  # nothing to wait on
    finally:
        other.kill()
        other.wait()
    from lvat.train.run_folder import in_use

    lock = Path("runs/x/.lock")
    lock.parent.mkdir(parents=True)
    assert not in_use(lock.parent)  # no lock file
    for text, busy in ((f"{os.getpid()}\n", False), (f"{other.pid}\n", False), ("", False)):
        lock.write_text(text)  # our own, a dead process's (kill -9), one being written
        assert in_use(lock.parent) is busy


def test_a_run_another_process_holds_is_skipped_not_failed(grid, monkeypatch, capsys):
    """Two sweeps over overlapping jobs (shards, or --only globs that overlap): a run folder
    another live process holds is neither resumed nor counted as failed, whether that is seen
    when planning or only when the lock is taken (the other process started it in between)."""
    import fcntl
    import subprocess
    import sys

    sweep_module = sys.modules["lvat.experiments.sweep"]
    monkeypatch.chdir(grid)
    held = plan("grid.toml")[0]  # sup seed0: interrupted half-way, now run by "another process"
    train(load_config(Config, held.config, held.flags), stop_at=2)
    other = subprocess.Popen(["sleep", "60"])
    try:
        (held.out / ".lock").write_text(f"{other.pid}\n")
        assert sweep("grid.toml", dry_run=True) == 0
        assert f"[running] {held.name}: another process runs it" in capsys.readouterr().out
        # a second folder is locked for real, but only after planning looked (a race)
        raced = plan("grid.toml")[1]
        raced.out.mkdir(parents=True)
        fd = os.open(raced.out / ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        looked = sweep_module.in_use
        monkeypatch.setattr(sweep_module, "in_use", lambda p: Path(p) != raced.out and looked(p))
        try:
            assert sweep("grid.toml") == 0  # nothing failed
        finally:
            os.close(fd)
    finally:
        other.kill()
        other.wait()
    out = capsys.readouterr().out
    assert out.count("[running]") == 2 and "[resume]" not in out
    assert held.status == "partial" and raced.status == "todo"  # left to their holders
    assert [j.status for j in plan("grid.toml")[2:]] == ["done", "done"]
