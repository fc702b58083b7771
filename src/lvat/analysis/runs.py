"""One run folder, read for a report: `RunInfo`, and finding the run folders under a path.

A run is read from its folder alone (results.json, config.toml, split.json, eval.jsonl), never
rebuilt, so reading hundreds takes seconds. Its error is None until results.json exists (the run
is unfinished); its curve (step, error) comes from eval.jsonl, from which `RunInfo.last_change`
reads what the last 20 % of updates still moved; finished runs also give their compute
(wall time x threads x processes) and hardware. `lvat.analysis.report` groups runs into cells.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lvat.analysis.paper import DATASET_LABELS, Cell
from lvat.errors import LvatError
from lvat.models.registry import KINDS
from lvat.regularizers import METHODS, method_key, method_label

LAST_SHARE = 0.2  # the convergence check looks at the last 20 % of updates


@dataclass
class RunInfo:
    """What the report needs from one run folder."""

    path: Path
    cell: Cell
    num_labeled: int  # labeled training images (all of them for SL)
    eps: float | None  # None for sup
    entropy: bool  # VAT+Ent / LVAT+Ent
    config: dict  # raw config.toml
    error: float | None  # test (or validation) error; None: no results.json yet
    progress: str = ""  # "step 300/48000" for unfinished runs
    method: str = ""  # method.name ("lvat"); cell.method is the row key ("lvat-vae")
    kind: str = ""  # the transformer's kind ("vae"), "" without one or if unknown
    amp: str = ""  # the precision the run resolved ("off", "bfloat16"), from results.json
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, error) of eval.jsonl
    core_s: float | None = None  # wall time x threads x processes of a finished run
    steps: int = 0  # updates of a finished run
    cpu: str = ""  # the hardware it ran on: CPU model (and code path) or GPU name

    @property
    def core_s_per_update(self) -> float | None:
        return self.core_s / self.steps if self.core_s is not None and self.steps else None

    @property
    def last_change(self) -> float | None:
        """Error at the last evaluation minus error at the last one at or before 80 % of the
        run's updates (None without both): what the last 20 % of training still moved."""
        if not self.curve:
            return None
        end_step, end = self.curve[-1]
        before = [v for s, v in self.curve if s <= end_step * (1 - LAST_SHARE)]
        return end - before[-1] if before else None

    @property
    def row(self) -> str:
        label = method_label(self.method, self.kind) if self.method else self.cell.method
        return label + ("+Ent" if self.entropy else "")

    @property
    def direction(self) -> str:
        """How the power iteration ran: "exact", or the finite difference's "xi=1e-06"."""
        method = self.config.get("method", {})
        if method.get("power_method", "finite-difference") == "exact":
            return "exact"
        xi = method.get("xi")
        return f"xi={xi:g}" if isinstance(xi, int | float) else ""

    @property
    def budget(self) -> str:
        """The run's length as configured: "1200 updates"."""
        steps = self.config.get("train", {}).get("steps")
        return f"{steps} updates" if isinstance(steps, int) else ""

    @property
    def precision(self) -> str:
        return "bf16" if self.amp == "bfloat16" else "float32" if self.amp == "off" else self.amp

    @property
    def seeds(self) -> tuple:
        """(seed, split_seed): what pairs two runs of different methods for a paired test."""
        return (self.config.get("seed"), self.config.get("data", {}).get("split_seed"))

    @property
    def order(self) -> tuple[int, int]:
        """Rows in registration order: sup, VAT, LVAT-VAE, LVAT-Glow, LVAT, plugins, others."""
        rank = METHODS.index(self.method) if self.method in METHODS else 99
        return rank, KINDS.index(self.kind) if self.kind in KINDS else len(KINDS)

    @property
    def column(self) -> tuple[str, bool, str, int]:
        return (self.cell.dataset, self.cell.aug, self.cell.setting, self.num_labeled)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders: each path itself if it is one, else every run folder beneath it."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.is_dir():
            raise LvatError(f"not a folder: {p}")
        if _is_run(p):
            found[p] = None
            continue
        below = sorted(
            f.parent
            for f in [*p.rglob("results.json"), *p.rglob("split.json")]
            if _is_run(f.parent) and not _abandoned(f.parent.relative_to(p))
        )
        if not below:
            raise LvatError(f"{p}: no run folders (results.json or config.toml) in or beneath it")
        found.update(dict.fromkeys(below))
    return list(found)


