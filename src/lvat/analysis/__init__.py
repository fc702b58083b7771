"""Analysis of finished runs: reading a run folder (`runs`), the paper's Table 3 (`report`),
Figs. 2-4 (`figures`), the direction diagnostic (`directions`)."""

from lvat.analysis.figures import make_figures
from lvat.analysis.paper import TABLE3, Cell, paper_error
from lvat.analysis.report import summarize, write_report
from lvat.analysis.runs import find_runs, read_run

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
