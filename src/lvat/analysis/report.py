"""`lvat report`: the paper's Table 3 from run folders — mean ± std of test error over seeds.

Each run is read from its folder alone (`lvat.analysis.runs`); runs are grouped into the cells
of Table 3:

    rows     method: sup, VAT, LVAT-VAE, LVAT-Glow (LVAT if the transformer's kind is unknown),
             any registered method by its display name (`lvat.regularizers.METHODS`; "-KIND"
             with a transformer of a registered kind), "+Ent" with entropy minimisation, and
             "eps=X" when one method was run at several eps (likewise power method, precision
             and budget: "VAT exact", "sup 2400 updates")
    columns  dataset, augmentation, SSL (with its label count) or SL (every label)

Each cell holds the mean and sample standard deviation (ddof=1) of the runs' test error and their
number n; the paper's value sits beside it where the paper has that cell. Runs with no
results.json are listed as running/unfinished and never averaged.

Whether a budget was long enough is read from each run's eval.jsonl: the change of the error over
the last 20 % of updates (the last evaluation at or before 80 % of the run against the final one),
a cell counting as flattened when every run moved by less than one point; `write_report` also draws
the mean curve of every cell (PREFIX_curves.png).
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from lvat.analysis.paper import (
    DATASET_LABELS,
    METHOD_LABELS,
    PAPER_DATASETS,
    PAPER_LABELS,
    TABLE3,
    Cell,
    paper_cells,
    paper_error,
)
from lvat.analysis.runs import LAST_SHARE, RunInfo, find_runs, read_run
from lvat.errors import LvatError
from lvat.io import atomic_write_text

CSV_FIELDS = ("method", "dataset", "aug", "setting", "mean", "std", "n", "paper")
CSV_EXTRA = ("num_labeled", "eps", "last_20pc_change", "runs_differ_in", "runs")
FLAT = 1.0  # a run has flattened when its last 20 % of updates moved its error by < 1 point
# Settings that should agree between the seeds of one cell; a difference is flagged, not hidden.
_SAME_WITHIN_CELL = (
    ("model", "name"),
    ("model", "top_bn"),
    ("method", "xi"),
    ("method", "latent_groups"),
    ("method", "transformer"),
    ("data", "num_validation"),
)


@dataclass
class CellSummary:
    """Test error over the runs of one cell."""

    row: str
    runs: list[RunInfo]
    chosen_eps: bool = False  # `summarize(chosen=True)`: the row holds each column's chosen eps

    @property
    def first(self) -> RunInfo:
        return self.runs[0]

    @property
    def errors(self) -> list[float]:
        return [r.error for r in self.runs if r.error is not None]

    @property
    def n(self) -> int:
        return len(self.errors)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.errors) if self.n > 1 else None  # sample std, ddof=1

    @property
    def paper(self) -> float | None:
        return paper_error(self.first.cell, self.first.num_labeled)

    @property
    def changes(self) -> list[float]:
        """Each finished run's change over its last 20 % of updates (runs that have one)."""
        return [c for r in self.runs if r.error is not None and (c := r.last_change) is not None]

    @property
    def flattened(self) -> bool | None:
        """Every run moved by less than FLAT points over its last 20 %; None: no curve."""
        return all(abs(c) < FLAT for c in self.changes) if self.changes else None

    def mean_curve(self) -> tuple[list[int], list[float]]:
        """The cell's mean error at the steps every finished run evaluated."""
        curves = [dict(r.curve) for r in self.runs if r.error is not None and r.curve]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        return steps, [statistics.fmean(c[s] for c in curves) for s in steps]

    @property
    def differ_in(self) -> list[str]:
        keys = []
        for section, key in _SAME_WITHIN_CELL:
            values = {str(r.config.get(section, {}).get(key)) for r in self.runs}
            if len(values) > 1:
                keys.append(f"{section}.{key}")
        return keys

    def text(self, with_paper: bool = True) -> str:
        s = f"{self.mean:.2f}" + ("" if self.std is None else f" ± {self.std:.2f}")
        s += f" (n={self.n}" + (f", eps={self.first.eps:g})" if self.chosen_eps else ")")
        if with_paper and self.paper is not None:
            s += f" [paper {self.paper:g}]"
        return s


