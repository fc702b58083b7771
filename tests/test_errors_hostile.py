"""Hostile input gets one line that says what to do (exit status 2), never a traceback, and
nothing already written is lost: tampered and foreign checkpoints, resume overrides that change
the model, impossible label counts, binary config files, misspelt keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_flags

from lvat.cli import main
from lvat.config import Config, VAEFitConfig, load_config, to_dict
from lvat.config.core import resume_config
from lvat.errors import ConfigError, LvatError
from lvat.train import checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `lvat ARGV` in-process: (exit status, stderr), checking stderr is one line."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 1, err
    return code, err.strip()


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(toy_data, tmp_path_factory) -> Path:
    """A finished 6-step sup run of conv-small on the toy data (copied by `run_copy`)."""
    out = tmp_path_factory.mktemp("runs") / "sup"
    train(load_config(Config, None, tiny_run_flags(toy_data, out, **{"method.name": "sup"})))
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


class _Evil:
    """Unpickling this would run a shell command: weights-only loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- 1. tampered checkpoints: refused with their cause, never "re-run with weights_only=False" ---


def _assert_refused_with_cause(err: str, marker: Path) -> None:
    assert "GLOBAL" in err and "system" in err, err  # the cause comes first, whole
    assert "not a trusted lvat checkpoint" in err and "NOT loaded" in err
    assert "weights_only" not in err and "trusted source" not in err
    assert not marker.exists()


def test_a_malicious_checkpoint_is_refused_with_its_cause_and_not_run(run_copy, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    before = _digest(run_copy)
    torch.save({"model": _Evil(marker), "config": {}}, run_copy / "checkpoint.pt")
    before["checkpoint.pt"] = _digest(run_copy)["checkpoint.pt"]
    for argv in (["eval", run_copy], ["train", "--resume", run_copy]):
        code, err = _cli(capsys, *argv)
        assert code == 2
        _assert_refused_with_cause(err, marker)
        assert err.index("GLOBAL") < err.index("NOT loaded")  # the cause leads
    assert _digest(run_copy) == before  # nothing rewritten, nothing removed
    with pytest.raises(LvatError, match="GLOBAL.*NOT loaded"):
        checkpoint.load(run_copy / "checkpoint.pt")


def test_a_raw_pickle_is_refused_in_one_line_through_the_console_script(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "PWNED"
    with open(run / "checkpoint.pt", "wb") as f:  # protocol 4: torch also warns about it
        pickle.dump({"model": _Evil(marker)}, f, protocol=4)
    with open(tmp_path / "p2.pt", "wb") as f:
        pickle.dump({"model": _Evil(marker)}, f, protocol=2)
    lvat = Path(sys.executable).with_name("lvat")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(lvat), "eval", str(run)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "NOT loaded" in proc.stderr and "weights_only" not in proc.stderr
    with pytest.raises(LvatError, match="GLOBAL.*system.*NOT loaded") as exc:
        checkpoint.load(tmp_path / "p2.pt")
    assert "weights_only" not in str(exc.value)
    assert not marker.exists()


def test_a_file_that_is_no_torch_file_is_one_line(run_copy, capsys):
    (run_copy / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    code, err = _cli(capsys, "eval", run_copy)
    assert code == 2 and "not a readable lvat checkpoint" in err and "weights_only" not in err


# -- 2. torch files with the wrong contents -------------------------------------------------------


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        ({}, "is not an lvat training checkpoint (missing 'model')"),
        ({"model": {}}, "is not an lvat training checkpoint (missing 'config')"),
        ([1, 2, 3], "is not an lvat checkpoint (it holds a list"),
        ({"model": {}, "config": "x", "step": 3}, "('config' holds 'x'"),
    ],
)
def test_wrong_contents_are_named_for_eval_and_resume(run_copy, capsys, contents, message):
    torch.save(contents, run_copy / "checkpoint.pt")
    before = _digest(run_copy)
    for argv in (["eval", run_copy], ["train", "--resume", run_copy]):
        code, err = _cli(capsys, *argv)
        assert code == 2 and message in err, err
    assert _digest(run_copy) == before


def test_a_state_dict_of_the_wrong_shape_names_the_first_mismatching_key(run_copy, capsys):
    state = checkpoint.load(run_copy / "checkpoint.pt")
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3, 3)
    checkpoint.save(run_copy / "checkpoint.pt", state)
    code, err = _cli(capsys, "eval", run_copy)
    assert code == 2
    assert "does not match the conv-small classifier" in err and f"'{key}' has shape (3, 3)" in err
    del state["model"][key]
    checkpoint.save(run_copy / "checkpoint.pt", state)
    assert "'" + key + "' is missing" in _cli(capsys, "eval", run_copy)[1]


