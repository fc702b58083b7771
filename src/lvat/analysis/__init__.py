"""Analysis of finished runs: the paper's Table 3 (`report`) and Figs. 2-4 (`figures`)."""

from lvat.analysis.figures import make_figures
from lvat.analysis.paper import TABLE3, Cell, paper_error
from lvat.analysis.report import find_runs, read_run, summarize, write_report

__all__ = [
    "TABLE3",
    "Cell",
    "find_runs",
    "make_figures",
    "paper_error",
    "read_run",
    "summarize",
    "write_report",
]