@dataclass
class Report:
    cells: list[CellSummary]  # finished runs, grouped
    missing: list[tuple[Cell, float]]  # the paper's cells with no finished run, and its value
    unfinished: list[RunInfo]
    undecided: list[tuple[str, tuple]] = field(default_factory=list)  # chosen=True: no eps yet

    def columns(self) -> list[tuple[str, bool, str, int]]:
        cols = {c.first.column for c in self.cells}
        return sorted(cols, key=_column_order)

    def rows(self) -> list[str]:
        return list(dict.fromkeys(c.row for c in self.cells))


def _column_order(col: tuple[str, bool, str, int]) -> tuple:
    dataset, aug, setting, n = col
    rank = PAPER_DATASETS.index(dataset) if dataset in PAPER_DATASETS else len(PAPER_DATASETS)
    return (rank, dataset, aug, setting != "SSL", n)


def column_label(col: tuple[str, bool, str, int]) -> str:
    """'SVHN aug SSL', or 'C10 SSL (250 labels)' when not the paper's label count."""
    dataset, aug, setting, n = col
    label = f"{DATASET_LABELS.get(dataset, dataset)}{' aug' if aug else ''} {setting}"
    if setting == "SSL" and PAPER_LABELS.get(dataset) != n:
        label += f" ({n} labels)"
    return label


def summarize(runs: list[RunInfo], chosen: bool = False) -> Report:
    """Group finished runs into cells and find the paper's cells that have none.

    `chosen`: the table of a finished eps search, one row per method — in each column only the
    eps with the most finished runs (the search ran every eps with one label seed, the chosen one
    with all), shown in the cell ("n=5, eps=1"); a column where no eps has more runs than every
    other, and at least two, is listed as undecided."""
    finished = [r for r in runs if r.error is not None]
    # A suffix only where one method row was run in more than one way: at more than one eps,
    # power method ("exact", "xi=0.001"), precision ("bf16", "float32") or budget ("2400
    # updates"): runs that differ in any of these are never averaged together.
    variants = (_eps, lambda r: r.direction, lambda r: r.precision, lambda r: r.budget)
    if chosen:
        variants = variants[1:]  # eps moves into the group key, below
    seen: dict[tuple[str, int], set] = defaultdict(set)
    for r in finished:
        for i, variant in enumerate(variants):
            seen[r.row, i].add(variant(r))
    groups: dict[tuple, list[RunInfo]] = defaultdict(list)
    for r in finished:
        suffix = [v(r) for i, v in enumerate(variants) if len(seen[r.row, i]) > 1]
        groups[(" ".join([r.row, *suffix]), r.column, _eps(r) if chosen else "")].append(r)
    undecided = []
    if chosen:
        by_cell: dict[tuple, list[tuple]] = defaultdict(list)
        for key in groups:
            by_cell[key[:2]].append(key)
        for cell, keys in by_cell.items():
            sizes = sorted((len(groups[k]) for k in keys), reverse=True)
            if sizes[0] < 2 or (len(sizes) > 1 and sizes[1] == sizes[0]):
                undecided.append(cell)
            for k in keys:
                if len(groups[k]) < sizes[0] or cell in undecided:
                    del groups[k]

    def order(key: tuple) -> tuple:
        r = groups[key][0]
        return (r.order, r.entropy, r.eps or 0.0, _column_order(key[1]))

    cells = [
        CellSummary(k[0], sorted(groups[k], key=lambda r: str(r.path)), chosen_eps=bool(k[2]))
        for k in sorted(groups, key=order)
    ]
    missing = [
        (c, v) for c, v in _paper_cells_of(runs) if _key(c) not in {_key(r) for r in finished}
    ]
    unfinished = sorted((r for r in runs if r.error is None), key=lambda r: str(r.path))
    return Report(cells, missing, unfinished, undecided)


def _eps(r: RunInfo) -> str:
    return f"eps={r.eps:g}" if r.eps is not None else ""


def _key(x: RunInfo | Cell) -> tuple[Cell, int | None]:
    """A cell with its label count (None for SL): SSL runs only fill a cell of their own count."""
    if isinstance(x, Cell):
        return x, PAPER_LABELS[x.dataset] if x.setting == "SSL" else None
    return x.cell, x.num_labeled if x.cell.setting == "SSL" else None


def _paper_cells_of(runs: list[RunInfo]) -> list[tuple[Cell, float]]:
    """The paper's cells (and values) for the datasets the runs use."""
    return [(c, TABLE3[c]) for c in paper_cells({r.cell.dataset for r in runs})]


