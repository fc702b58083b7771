"""`lvat gpu-study` end to end on the CPU with tiny settings, and its sizing rule."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from lvat.cli import main
from lvat.config import Config, load_config
from lvat.errors import ConfigError
from lvat.experiments.gpu_plan import ROWS, plan_study

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY_GLOW = """
out = "unused"
[data]
augment = false
[model]
n_levels = 2
n_steps = 1
width = 8
[train]
steps = 4
batch_size = 16
lr = 1e-3
warmup_steps = 2
eval_images = 50
eval_batch_size = 50
grid_images = 4
init_images = 32
log_every = 2
progress = false
"""


def test_the_study_runs_end_to_end_on_the_cpu(toy_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bench/ and runs/ of the repository are never touched
    cpu_json = REPO / "bench" / "cpu.json"
    before = hashlib.sha256(cpu_json.read_bytes()).hexdigest()
    glow = tmp_path / "glow.toml"
    glow.write_text(TINY_GLOW)
    out = tmp_path / "study"
    args = [
        "gpu-study", "--out", str(out), "--device", "cpu", "--budget-s", "60",
        "--configs", str(REPO / "configs" / "gpu-study"), "--glow-config", str(glow),
        "--dataset", str(toy_data), "--pad-to", "0", "--model", "conv-small",
        "--num-labeled", "20", "--num-validation", "20",
        "--batch-labeled", "4", "--batch-unlabeled", "8",
        "--max-steps", "3", "--min-steps", "3", "--job-overhead-s", "0.5",
        "--bench-repeats", "1", "--no-bench-naive", "--archive", str(tmp_path / "study.tar.gz"),
    ]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out

    # The plan comes before anything trains, and names every method's updates and seconds.
    plan_at = text.index("plan: every method 3 updates")
    assert text.index("[glow]") > plan_at and text.index("[sup]") > plan_at
    for row in ROWS:
        assert f"  {row} " in text[plan_at:]
    plan = json.loads((out / "plan.json").read_text())
    assert (plan["steps"], plan["decay_steps"], plan["fit_steps"]) == (3, 1, 4)

    # The bench of the study's own setting, under the out folder on a CPU.
    bench = json.loads((out / "bench-cpu.json").read_text())
    assert bench["options"]["image_shape"] == "1,16,16"
    assert bench["options"]["transformers"] == {"glow": str(glow)}
    assert bench["environment"]["hardware"]["device"] == "cpu"
    rows = {(r["method"], r["impl"]) for r in bench["models"]["conv-small"]["rows"]}
    assert rows == {("sup-12", "ours"), *((row, "ours") for row in ROWS)}
    assert hashlib.sha256(cpu_json.read_bytes()).hexdigest() == before
    assert not (tmp_path / "bench").exists()

    # The Glow was fitted (no shipped weights for this dataset), then the three runs finished.
    fitted = json.loads((out / "glow" / "results.json").read_text())
    assert fitted["steps"] == 4 and fitted["kind"] == "glow"
    for row in ROWS:
        results = json.loads((out / row / "results.json").read_text())
        assert results["steps"] == 3 and results["hardware"]["device"] == "cpu"
        cfg = load_config(Config, out / row / "config.toml")
        assert (cfg.train.steps, cfg.train.decay_steps, cfg.train.eval_every) == (3, 1, 1)
        assert (cfg.method.xi, cfg.method.power_method) == (1e-6, "finite-difference")
        assert (cfg.train.amp, cfg.train.channels_last, cfg.train.compile) == ("off", "off", False)
        assert (cfg.model.name, cfg.data.num_labeled, cfg.data.num_validation) == (
            "conv-small",
            20,
            20,
        )
    lvat = load_config(Config, out / "lvat-glow" / "config.toml").method
    assert (lvat.eps, lvat.transformer) == (1.0, str(out / "glow" / "checkpoint.pt"))
    assert load_config(Config, out / "vat" / "config.toml").method.eps == 2.0

    # lvat report over them, and the summary with the hardware beside every number.
    assert (out / "report.md").is_file() and (out / "report.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["runs"]] == list(ROWS)
    for r in summary["runs"]:
        assert 0 <= r["test_error"] <= 100 and r["validation_error"] is not None
        assert r["wall_time_s"] > 0 and r["bench_ms_per_step"] > 0
        assert r["hardware"]["device"] == "cpu" and r["versions"]["torch"]
    assert summary["environment"]["hardware"]["cpu"] and summary["bench"]["rows"]
    assert summary["glow"]["fit"]["steps"] == 4 and summary["total_s"] > 0
    assert set(summary["seconds"]) >= {"data", "bench", "fit-timing", "glow-fit", *ROWS}
    markdown = (out / "summary.md").read_text()
    cpu = summary["environment"]["hardware"]["cpu"]
    assert markdown.count(cpu) >= 1 + len(ROWS) + len(summary["bench"]["rows"])
    assert "| lvat-glow | 1 | 3 |" in markdown

    # One archive of the small files, no checkpoints.
    with tarfile.open(tmp_path / "study.tar.gz") as tar:
        names = tar.getnames()
    assert "study/summary.json" in names and "study/bench-cpu.json" in names
    assert "study/lvat-glow/results.json" in names
    assert not any(n.endswith("checkpoint.pt") for n in names)

    # A second study never mixes into the first one's folder.
    assert main(args) == 2
    assert "is not empty" in capsys.readouterr().err


MS = {"sup": 3.0, "vat": 7.0, "lvat-glow": 40.0}  # ms per update: 50 for one of each


def test_every_method_gets_the_same_updates_a_multiple_of_three_within_the_budget():
    plan = plan_study(480, 60, MS, eval_s=0.5, overhead_s=5, safety=0.9)
    room = 0.9 * (480 - 60 - 3 * (5 + 3 * 0.5))  # seconds the three runs' updates may fill
    assert plan.steps % 3 == 0 and plan.steps * 0.050 <= room < (plan.steps + 3) * 0.050
    assert plan.decay_steps == plan.eval_every == plan.steps // 3
    assert plan.fit_steps == 0 and plan.seconds["total"] <= 480
    assert plan.seconds["lvat-glow"] == pytest.approx(plan.steps * 0.040 + 5 + 1.5)


def test_the_glow_fit_takes_its_updates_or_its_share_of_the_time_left():
    full = plan_study(480, 60, MS, eval_s=0, overhead_s=0, fit_ms=20, fit_steps=1200)
    assert full.fit_steps == 1200 and full.seconds["glow-fit"] == pytest.approx(24)
    assert full.steps == 7128  # 0.9 x (420 - 24) / 0.050 = 7128
    short = plan_study(100, 0, MS, eval_s=0, overhead_s=0, fit_ms=100, fit_steps=1200)
    assert short.fit_steps == 250  # a quarter of 100 s at 100 ms per update
    assert short.steps == 1350 and short.seconds["total"] <= 100


def test_the_cap_and_a_budget_too_small_for_min_steps():
    assert plan_study(1e6, 0, MS, eval_s=0, max_steps=48_000).steps == 48_000
    with pytest.raises(ConfigError, match="216 updates per method, fewer than --min-steps 300"):
        plan_study(20, 5, MS, eval_s=0, overhead_s=1, min_steps=300)
    # 5 s spent + 3 x 1 s overhead + 300 x 0.050 / 0.9 = 24.7 s
    with pytest.raises(ConfigError, match="about 25 s would do"):
        plan_study(20, 5, MS, eval_s=0, overhead_s=1, min_steps=300)
    with pytest.raises(ConfigError, match="the Glow fit alone needs"):
        plan_study(10, 9, MS, eval_s=0, overhead_s=1, fit_ms=100, fit_steps=100)


def test_bench_refuses_a_bad_image_shape_or_transformer_source(capsys):
    assert main(["bench", "--image-shape", "1,32", "--methods", "sup"]) == 2
    assert "expected C,H,W" in capsys.readouterr().err
    assert main(["bench", "--transformers", "flow=x.toml", "--methods", "sup"]) == 2
    assert "KIND=SOURCE" in capsys.readouterr().err
