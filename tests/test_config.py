"""Config: file then flags (flags win), errors that name the key, round trip through run folders."""

from __future__ import annotations

import pytest

from lvat.cli import main
from lvat.config import (
    Config,
    dumps_toml,
    field_docs,
    help_text,
    load_config,
    save_config,
    to_flags,
)
from lvat.config.schema import DataConfig
from lvat.errors import ConfigError


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('seed = 4\n[data]\nname = "svhn"\nnum_labeled = 1000\naugment = true\n')
    return path


def test_file_values_are_read(toml_file):
    cfg = load_config(Config, toml_file)
    assert (cfg.seed, cfg.data.name, cfg.data.num_labeled, cfg.data.augment) == (
        4, "svhn", 1000, True)  # fmt: skip
    assert cfg.data.translate == 2  # untouched keys keep their defaults


def test_flags_beat_the_file(toml_file):
    cfg = load_config(Config, toml_file, ["--data.num_labeled", "250", "--seed=9", "--data.flip",
                                          "off", "--data.augment", "false"])  # fmt: skip
    assert (cfg.data.num_labeled, cfg.seed, cfg.data.flip, cfg.data.augment) == (250, 9, "off",
                                                                                 False)  # fmt: skip
    assert cfg.data.name == "svhn"


def test_yaml_files_work_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  name: cifar10\n  num_validation: 5000\nseed: 2\n")
    cfg = load_config(Config, path, ["--data.name", "mnist"])
    assert (cfg.data.name, cfg.data.num_validation, cfg.seed) == ("mnist", 5000, 2)


def test_a_bare_boolean_flag_switches_it_on():
    assert load_config(Config, None, ["--data.augment"]).data.augment is True


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--data.nme", "x"], r"unknown key 'data.nme' \(did you mean 'data.name'\?\)"),
        (["--dta.name", "x"], r"unknown key 'dta.name'"),
        (["--data.num_labeled", "many"], r"data.num_labeled: expected int, got 'many'"),
        (["--data.num_labeled", "-7"], r"data.num_labeled = -7 is out of range: must be >= -1"),
        (["--data.augment", "maybe"], r"data.augment: expected bool.*true or false"),
        (["--data.flip", "sideways"], r"data.flip: 'sideways' is not allowed.*'auto', 'on', 'off'"),
        (["--seed"], r"--seed: missing value"),
        (["oops"], r"unexpected argument 'oops'"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_key(args, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(Config, None, args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[data]\nnum_labeled = 'lots'\n", r"data.num_labeled: expected int, got 'lots'"),
        ("[data]\nnum_labeled = true\n", r"data.num_labeled: expected int, got True"),
        ("[data]\npad_to = -1\n", r"data.pad_to = -1 is out of range"),
        ("[data]\ncolour = 1\n", r"unknown key 'data.colour'"),
        ("data = 3\n", r"data: expected a table"),
        ("seed = [\n", r"cannot parse"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path, text, pattern):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(Config, path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Config, tmp_path / "nope.toml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="use .toml, .yaml"):
        load_config(Config, tmp_path / "c.ini")


def test_resolved_config_round_trips_through_the_run_folder(tmp_path):
    cfg = load_config(Config, None, ["--data.name", 'we"ird', "--data.num_validation", "30"])
    path = save_config(cfg, tmp_path / "config.toml")
    assert load_config(Config, path) == cfg
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file


def test_every_field_has_help_text():
    docs = field_docs(DataConfig)
    assert "class-balanced" in docs["num_labeled"]
    text = help_text(Config)
    for key in ("--data.name", "--data.num_labeled", "--seed", "--out"):
        assert key in text
    assert all(field_docs(c) for c in (Config, DataConfig))
    blank = [line for line in text.splitlines() if line.startswith("      ") and not line.strip()]
    assert not blank


def test_cli_config_prints_resolved_toml(toml_file, capsys):
    assert main(["config", "--config", str(toml_file), "--data.num_labeled", "20"]) == 0
    out = capsys.readouterr().out
    assert "num_labeled = 20" in out and 'name = "svhn"' in out
    assert out == dumps_toml(load_config(Config, toml_file, ["--data.num_labeled", "20"]))
    assert main(["config", "--data.bogus", "1"]) == 2
    assert "unknown key 'data.bogus'" in capsys.readouterr().err


def test_to_flags_is_the_inverse_of_parse_overrides():
    values = {"train.steps": 10, "method.eps": 0.5, "data.name": "svhn", "train.progress": False}
    assert to_flags(values)[:2] == ["--train.steps", "10"]
    cfg = load_config(Config, None, to_flags(values))
    assert (cfg.train.steps, cfg.method.eps, cfg.data.name, cfg.train.progress) == (
        10,
        0.5,
        "svhn",
        False,
    )
