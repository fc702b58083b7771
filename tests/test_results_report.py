"""`make results-report` names only rows the committed runs under results/ have.

Each `--paired "A:B"` of the Makefile's report commands is a row label that `lvat report` builds
from the runs it reads ("VAT", or "VAT 9600 updates" once VAT ran at two budgets). A grid that
grows (a new budget, eps or seed set) can rename a row and break the redraw on every machine;
this reads the Makefile and the committed runs as `make results-report` does and checks every
pair, without drawing anything.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lvat.analysis.report import paired, summarize
from lvat.analysis.runs import find_runs, read_run
from lvat.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def _report_commands() -> list[list[str]]:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    recipe = text.split("\nresults-report:", 1)[1].split("\n\n", 1)[0]
    found = re.findall(r"\$\(BIN\)/lvat (report [^;&\n]*)", recipe)
    return [shlex.split(cmd) for cmd in found]


COMMANDS = _report_commands()


def test_the_makefile_has_the_report_commands_this_test_reads():
    assert len(COMMANDS) >= 8
    assert any("results/budget-9600" in cmd for cmd in COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: argv[argv.index("--out") + 1])
def test_every_paired_row_of_make_results_report_exists_in_the_committed_runs(argv):
    args = build_parser().parse_args(argv)
    dirs = [REPO / d for d in args.run_dirs]
    if not all(d.is_dir() for d in dirs):
        pytest.skip(f"no committed runs under {args.run_dirs} (the Makefile skips it too)")
    runs = [read_run(p, args.metric) for p in find_runs(dirs)]
    if args.seeds is not None:
        keep = {int(s) for s in args.seeds.split(",")}
        runs = [r for r in runs if r.seeds[0] in keep]
    report = summarize(runs, args.chosen)
    for text in args.paired:
        a, _, b = text.partition(":")
        assert paired(report, a.strip(), b.strip()), f"{text}: no seed both rows have run"
