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

Every job is skipped when finished (results.json), resumed when interrupted (checkpoint.pt),
started otherwise. `--shard i/n` runs jobs i, i+n, i+2n, ... so a grid spreads over machines;
a run whose transformer is not trained yet is left for a later pass.
"""

from __future__ import annotations

import glob
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lvat.config import Config, load_config
from lvat.config.core import read_file, to_flags
from lvat.errors import ConfigError, LvatError
from lvat.models.registry import KINDS
from lvat.regularizers import METHODS

RESULTS, CHECKPOINT = "results.json", "checkpoint.pt"


@dataclass
class Job:
    """One fit or train run of a sweep."""

    kind: str  # "fit:KIND" (e.g. "fit:vae") or "train"
    config: Path
    flags: list[str]
    out: Path
    needs: list[Path] = field(default_factory=list)  # transformer checkpoints it reads

    @property
    def status(self) -> str:
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
    unknown = set(spec) - {"out", "fit", "runs"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: out, fit, runs")
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
        fit_out = Path(_fit_out(base / cfg, kind, flags))
        jobs.append(Job(f"fit:{kind}", base / cfg, flags, fit_out))
    for i, block in enumerate(spec.get("runs", [])):
        where = f"{path}: runs[{i}]"
        patterns = _list(block, "configs", where, str)
        seeds = _list(block, "seeds", where, int) or [0]
        seed_keys = _list(block, "seed_keys", where, str) or ["seed"]
        flags = _list(block, "set", where, str)
        points = _grid(block.get("grid", {}), where)
        files = sorted({Path(f) for p in patterns for f in glob.glob(str(base / p))})
        if not files:
            raise ConfigError(f"{where}: no config file matches {patterns}")
        for file, (folder, point_flags), seed in itertools.product(files, points, seeds):
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
            needs = [Path(cfg.method.transformer)] if transformer else []
            seen[run_out] = Job("train", file, job_flags, run_out, needs)
            jobs.append(seen[run_out])
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


def _text(value: int | float | str) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fit_out(config: Path, kind: str, flags: list[str]) -> str:
    from lvat.fit import fit_config

    return fit_config(kind, str(config), flags).out


def _run(job: Job) -> None:
    resume = job.status == "partial"
    if job.kind == "train":
        from lvat.train import train

        train(load_config(Config, job.config, job.flags), resume=resume)
    else:
        from lvat.fit import fit, fit_config

        fit(fit_config(job.kind.removeprefix("fit:"), str(job.config), job.flags), resume=resume)


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


def sweep(path: str | Path, *, shard: tuple[int, int] = (0, 1), dry_run: bool = False) -> int:
    """Run (or with `dry_run` list) this shard's jobs; return the number that failed."""
    jobs = plan(path)
    mine = jobs[shard[0] :: shard[1]]
    print(f"{path}: {len(jobs)} jobs, {len(mine)} in shard {shard[0]}/{shard[1]}")
    failed = 0
    for job in mine:
        missing = [p for p in job.needs if not _ready(p)]
        state = "waiting" if missing and job.status != "done" else job.status
        if dry_run or state == "done":
            print(f"  [{state}] {job.name}")
            continue
        if missing:
            print(f"  [waiting] {job.name}: needs {', '.join(map(str, missing))}; re-run later")
            continue
        print(f"  [{'resume' if state == 'partial' else 'start'}] {job.name}", flush=True)
        t0 = time.perf_counter()
        try:
            _run(job)
        except LvatError as exc:
            failed += 1
            print(f"  [failed] {job.name}: {exc}", file=sys.stderr)
            continue
        print(f"  [done] {job.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return failed
