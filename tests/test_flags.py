"""lvat.config.flags: sub-command flags generated from dataclasses (one declaration per option)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Sequence
from typing import Literal

import pytest

from lvat.bench.suite import BenchOptions
from lvat.cli import DiagnoseOptions, FiguresOptions, build_parser
from lvat.config.flags import add_flags, flag, from_flags


@dataclasses.dataclass
class Toy:
    path: str
    """where it goes"""
    count: int = flag(3, metavar="N")
    """how many (100% of them)"""
    rate: float | None = None
    """a rate"""
    mode: Literal["a", "b-c"] = "a"
    """a mode"""
    names: Sequence[str] = ("x", "y")
    """comma-separated names"""
    fast: bool = False
    """go fast"""
    check: bool = True
    """check things; --no-check skips that"""


def _parser(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_flags(parser, cls)
    return parser


def test_each_field_becomes_the_flag_its_type_and_default_call_for():
    parser = _parser(Toy)
    assert from_flags(Toy, parser.parse_args(["p"])) == Toy("p")
    args = ["p", "--count", "5", "--rate", "0.5", "--mode", "b-c", "--names", "u,,v,"]
    got = from_flags(Toy, parser.parse_args([*args, "--fast", "--no-check"]))
    assert got == Toy("p", 5, 0.5, "b-c", ("u", "v"), True, False)
    help_text = " ".join(parser.format_help().split())
    for line in ("path where it goes", "--count N how many (100% of them)", "--no-check check"):
        assert line in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["p", "--mode", "d"])


def test_a_field_type_without_a_flag_is_a_bug():
    @dataclasses.dataclass
    class Bad:
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="table"):
        _parser(Bad)


def test_lvat_bench_keeps_its_flags_and_defaults():
    parser = build_parser()
    assert from_flags(BenchOptions, parser.parse_args(["bench"])) == BenchOptions()
    args = parser.parse_args(
        ["bench", "--models", "conv-small", "--methods", "sup,vat", "--no-naive", "--no-exact"]
        + ["--cache-latents", "--amp", "bf16", "--channels-last", "off", "--compile", "on"]
        + ["--warmup", "2", "--repeats", "4", "--steps-per-repeat", "1", "--peak-size", "64"]
        + ["--batch-labeled", "8", "--batch-unlabeled", "16", "--num-images", "64"]
        + ["--device", "cpu", "--out", "b.json"]
    )
    assert from_flags(BenchOptions, args) == BenchOptions(
        models=("conv-small",), methods=("sup", "vat"), device="cpu", batch_labeled=8,
        batch_unlabeled=16, warmup=2, repeats=4, steps_per_repeat=1, amp="bf16",
        channels_last="off", compile="on", cache_latents=True, exact=False, naive=False,
        peak_size=64, num_images=64,
    )  # fmt: skip
    assert args.out == "b.json"


@pytest.mark.parametrize(
    "cls, function",
    [(FiguresOptions, "lvat.analysis.figures:make_figures"),
     (DiagnoseOptions, "lvat.analysis.directions:diagnose_run")],
)  # fmt: skip
def test_command_options_match_the_library_function(cls, function):
    """The CLI passes its options as keywords: same names, same defaults as the function."""
    import importlib

    module, name = function.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    for f in dataclasses.fields(cls):
        assert f.name in params, f.name
        if f.default is not dataclasses.MISSING:
            assert params[f.name].default == f.default, f.name