def test_the_validation_helpers_for_the_loops(run_copy):
    path = run_copy / "checkpoint.pt"
    state = checkpoint.load(path)
    assert checkpoint.check_training(state, path, checkpoint.RESUME_KEYS) is state
    cfg = checkpoint.saved_config(state, path)
    assert checkpoint.load_for_resume(path, cfg)["step"] == 6
    assert checkpoint.check_resume_state(state, path, cfg) is state
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="conv-large"))
    with pytest.raises(ConfigError, match=r"model.name \('conv-small' -> 'conv-large'\)"):
        checkpoint.load_for_resume(path, other)
    partial = {k: v for k, v in state.items() if k != "optimizer"}
    with pytest.raises(LvatError, match="missing 'optimizer'"):
        checkpoint.check_training(partial, path, checkpoint.RESUME_KEYS)
    checkpoint.check_training(partial, path)  # evaluating needs no optimizer
    from lvat.models import build_classifier

    wide = build_classifier("conv-small", in_channels=3, num_classes=10)
    with pytest.raises(LvatError, match="does not match the model: '.*' has shape"):
        checkpoint.load_model_state(wide, state["model"], path, "the model")
    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(LvatError, match="does not match the optimizer"):
        checkpoint.load_optimizer_state(opt, state["optimizer"], path)


def test_resume_of_a_state_dict_of_the_wrong_shape_is_one_line(run_copy, capsys):
    state = checkpoint.load(run_copy / "checkpoint.pt")
    state["step"] = 3  # not finished: the loop loads the weights before going on
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3, 3)
    checkpoint.save(run_copy / "checkpoint.pt", state)
    code, err = _cli(capsys, "train", "--resume", run_copy)
    assert code == 2 and key in err and "shape" in err


def test_a_transformer_folder_instead_of_its_checkpoint_says_which_file(tmp_path):
    from lvat.config import MethodConfig
    from lvat.train.setup import build_regularizer

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    cfg = MethodConfig(name="lvat", transformer=str(tmp_path))
    with pytest.raises(ConfigError, match=f"--method.transformer {tmp_path / 'checkpoint.pt'}$"):
        build_regularizer(cfg, torch.device("cpu"))


def test_resume_refuses_an_override_that_changes_the_model(run_copy, capsys):
    before = _digest(run_copy)
    code, err = _cli(capsys, "train", "--resume", run_copy, "--model.name", "conv-large")
    assert code == 2
    assert "model.name ('conv-small' -> 'conv-large')" in err
    assert "fixed on resume" in err and "model.*" in err and "data.num_labeled" in err
    code, err = _cli(capsys, "train", "--resume", run_copy, "--out", run_copy.parent / "else")
    assert code == 2 and "drop --out" in err
    assert _digest(run_copy) == before


def test_resume_lets_lr_steps_and_logging_change_but_not_the_split_or_method(finished_run):
    saved = to_dict(checkpoint.saved_config(checkpoint.load(finished_run / "checkpoint.pt"), "x"))
    flags = ["--train.lr", "0.01", "--train.steps", "12", "--train.eval_every", "4",
             "--train.log_every", "1", "--method.eps", "1.5", "--device", "cpu",
             "--data.num_labeled", "20", "--model.name", "conv-small"]  # fmt: skip
    cfg = resume_config(Config, saved, flags, "RUN")
    assert (cfg.train.lr, cfg.train.steps, cfg.out) == (0.01, 12, "RUN")
    for key, value in (
        ("data.num_labeled", "30"),
        ("data.split_seed", "3"),
        ("data.pad_to", "32"),
        ("data.name", "mnist"),
        ("method.name", "vat"),
        ("model.dropout", "0.1"),
        ("seed", "5"),
    ):
        with pytest.raises(ConfigError, match=f"cannot resume RUN with {key} "):
            resume_config(Config, saved, [f"--{key}", value], "RUN")


def test_a_saved_config_this_version_cannot_read_is_one_line(run_copy, capsys):
    state = checkpoint.load(run_copy / "checkpoint.pt")
    state["config"]["model"]["width"] = 3
    checkpoint.save(run_copy / "checkpoint.pt", state)
    for argv in (["eval", run_copy], ["train", "--resume", run_copy]):
        code, err = _cli(capsys, *argv)
        assert code == 2 and "config saved in" in err and "unknown key 'model.width'" in err


# -- 3. no labeled images -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vat", "sup"])
def test_zero_labeled_images_is_a_config_error_before_anything_is_written(
    toy_data, tmp_path, capsys, method
):
    out = tmp_path / "run"
    flags = tiny_run_flags(toy_data, out, **{"data.num_labeled": 0, "method.name": method})
    code, err = _cli(capsys, "train", *flags)
    assert code == 2 and "data.num_labeled = 0" in err and "-1" in err
    assert not out.exists()


