"""The training loop and its CLI: every method runs, resume is exact, NaN stops cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import read_jsonl
from conftest import tiny_run_flags as _flags

from lvat.cli import main
from lvat.config import Config, load_config
from lvat.errors import LvatError
from lvat.train import NonFiniteLoss, checkpoint, train
from lvat.train.schedule import lr_and_beta1


def test_schedule_is_constant_then_linear_to_zero_with_beta1_half():
    cfg = load_config(Config, None, ["--train.steps", "100", "--train.decay_steps", "40"])
    assert lr_and_beta1(0, cfg.train) == (1e-3, 0.9) and lr_and_beta1(59, cfg.train) == (1e-3, 0.9)
    assert lr_and_beta1(60, cfg.train) == (1e-3, 0.5)
    assert lr_and_beta1(80, cfg.train) == pytest.approx((0.5e-3, 0.5))
    assert lr_and_beta1(99, cfg.train)[0] == pytest.approx(1e-3 / 40)


@pytest.mark.parametrize("method", ["sup", "vat", "lvat-vae", "lvat-glow"])
def test_a_30_step_cli_run_of_every_method_writes_all_its_files(
    method, toy_data, transformers, tmp_path, capsys
):
    extra = {
        "method.name": method.split("-")[0],
        "train.steps": 30,
        "train.decay_steps": 10,
        "train.log_every": 10,
        "train.eval_every": 15,
        "train.checkpoint_every": 15,
    }
    if method.startswith("lvat"):
        extra.update({"method.transformer": transformers[method[5:]], "method.eps": 1.0})
    out = tmp_path / method
    assert main(["train", *_flags(toy_data, out, **extra)]) == 0
    assert "test error" in capsys.readouterr().out
    for name in (
        "config.toml",
        "split.json",
        "metrics.jsonl",
        "eval.jsonl",
        "checkpoint.pt",
        "results.json",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 15, 20, 30]  # log windows end at checkpoints too
    assert all(np.isfinite(r["loss"]) for r in rows)
    if method != "sup":
        assert all(r["kl"] > 0 for r in rows) and rows[0]["adv_l2"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 30 and 0 <= results["test_error"] <= 100
    assert np.array(results["test_confusion_matrix"]).sum() == 50
    assert len(results["test_per_class_accuracy"]) == 10
    assert {"hardware", "versions", "wall_time_s"} <= set(results)
    assert results["transformer_kind"] == (method[5:] if method.startswith("lvat") else None)
    assert load_config(Config, out / "config.toml").method.name == method.split("-")[0]
    assert main(["eval", str(out)]) == 0
    assert f"error {results['test_error']:.2f}%" in capsys.readouterr().out


# VAT with augmentation and dropout: every random stream a step draws.
_VAT_FLAGS = {
    "method.name": "vat",
    "data.augment": "true",
    "model.dropout": 0.5,
    "data.num_validation": 20,
}


def _assert_same_weights(a: dict, b: dict) -> None:
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_ends_bit_identical_to_an_unstopped_run(toy_data, tmp_path):
    whole = load_config(Config, None, _flags(toy_data, tmp_path / "whole", **_VAT_FLAGS))
    train(whole)
    parts = load_config(Config, None, _flags(toy_data, tmp_path / "parts", **_VAT_FLAGS))
    partial = train(parts, stop_at=3)
    assert partial == {"step": 3, "finished": False}
    assert checkpoint.load(tmp_path / "parts" / "checkpoint.pt")["step"] == 3
    torch.manual_seed(1234)  # a resumed process starts with other global RNG state
    train(parts, resume=True)
    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "parts" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    _assert_same_weights(a, b)

    whole, parts = (
        read_jsonl(tmp_path / r / "metrics.jsonl", untimed=True) for r in ("whole", "parts")
    )
    assert whole == parts  # timings differ between runs; everything else must not


def test_log_eval_and_checkpoint_cadence_leave_the_training_bit_identical(toy_data, tmp_path):
    # The budget sweeps evaluate, log and checkpoint at other intervals than the runs they are
    # compared with (tests/test_sweep.py): that must not change a single weight.
    cadences = {
        "a": {"train.log_every": 2, "train.eval_every": 3, "train.checkpoint_every": 3},
        "b": {"train.log_every": 1, "train.eval_every": 1, "train.checkpoint_every": 6},
    }
    for name, cadence in cadences.items():
        train(load_config(Config, None, _flags(toy_data, tmp_path / name, **_VAT_FLAGS, **cadence)))
    a, b = (checkpoint.load(tmp_path / name / "checkpoint.pt") for name in cadences)
    assert a["step"] == b["step"] == 6
    _assert_same_weights(a, b)
    evals = [{r["step"]: r for r in read_jsonl(tmp_path / n / "eval.jsonl", True)} for n in "ab"]
    assert sorted(evals[0]) == [3, 6] and sorted(evals[1]) == [1, 2, 3, 4, 5, 6]
    assert evals[0][6] == evals[1][6] and evals[0][3] == evals[1][3]


def test_resume_through_the_cli_and_refusing_to_overwrite(toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(Config, None, _flags(toy_data, out, **{"method.name": "sup"}))
    train(cfg, stop_at=3)
    assert main(["train", *_flags(toy_data, out, **{"method.name": "sup"})]) == 2
    assert "already holds a run; add --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(out)]) == 0
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 6
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    for command in ("eval", "figures", "diagnose"):  # a folder that is not a run says so
        assert main([command, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path} is not the folder of a `lvat train`" in err and err.count("\n") == 1


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    toy_data, tmp_path, monkeypatch
):
    out = tmp_path / "nan"
    cfg = load_config(
        Config, None, _flags(toy_data, out, **{"method.name": "vat", "train.steps": 12})
    )
    import lvat.train.loop as loop

    real, calls = loop.F.cross_entropy, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLoss, match="non-finite loss between steps 5 and 6.*intact"):
        train(cfg)
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    monkeypatch.setattr(loop.F, "cross_entropy", real)
    assert train(cfg, resume=True)["steps"] == 12


def test_lvat_without_a_transformer_is_a_config_error(toy_data, tmp_path):
    cfg = load_config(Config, None, _flags(toy_data, tmp_path / "x", **{"method.name": "lvat"}))
    with pytest.raises(LvatError, match="method.transformer"):
        train(cfg)
    bad = load_config(
        Config,
        None,
        _flags(
            toy_data,
            tmp_path / "y",
            **{"method.name": "lvat", "method.transformer": str(tmp_path / "missing.pt")},
        ),
    )
    with pytest.raises(LvatError, match="transformer checkpoint not found"):
        train(bad)