@dataclass
class Paired:
    """Row A minus row B in one column, seed by seed: mean and its 95% t-interval."""

    a: str
    b: str
    column: tuple[str, bool, str, int]
    diffs: list[float]  # error_A - error_B per shared (seed, split_seed), in points

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def interval(self) -> tuple[float, float] | None:
        """mean ± t(0.975, n-1) * sd / sqrt(n); None with fewer than two pairs."""
        return paired_interval(self.diffs)

    @property
    def resolved(self) -> bool:
        """The 95% interval excludes 0: the sign of the difference is resolved."""
        return _excludes_zero(self.interval)

    @property
    def seeds_to_resolve(self) -> int | None:
        """A planning number for an unresolved pair: the fewest seeds at which today's mean and
        sd would give an interval that excludes 0 (None when resolved or not estimable). Not a
        power calculation: a fresh study of that size resolves a true difference of this mean
        only about half the time."""
        if self.resolved or self.n < 2 or self.mean == 0:
            return None
        return seeds_to_exclude_zero(self.mean, statistics.stdev(self.diffs), self.n)

    def text(self) -> str:
        ci = self.interval
        span = "—" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
        verdict = "resolved" if self.resolved else "not resolved"
        return f"{self.mean:+.2f} {span} (n={self.n}, {verdict})"

    def joint_text(self, k: int) -> str:
        """The interval at level 1 - 0.05/k (Bonferroni): with k pairs in one report, all k
        such intervals cover their true differences together with probability >= 95%."""
        ci = paired_interval(self.diffs, 1 - 0.05 / k)
        if ci is None:
            return "—"
        verdict = "resolved" if _excludes_zero(ci) else "not resolved"
        return f"[{ci[0]:+.2f}, {ci[1]:+.2f}] ({verdict})"