def test_labels_that_cannot_be_class_balanced(toy_data, tmp_path, capsys):
    code, err = _cli(capsys, "config", "--data.num_labeled", "5")  # fashion-mnist: 10 classes
    assert code == 2 and "use a multiple of 10 (e.g. 10)" in err
    code, err = _cli(capsys, "config", "--data.name", "svhn", "--data.num_validation", "15")
    assert code == 2 and "data.num_validation = 15" in err
    # a user's dataset: the class count is known once it is read, still one line
    flags = tiny_run_flags(toy_data, tmp_path / "run", **{"data.num_labeled": 5})
    code, err = _cli(capsys, "train", *flags)
    assert code == 2 and "cannot be class-balanced over 10 classes" in err


# -- 4. config files that are not UTF-8 TOML ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("latin1.toml", "seed = 1\n# café\n".encode("latin-1"), "not a UTF-8 TOML file (byte"),
        ("bin.toml", bytes(range(256)) * 4, "not a UTF-8 TOML file"),
        ("nul.toml", b"seed = 1\x00\x00", "not a UTF-8 TOML file (it holds NUL bytes)"),
        ("bad.toml", b"[data\nname = 1", "cannot parse as TOML"),
        ("bad.yaml", b"\xff\xfe\x00", "not a UTF-8 YAML file"),
    ],
)
def test_a_config_that_is_not_utf8_toml_is_one_line(tmp_path, capsys, name, payload, message):
    path = tmp_path / name
    path.write_bytes(payload)
    for command in ("train", "config"):
        code, err = _cli(capsys, command, "--config", path)
        assert code == 2 and f"{path}: {message}" in err, err


# -- 5. messages ----------------------------------------------------------------------------------


def test_unknown_keys_suggest_the_close_one_and_list_each_allowed_name_once(tmp_path, capsys):
    code, err = _cli(capsys, "config", "--trian.steps", "3")
    assert code == 2
    assert "unknown section 'trian' (did you mean 'train'?)" in err
    assert "allowed sections: data, method, model, train" in err
    path = tmp_path / "c.toml"
    path.write_text("bogus = 1\n")
    code, err = _cli(capsys, "config", "--config", path)
    assert "allowed top-level keys and sections: data, device, method, model, out, seed, train" in (
        err
    )
    path.write_text("[trian]\nsteps = 1\n")
    assert "unknown section 'trian' (did you mean 'train'?)" in _cli(capsys, "config", "--config",
                                                                     path)[1]  # fmt: skip
    assert "(did you mean 'train.steps'?)" in _cli(capsys, "config", "--train.step", "3")[1]
    assert "(did you mean 'train.steps'?)" in _cli(capsys, "config", "--data.steps", "3")[1]
    assert "(did you mean 'seed'?)" in _cli(capsys, "config", "--sed", "3")[1]


def test_eval_or_resume_of_a_fit_run_says_what_it_is(tmp_path, capsys):
    from lvat.models import VAE, save_transformer

    run = tmp_path / "vae-run"
    vae = VAE(in_channels=1, image_size=16, latent_dim=8)
    save_transformer(vae, run / "checkpoint.pt", config=to_dict(VAEFitConfig()), step=3)
    for argv in (["eval", run], ["train", "--resume", run]):
        code, err = _cli(capsys, *argv)
        assert code == 2
        assert f"{run} is an `lvat fit` run (a VAE transformer), not a classifier run" in err
        assert f"use it as method.transformer: --method.transformer {run / 'checkpoint.pt'}" in err
        assert "latent_dim" not in err


# -- 6. any LvatError is one line -----------------------------------------------------------------


def test_a_multiline_lvat_error_is_printed_on_one_line(monkeypatch, capsys):
    import lvat.experiments.demo as demo

    def fail(out, workers=None, lr=1e-3):
        raise LvatError(f"{out}: cannot write here\n  (read-only file system)")

    monkeypatch.setattr(demo, "demo", fail)
    code, err = _cli(capsys, "demo", "--out", "/ro/x")
    assert code == 2 and err == "lvat: error: /ro/x: cannot write here (read-only file system)"


def test_a_split_file_without_labeled_images_is_one_line_for_any_method(toy_data, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["train", *tiny_run_flags(toy_data, first, **{"train.steps": 1})]) == 0
    empty = json.loads((first / "split.json").read_text())
    empty.update(labeled=[], num_labeled=0)
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    for method in ("sup", "vat"):
        flags = {"method.name": method, "data.split_file": str(tmp_path / "empty.json")}
        assert main(["train", *tiny_run_flags(toy_data, tmp_path / method, **flags)]) == 2
        err = capsys.readouterr().err
        assert "has no labeled images" in err and "Traceback" not in err