def _abandoned(rel: Path) -> bool:
    # RUN/abandoned-N/ keeps the files of an attempt that never checkpointed (lvat.train.run_folder)
    return any(part.startswith("abandoned-") for part in rel.parts)


def _is_run(p: Path) -> bool:
    # train() writes split.json and config.toml before the first step, results.json at the end.
    return (p / "results.json").is_file() or (
        (p / "config.toml").is_file() and (p / "split.json").is_file()
    )


_KINDS: dict[str, str] = {}


def transformer_kind(path: str, run_dir: Path) -> str:
    """A transformer checkpoint's `kind` ('vae', 'glow', ...); '' if it cannot be read.

    `path` may also be a `.safetensors` file or a shipped name such as "fashion-mnist/glow"."""
    from lvat.models.transformers import read_kind, resolve_transformer

    try:
        shipped = [resolve_transformer(path)]
    except LvatError:
        shipped = []
    for candidate in (Path(path), run_dir / path, *shipped):
        key = str(candidate.resolve())
        if key not in _KINDS and candidate.is_file():
            _KINDS[key] = read_kind(candidate)
        if key in _KINDS:
            return _KINDS[key]
    return ""


def read_run(path: Path, metric: str = "test") -> RunInfo:
    """A run folder -> RunInfo (config from config.toml, `metric`_error from results.json)."""
    try:
        config = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        config = {}
    results = _read_json(path / "results.json")
    split = _read_json(path / "split.json")
    data, method_cfg = config.get("data", {}), config.get("method", {})

    method_name = str(results.get("method") or method_cfg.get("name", "?"))
    entry, kind = METHODS.get(method_name), ""
    if entry is not None and entry.needs_transformer:
        kind = results.get("transformer_kind") or method_cfg.get("transformer_kind")
        kind = kind or transformer_kind(method_cfg.get("transformer", ""), path)
        kind = kind if kind in KINDS else ""
    method = method_key(method_name, kind)  # "lvat-vae": the paper's cell keys
    name = str(results.get("dataset") or split.get("dataset") or data.get("name", "?"))
    dataset = name.lower() if name.lower() in DATASET_LABELS else Path(name).stem

    num_labeled = int(
        results.get("num_labeled", split.get("num_labeled", data.get("num_labeled", -1)))
    )
    every = split.get("num_train", 0) - split.get("num_validation", 0)
    sl = data.get("num_labeled") == -1 or (num_labeled > 0 and num_labeled == every)
    cell = Cell(method, dataset, bool(data.get("augment", False)), "SL" if sl else "SSL")
    regularized = entry is None or entry.regularized  # an unknown method: show its eps
    eps = method_cfg.get("eps") if regularized else None
    error = results.get(f"{metric}_error")
    info = RunInfo(
        path=path,
        cell=cell,
        num_labeled=num_labeled,
        eps=None if eps is None else float(eps),
        entropy=regularized and float(method_cfg.get("entropy_weight", 0.0)) > 0,
        config=config,
        error=None if error is None else float(error),
        method=method_name,
        kind=kind,
        amp=str(results.get("amp", "")),
        curve=_curve(path / "eval.jsonl", f"{metric}_error"),
    )
    if info.error is None:
        info.progress = _progress(path, config)
    elif isinstance(results.get("wall_time_s"), int | float):
        hw = results.get("hardware", {})
        threads = int(hw.get("torch_threads", 1)) if hw.get("device") == "cpu" else 1
        info.core_s = float(results["wall_time_s"]) * threads * int(results.get("processes", 1))
        info.steps = int(results.get("steps", 0))
        path_name = hw.get("cpu_code_path", {}).get("aten_capability", "")
        info.cpu = str(hw.get("gpu") or hw.get("cpu", "?")) + (
            f" ({path_name})" if path_name else ""
        )
    return info


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _curve(path: Path, key: str) -> list[tuple[int, float]]:
    """(step, value of `key`) of every line of an eval.jsonl that has both, in file order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a stop
        if not isinstance(row, dict):
            continue
        step, value = row.get("step"), row.get(key)
        if isinstance(step, int) and isinstance(value, int | float):
            points.append((step, float(value)))
    return points


def _progress(path: Path, config: dict) -> str:
    steps = config.get("train", {}).get("steps", "?")
    try:
        last = (path / "metrics.jsonl").read_text(encoding="utf-8").strip().splitlines()[-1]
        return f"step {json.loads(last)['step']}/{steps}"
    except (OSError, IndexError, ValueError, KeyError):
        return f"step 0/{steps}"