def _excludes_zero(ci: tuple[float, float] | None) -> bool:
    return ci is not None and (ci[0] > 0 or ci[1] < 0)


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t confidence interval for the mean of paired differences (n - 1 dof)."""
    from scipy.stats import t

    n = len(diffs)
    if n < 2:
        return None
    half = t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / n**0.5
    mean = statistics.fmean(diffs)
    return mean - half, mean + half


def seeds_to_exclude_zero(
    mean: float, sd: float, start: int = 2, level: float = 0.95, cap: int = 1000
) -> int | None:
    """The smallest n >= start with t(level, n - 1) * sd / sqrt(n) < |mean|: how many paired
    seeds a difference of this mean and spread needs before its t-interval excludes 0. None
    above `cap` (or for a zero mean)."""
    from scipy.stats import t

    if mean == 0:
        return None
    for n in range(max(start, 2), cap + 1):
        if t.ppf(0.5 + level / 2, n - 1) * sd / n**0.5 < abs(mean):
            return n
    return None


def paired(report: Report, a: str, b: str) -> list[Paired]:
    """Row `a` minus row `b` per column, over the (seed, split_seed) pairs both have run."""
    rows = set(report.rows()) | {row for row, _ in report.undecided}  # undecided: no pair yet
    for name in (a, b):
        if name not in rows:
            raise LvatError(f"--paired: no row {name!r}; rows: {', '.join(sorted(rows))}")
    out = []
    for col in report.columns():
        cells = {c.row: c for c in report.cells if c.first.column == col}
        if a not in cells or b not in cells:
            continue
        err_b = {r.seeds: r.error for r in cells[b].runs if r.error is not None}
        diffs = [r.error - err_b[r.seeds] for r in cells[a].runs if r.seeds in err_b]
        if diffs:
            out.append(Paired(a, b, col, diffs))
    return out


def to_markdown(report: Report, metric: str = "test") -> str:
    """Table 3 layout, then one line per missing cell and per unfinished run. With metric
    "validation" the paper's (test) numbers are left out: they are not comparable."""
    cols = report.columns()
    with_paper = metric == "test"
    title = "Test error (%): mean ± sample std over runs (n); [paper] = Table 3 of Osada et al."
    if not with_paper:
        title = "Validation error (%): mean ± sample std over runs (n), for choosing eps"
    lines = [
        f"# {title}",
        "",
        "| method | " + " | ".join(column_label(c) for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for row in report.rows():
        by_col = {c.first.column: c for c in report.cells if c.row == row}
        texts = [by_col[c].text(with_paper) if c in by_col else "—" for c in cols]
        lines.append(f"| {row} | " + " | ".join(texts) + " |")
    flagged = [c for c in report.cells if c.differ_in]
    if flagged:
        lines += ["", "Runs averaged in one cell that differ in other settings:"]
        lines += [
            f"- {c.row}, {column_label(c.first.column)}: {', '.join(c.differ_in)}" for c in flagged
        ]
    if report.undecided:
        lines += ["", "No eps chosen yet (no eps has more finished runs than every other):"]
        lines += [f"- {row}, {column_label(col)}" for row, col in report.undecided]
    lines += convergence_lines(report, metric)
    lines += ["", "## Missing cells (in the paper's Table 3, no finished run)", ""]
    running = Counter(_key(r) for r in report.unfinished)
    for c, value in report.missing:
        label = column_label((c.dataset, c.aug, c.setting, PAPER_LABELS[c.dataset]))
        note = f"; {running[_key(c)]} running" if running[_key(c)] else ""
        lines.append(f"- {METHOD_LABELS[c.method]}, {label} [paper {value:g}]{note}")
    if not report.missing:
        lines.append("- none")
    lines += ["", "## Running/unfinished (not averaged)", ""]
    lines += [
        f"- {r.path}: {r.row}, {column_label(r.column)}, {r.progress}" for r in report.unfinished
    ] or ["- none"]
    lines += compute_lines(report)
    return "\n".join(lines) + "\n"


def compute_lines(report: Report) -> list[str]:
    """What the finished runs cost: core-hours (wall time x threads) per method row, the median
    core-seconds per update, and the hardware they ran on."""
    runs = [r for c in report.cells for r in c.runs if r.core_s is not None]
    if not runs:
        return []
    by_row: dict[str, list[RunInfo]] = defaultdict(list)
    for r in runs:
        by_row[r.row].append(r)
    lines = [
        "",
        "## Compute (finished runs; core-hours = wall time × threads)",
        "",
        "| method | runs | core-hours | core-s per update (median) | hardware (runs) |",
        "|---|---|---|---|---|",
    ]
    for row, rs in by_row.items():
        per = [u for r in rs if (u := r.core_s_per_update) is not None]
        median = f"{statistics.median(per):.2f}" if per else "—"
        hw = ", ".join(f"{cpu} ({n})" for cpu, n in Counter(r.cpu for r in rs).most_common())
        core_h = sum(r.core_s for r in rs) / 3600
        lines.append(f"| {row} | {len(rs)} | {core_h:.2f} | {median} | {hw} |")
    total = sum(r.core_s for r in runs) / 3600
    lines += ["", f"In all: {len(runs)} finished runs, {total:.2f} core-hours."]
    return lines


def convergence_lines(report: Report, metric: str = "test") -> list[str]:
    """Per cell: how much the last 20 % of updates moved the error (mean over runs and the
    largest move), and whether the cell has flattened. Empty when no run has a curve."""
    cells = [c for c in report.cells if c.changes]
    if not cells:
        return []
    lines = [
        "",
        f"## Convergence: change of {metric} error over the last {LAST_SHARE:.0%} of updates",
        "",
        f"Flattened: every run of the cell moved by less than {FLAT:g} point.",
        "",
        "| method | column | mean change | largest move | flattened |",
        "|---|---|---|---|---|",
    ]
    for c in cells:
        largest = max(c.changes, key=abs)
        lines.append(
            f"| {c.row} | {column_label(c.first.column)} | {statistics.fmean(c.changes):+.2f} "
            f"(n={len(c.changes)}) | {largest:+.2f} | {'yes' if c.flattened else 'no'} |"
        )
    return lines


def draw_report_curves(report: Report, path: Path, metric: str = "test") -> Path | None:
    """One panel per column, one line per row: the mean error curve of each cell (None when no
    run has a curve)."""
    from lvat.analysis.figures import draw_curves

    panels = []
    for col in report.columns():
        lines = []
        for c in report.cells:
            if c.first.column == col and (curve := c.mean_curve())[0]:
                lines.append((f"{c.row} (n={c.n})", *curve))
        if lines:
            panels.append((column_label(col), f"{metric} error % (mean over runs)", lines))
    if not panels:
        return None
    draw_curves(panels, path)
    return path


def draw_paired(pairs: list[Paired], path: Path, metric: str = "test") -> Path | None:
    """The paired differences as a figure: per pair and column, each seed's difference (grey
    dots) and the mean with its 95% interval (black where it excludes 0, red where it does not).
    None without pairs."""
    from lvat.analysis.figures import draw_intervals

    if not pairs:
        return None
    rows = [(f"{p.a} − {p.b}\n{column_label(p.column)} (n={p.n})", p.diffs, p.mean, p.interval)
            for p in pairs]  # fmt: skip
    draw_intervals(rows, path, f"{metric} error difference, points (A − B per seed; 95% interval)")
    return path


def to_csv(report: Report, metric: str = "test") -> str:
    """One row per cell: method, dataset, aug, setting, mean, std, n, paper (+ details); the
    paper column stays empty for metric "validation"."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS + CSV_EXTRA)
    for c in report.cells:
        r = c.first
        w.writerow(
            [
                c.row,
                r.cell.dataset,
                str(r.cell.aug).lower(),
                r.cell.setting,
                f"{c.mean:.6g}",
                "" if c.std is None else f"{c.std:.6g}",
                c.n,
                "" if c.paper is None or metric != "test" else f"{c.paper:g}",
                r.num_labeled,
                "" if r.eps is None else f"{r.eps:g}",
                f"{statistics.fmean(c.changes):.4g}" if c.changes else "",
                ";".join(c.differ_in),
                ";".join(str(x.path) for x in c.runs),
            ]
        )
    return buf.getvalue()


def paired_markdown(pairs: list[Paired], metric: str = "test") -> str:
    """The paired differences as a Markdown section."""
    k = len(pairs)
    joint = f" 95% jointly over all {k} (Bonferroni) |" if k > 1 else ""
    lines = [
        "",
        f"## Paired differences in {metric} error (points; per seed, A − B; 95% t-interval)",
        "",
        "| A − B | column | difference | seeds to resolve at this mean and sd |" + joint,
        "|---|---|---|---|" + ("---|" if joint else ""),
    ]
    for p in pairs:
        need = p.seeds_to_resolve
        plan = "—" if p.resolved or p.n < 2 else f"{need}" if need else "more than 1,000"
        both = f" {p.joint_text(k)} |" if joint else ""
        lines.append(f"| {p.a} − {p.b} | {column_label(p.column)} | {p.text()} | {plan} |" + both)
    if pairs:
        lines += [
            "",
            "Seeds to resolve: the fewest paired seeds at which today's mean and sd would give "
            "an interval that excludes 0 (a planning number, not a power calculation: a study of "
            "that size resolves a true difference of this size only about half the time).",
        ]
        if joint:
            lines.append(
                f"Jointly: each interval at level 1 − 0.05/{k}, so that all {k} cover their true "
                "differences together with probability ≥ 95%; a difference resolved there is not "
                "an artefact of looking at many pairs at once."
            )
    else:
        lines[-2:] = ["None yet: no column has both rows (at a chosen eps) with a shared seed."]
    return "\n".join(lines) + "\n"


def write_report(
    paths: list[str | Path],
    prefix: str | Path = "report",
    metric: str = "test",
    pairs: list[tuple[str, str]] = (),
    chosen: bool = False,
    seeds: Collection[int] | None = None,
) -> tuple[Report, str]:
    """Read every run under `paths`, write PREFIX.md, PREFIX.csv, (when runs logged
    evaluations) PREFIX_curves.png and (with `pairs` that have shared seeds) PREFIX_paired.png;
    return report and Markdown.
    `metric`: "test" (Table 3) or "validation" (the held-out split, for choosing eps). `pairs`:
    (row A, row B) whose per-seed differences get a 95% confidence interval. `chosen`: one row
    per method at each column's chosen eps (`summarize`). `seeds`: only the runs whose `seed`
    is one of these (e.g. leave out the seed an eps search was run on, whose result chose eps)."""
    if metric not in ("test", "validation"):
        raise LvatError(f"metric {metric!r}: use test or validation")
    runs = [read_run(p, metric) for p in find_runs(paths)]
    if seeds is not None:
        keep = set(seeds)
        runs = [r for r in runs if r.seeds[0] in keep]
    report = summarize(runs, chosen)
    markdown = to_markdown(report, metric)
    found = [p for a, b in pairs for p in paired(report, a, b)]
    if pairs:
        markdown += paired_markdown(found, metric)
    prefix = Path(prefix)
    atomic_write_text(prefix.with_name(prefix.name + ".md"), markdown)
    atomic_write_text(prefix.with_name(prefix.name + ".csv"), to_csv(report, metric))
    draw_report_curves(report, prefix.with_name(prefix.name + "_curves.png"), metric)
    draw_paired(found, prefix.with_name(prefix.name + "_paired.png"), metric)
    return report, markdown
