"""Grids of runs from one file: `lvat sweep FILE` (e.g. all of Table 3 with its seeds).

A sweep file (TOML) lists the transformers to train first and the classifier runs:

    out = "runs/table3"                       # runs go to out/<config's folder>/<config>/seed<k>

    [[fit]]                                   # trained first, into each fit config's own `out`
    kind = "vae"                              # a registered transformer kind (`lvat fit KIND`)
    config = "configs/fit/svhn-vae.toml"

    [[runs]]
    configs = ["configs/paper/svhn-ssl/*.toml"]   # globs, relative to the sweep file
    seeds = [0, 1, 2, 3, 4]
    seed_keys = ["seed", "data.split_seed"]       # SSL: label seeds; SL: just "seed"
    set = ["--train.steps", "48000"]              # optional flags for every run of this block
    grid = { "method.eps" = [1.0, 2.0] }          # optional: one run per value (and combination);
                                                  # out/<folder>/<config>/eps1/seed<k>

    [[runs]]                                  # more seeds at the value an earlier block's
    configs = ["configs/paper/svhn-ssl/vat.toml"]  # search chose: the lowest validation error
    seeds = [1, 2, 3, 4]                          # of its seed-0 runs (never test error)
    choose = { key = "method.eps", among = [1.0, 2.0, 4.0], seed = 0 }
                                              # out/<folder>/<config>/eps2/seed<k>, once every
                                              # candidate (eps1/seed0, ...) has finished and the
                                              # best is not at an edge of `among` (else: waiting,
                                              # "widen the grid"; allow_edge = true accepts it)

    [seconds_per_step]                        # optional: a prior for the time estimate,
    vat = 1.3                                 # core-seconds per update by config file stem

Every job is skipped when finished (results.json) or held by another live process (its run
folder's lock: two sweeps may overlap), resumed when interrupted (checkpoint.pt), started
otherwise. `--shard i/n` runs jobs i, i+n, i+2n, ... so a grid spreads over machines;
`--only GLOB` keeps the jobs whose run folder matches (a part of the grid first); a run whose
transformer is not trained yet, or whose value is still to be chosen, waits: the sweep plans
again after every run it finishes, so it starts them as soon as they can start (another shard's
runs included); with `--wait SECONDS` it also waits, planning again that often, while another
process (another shard) runs what its waiting jobs need, and otherwise leaves them for a later
`lvat sweep`. A choice no run can make (the finished search's best at an edge of `among`, or no
validation error) never waits: it returns and says to edit the sweep file.

Before running, a sweep prints its time estimate: the updates still to run times the seconds an
update took in the finished runs of the same config file (their results.json), or the file's
`seconds_per_step` prior where none has finished yet.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lvat.config import Config, load_config
from lvat.config.core import read_file, to_flags
from lvat.errors import ConfigError, LvatError, RunInUseError
from lvat.models.registry import KINDS
from lvat.regularizers import METHODS
from lvat.train.run_folder import in_use

RESULTS, CHECKPOINT = "results.json", "checkpoint.pt"
KEYS = ("out", "fit", "runs", "seconds_per_step")


@dataclass
class Job:
    """One fit or train run of a sweep."""

    kind: str  # "fit:KIND" (e.g. "fit:vae") or "train"
    config: Path
    flags: list[str]
    out: Path
    needs: list[Path] = field(default_factory=list)  # transformer checkpoints it reads
    steps: int = 0  # parameter updates of the whole run
    pending: str = ""  # why its value cannot be chosen yet (a `choose` block); "" when known
    stuck: bool = False  # pending until a person edits the sweep file: no run can end the wait

    @property
    def cost_key(self) -> str:
        """Runs with the same key cost the same per update (the time estimate's unit)."""
        stem = self.config.stem  # "vat", or "fit:vae:fashion-mnist-vae" for a fit
        return stem if self.kind == "train" else f"{self.kind}:{stem}"

    @property
    def status(self) -> str:
        if self.pending:
            return "todo"
        if (self.out / RESULTS).is_file():
            return "done"
        return "partial" if (self.out / CHECKPOINT).is_file() else "todo"

    @property
    def name(self) -> str:
        return f"{self.kind} {self.out}"


def _list(block: dict, key: str, where: str, kind: type) -> list:
    value = block.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise ConfigError(f"{where}.{key}: expected a list of {kind.__name__}")
    return value


def plan(path: str | Path) -> list[Job]:
    """Read a sweep file into its jobs: every fit first, then every (config, seed) run."""
    path = Path(path)
    spec = read_file(path)
    unknown = set(spec) - set(KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(KEYS)}")
    _priors(spec, path)  # checked here, used by `estimate`
    base = path.parent
    out = Path(spec.get("out", "runs/" + path.stem))
    jobs: list[Job] = []
    seen: dict[Path, Job] = {}
    for i, block in enumerate(spec.get("fit", [])):
        where = f"{path}: fit[{i}]"
        kind, cfg = block.get("kind"), block.get("config")
        if kind not in KINDS or not isinstance(cfg, str):
            kinds = " | ".join(f'"{k}"' for k in KINDS)
            raise ConfigError(f'{where}: needs kind = {kinds} and config = "FILE"')
        flags = _list(block, "set", where, str)
        fit_cfg = _fit_config(base / cfg, kind, flags)
        jobs.append(
            Job(f"fit:{kind}", base / cfg, flags, Path(fit_cfg.out), [], fit_cfg.train.steps)
        )
    for i, block in enumerate(spec.get("runs", [])):
        where = f"{path}: runs[{i}]"
        patterns = _list(block, "configs", where, str)
        seeds = _list(block, "seeds", where, int) or [0]
        seed_keys = _list(block, "seed_keys", where, str) or ["seed"]
        flags = _list(block, "set", where, str)
        points = _grid(block.get("grid", {}), where)
        choice = _choice(block.get("choose"), block.get("grid", {}), where)
        files = sorted({Path(f) for p in patterns for f in glob.glob(str(base / p))})
        if not files:
            raise ConfigError(f"{where}: no config file matches {patterns}")
        for file, (folder, point_flags), seed in itertools.product(files, points, seeds):
            pending, stuck = "", False
            if choice is not None:
                value, pending, stuck = choice.pick(
                    seen, out / file.parent.name / file.stem, folder
                )
                folder = "_".join(filter(None, [folder, choice.folder(value)]))
                if not pending:  # a placeholder is validated at the config's own value
                    point_flags = [*point_flags, *to_flags({choice.key: value})]
            # e.g. runs/table3/svhn-ssl/vat/seed0, or .../vat/num_labeled100_eps2/seed0
            run_out = out / file.parent.name / file.stem / folder / f"seed{seed}"
            seed_flags = to_flags(dict.fromkeys(seed_keys, seed))
            job_flags = [*flags, *point_flags, *seed_flags, "--out", str(run_out)]
            if run_out in seen:  # listed by an earlier block too (e.g. an eps search's seed 0)
                if (seen[run_out].config, seen[run_out].flags) != (file, job_flags):
                    raise ConfigError(f"{where}: {run_out} is also an earlier run, set differently")
                continue
            cfg = load_config(Config, file, job_flags)  # validates every run up front
            transformer = METHODS[cfg.method.name].needs_transformer
            needs = [_transformer_file(cfg.method.transformer)] if transformer else []
            job = Job("train", file, job_flags, run_out, needs, cfg.train.steps, pending, stuck)
            if pending:  # a placeholder at its place in the list, so shards stay stable
                jobs.append(job)
                continue
            seen[run_out] = job
            jobs.append(job)
    return jobs


def _grid(grid: object, where: str) -> list[tuple[str, list[str]]]:
    """`{key: [values]}` -> one (sub-folder, flags) per combination; [("", [])] without a grid.

    The folder names each value by the key's last part ("eps2", "num_labeled100_eps0.5"), in the
    order the keys are written, so a later block with a subset of the values reuses those runs."""
    if not isinstance(grid, dict) or not all(
        isinstance(v, list) and v and all(isinstance(x, (int, float, str)) for x in v)
        for v in grid.values()
    ):
        raise ConfigError(f'{where}.grid: expected {{ "section.key" = [value, ...] }}')
    points = []
    for values in itertools.product(*grid.values()):  # no grid: one empty point
        point = dict(zip(grid, values, strict=True))
        folder = "_".join(f"{k.rsplit('.', 1)[-1]}{_text(v)}" for k, v in point.items())
        points.append((folder, to_flags(point)))
    return points


@dataclass
class _Choice:
    """A `choose` table: run at the value of `key`, among `among`, whose seed-`seed` run (planned
    by an earlier block) reached the lowest validation error."""

    key: str
    among: list
    seed: int
    allow_edge: bool

    def folder(self, value: object) -> str:
        return self.key.rsplit(".", 1)[-1] + ("?" if value is None else _text(value))

    def pick(
        self, seen: dict[Path, Job], config_out: Path, folder: str
    ) -> tuple[object, str, bool]:
        """(the chosen value, "", False) or (None, why it is not known yet, whether only an edit
        of the sweep file can change that: the search has finished and cannot choose)."""
        errors = {}
        for value in self.among:
            sub = "_".join(filter(None, [folder, self.folder(value)]))
            run = config_out / sub / f"seed{self.seed}"
            if run not in seen:
                raise ConfigError(
                    f"choose: {run} is not planned by an earlier block of this sweep; search "
                    f"{self.key} = {self.among} with seed {self.seed} there first"
                )
            try:
                results = json.loads((run / RESULTS).read_text())
            except (OSError, ValueError):
                results = None  # not finished (or cut mid-write): wait
            error = results.get("validation_error") if isinstance(results, dict) else None
            if results is not None and not isinstance(error, int | float):
                return (
                    None,
                    f"{run} has no validation error to choose by (data.num_validation = 0?)",
                    True,
                )
            errors[value] = error
        left = [v for v, e in errors.items() if e is None]
        if left:
            return (
                None,
                f"{self.key} is chosen once its search has finished ({len(left)} to go)",
                False,
            )
        best = min(self.among, key=lambda v: errors[v])  # ties: the first listed
        ranked = sorted(self.among)
        if not self.allow_edge and best in (ranked[0], ranked[-1]):
            edge = f"the best {self.key} on validation, {_text(best)}, is at an edge of {ranked}"
            return None, f"{edge}: widen the search (or set allow_edge = true)", True
        return best, "", False


def _choice(spec: object, grid: dict, where: str) -> _Choice | None:
    if spec is None:
        return None
    spec = spec if isinstance(spec, dict) else {}
    key, among = spec.get("key"), spec.get("among")
    seed, allow_edge = spec.get("seed", 0), spec.get("allow_edge", False)
    if not (
        set(spec) <= {"key", "among", "seed", "allow_edge"}
        and isinstance(key, str)
        and key not in grid
        and isinstance(among, list)
        and among
        and all(isinstance(v, int | float | str) for v in among)
        and isinstance(seed, int)
        and isinstance(allow_edge, bool)
    ):
        raise ConfigError(
            f'{where}.choose: expected {{ key = "section.key", among = [value, ...], seed = 0 '
            "} (key not also in grid; optional allow_edge = true)"
        )
    return _Choice(key, among, seed, allow_edge)


def _text(value: int | float | str) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fit_config(config: Path, kind: str, flags: list[str]):
    from lvat.fit import fit_config

    return fit_config(kind, str(config), flags)


def _priors(spec: dict, path: Path) -> dict[str, float]:
    priors = spec.get("seconds_per_step", {})
    if not isinstance(priors, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in priors.values()
    ):
        raise ConfigError(f"{path}: seconds_per_step: expected {{ config-stem = seconds > 0 }}")
    return {str(k): float(v) for k, v in priors.items()}


@dataclass
class Estimate:
    """What is left of a sweep and how long it should take on one core per process."""

    todo: int  # jobs not finished
    steps: int  # their updates
    seconds: float  # core-seconds for the jobs whose rate is known
    unknown: list[str]  # cost keys of jobs with no finished run and no prior

    def line(self, processes: int = 1) -> str:
        if not self.todo:
            return "estimate: every run has finished"
        hours = self.seconds / 3600
        text = (
            f"estimate: {self.todo} runs to go ({self.steps:,} updates), {hours:.1f} core-hours "
            f"= {hours / processes:.1f} h on {processes} process(es) of one core"
        )
        if self.unknown:
            text += f"; no rate yet for {', '.join(sorted(set(self.unknown)))} (not counted)"
        return text


def estimate(jobs: list[Job], priors: dict[str, float] | None = None) -> Estimate:
    """The time the unfinished `jobs` need: updates x seconds per update, measured by finished
    runs of the same config file (median of their wall_time_s / steps) or else `priors`."""
    measured: dict[str, list[float]] = {}
    for job in jobs:
        if job.status == "done":
            results = json.loads((job.out / RESULTS).read_text())
            if results.get("wall_time_s") and results.get("steps"):
                rate = results["wall_time_s"] / results["steps"]
                measured.setdefault(job.cost_key, []).append(rate)
    rates = {**(priors or {}), **{k: statistics.median(v) for k, v in measured.items()}}
    todo = [j for j in jobs if j.status != "done"]
    known = [j for j in todo if j.cost_key in rates]
    return Estimate(
        todo=len(todo),
        steps=sum(j.steps for j in todo),
        seconds=sum(rates[j.cost_key] * j.steps for j in known),
        unknown=[j.cost_key for j in todo if j.cost_key not in rates],
    )


def _run(job: Job) -> None:
    resume = job.status == "partial"
    if job.kind == "train":
        from lvat.train import train

        train(load_config(Config, job.config, job.flags), resume=resume)
    else:
        from lvat.fit import fit, fit_config

        fit(fit_config(job.kind.removeprefix("fit:"), str(job.config), job.flags), resume=resume)


def _transformer_file(source: str) -> Path:
    """The file a run's transformer is read from: a path as given, a shipped name ("fashion-
    mnist/vae") as its weights file; a name not (yet) installed stays a path the run waits for."""
    from lvat.models.transformers import resolve_transformer

    try:
        return resolve_transformer(source)
    except LvatError:
        return Path(source)


def _ready(checkpoint: Path) -> bool:
    """A transformer checkpoint is usable once written and, in a fit's folder, once that fit has
    finished (a fit still training, e.g. in another shard, has a checkpoint but no results)."""
    folder = checkpoint.parent
    return checkpoint.is_file() and (
        (folder / RESULTS).is_file() or not (folder / "config.toml").is_file()
    )


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def sweep(
    path: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    dry_run: bool = False,
    only: str = "",
    wait: float = 0.0,
) -> int:
    """Run (or with `dry_run` list) this shard's jobs; return the number that failed.

    `only`: a glob; just the jobs whose run folder contains a match (e.g. "lvat-glow/*100_*"),
    before sharding. The estimate still covers the whole sweep. `wait`: when only waiting jobs
    are left while another process runs a job of this sweep (another shard's search or fit),
    plan again every `wait` seconds instead of returning (0: return).
    """
    if not wait >= 0:
        raise ConfigError(f"--wait {wait}: expected seconds >= 0")
    jobs = plan(path)
    mine = _mine(jobs, shard, only, path)
    chosen = [j for j in jobs if _matches(j, only)]
    picked = f" ({len(chosen)} match --only {only!r})" if only else ""
    print(f"{path}: {len(jobs)} jobs{picked}, {len(mine)} in shard {shard[0]}/{shard[1]}")
    priors = _priors(read_file(Path(path)), Path(path))
    print(estimate(jobs, priors).line(shard[1]) + " (whole sweep)", flush=True)
    if dry_run:
        for job in mine:
            state = _state(job)
            note = f": {job.pending}" if job.pending else _ELSEWHERE if state == "running" else ""
            print(f"  [{state}] {job.name}{note}")
        return 0
    failed, tried, shown = 0, set(), set()
    while True:  # plan again after every run: a search may have finished, a fit been written
        for job in mine:
            state = _state(job)
            if (job.out, state) not in shown and state in ("done", "running"):
                shown.add((job.out, state))
                print(f"  [{state}] {job.name}" + (_ELSEWHERE if state == "running" else ""))
        todo = [j for j in mine if _state(j) in ("todo", "partial") and j.out not in tried]
        if not todo:
            # wait only for what another process can bring: a search run, a transformer fit
            busy = wait > 0 and any(_state(j) == "waiting" and not j.stuck for j in mine)
            if not busy or not any(in_use(j.out) for j in jobs if j.status != "done"):
                break
            time.sleep(wait)  # another shard is running what the waiting jobs need
            jobs = plan(path)
            mine = _mine(jobs, shard, only, path)
            continue
        job = todo[0]
        tried.add(job.out)
        shown.add((job.out, "done"))
        print(f"  [{'resume' if job.status == 'partial' else 'start'}] {job.name}", flush=True)
        t0 = time.perf_counter()
        try:
            _run(job)
        except RunInUseError:  # another process took it between our look and our start
            shown.add((job.out, "running"))
            print(f"  [running] {job.name}{_ELSEWHERE}", flush=True)
        except LvatError as exc:
            failed += 1
            print(f"  [failed] {job.name}: {exc}", file=sys.stderr)
        else:
            print(f"  [done] {job.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        jobs = plan(path)
        mine = _mine(jobs, shard, only, path)
    for job in mine:
        if _state(job) == "waiting":
            why = job.pending or "needs " + ", ".join(str(p) for p in job.needs if not _ready(p))
            then = "edit the sweep file, then re-run" if job.stuck else "re-run later"
            print(f"  [waiting] {job.name}: {why}; {then}")
    return failed


def _matches(job: Job, only: str) -> bool:
    return not only or fnmatch.fnmatch(job.out.as_posix(), f"*{only}*")


def _mine(jobs: list[Job], shard: tuple[int, int], only: str, path: str | Path) -> list[Job]:
    chosen = [j for j in jobs if _matches(j, only)]
    if not chosen:
        raise ConfigError(f"--only {only!r} matches none of the {len(jobs)} run folders of {path}")
    return chosen[shard[0] :: shard[1]]


_ELSEWHERE = ": another process runs it (another shard, or an overlapping --only); not counted"


def _state(job: Job) -> str:
    """done | running (another live process holds its folder) | partial | todo, or waiting (a
    value to choose, or a transformer not yet there)."""
    if job.status == "done":
        return "done"
    if job.pending or any(not _ready(p) for p in job.needs):
        return "waiting"
    if in_use(job.out):
        return "running"
    return job.status
