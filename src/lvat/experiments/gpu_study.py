"""`lvat gpu-study` (`make gpu-study`): the paper's recipe on one GPU in a time budget, sized from
a first `lvat bench` on that GPU.

sup, VAT and LVAT-Glow on Fashion-MNIST zero-padded to 32x32: conv-large, batches 32 labeled
+ 128 unlabeled, Adam with the paper's decay, the authors' power iteration, eps 2.0 (VAT, as
configs/fashion-mnist; 2.5 is SVHN's) and 1.0 (LVAT-Glow, the paper's). Every setting a result
depends on is pinned in configs/gpu-study/*.toml and configs/fit/gpu-study-glow.toml; the study
sets only what it sizes. In one folder (`out`, default runs/gpu-study):

1. `lvat bench` of exactly the study's setting: its classifier on the dataset's image shape,
   rows sup, vat and lvat-glow with the study's Glow, its batches and fast path (amp and
   channels-last as the configs pin them, eager), few repeats. Written at once to
   bench/cuda.json on CUDA; elsewhere to OUT/bench-DEVICE.json (never bench/cpu.json).
2. Unless `DATASET/glow` weights ship (`lvat.available_transformers()`): a few timed updates of
   the Glow fit (configs/fit/gpu-study-glow.toml).
3. The plan (`plan_study`): printed, and written to OUT/plan.json, before anything trains.
4. The Glow fit, if any (OUT/glow); then the same rule once more with the time really left.
5. sup, VAT, LVAT-Glow (`lvat.train.train`) in OUT/sup, OUT/vat, OUT/lvat-glow; `lvat report`
   over them (OUT/report.md, OUT/report.csv).
6. OUT/summary.json and OUT/summary.md: test and validation error, wall times, the bench's
   ms/step, planned against spent seconds, with the hardware and versions beside every number.

The sizing rule is `lvat.experiments.gpu_plan.plan_study`.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lvat.config import Config, load_config, to_flags
from lvat.config.flags import flag
from lvat.errors import LvatError
from lvat.experiments.gpu_plan import PAPER_STEPS, ROWS, Plan, plan_study
from lvat.io import atomic_write_text

SKIP = ("checkpoint.pt",)  # not packed into --archive (large, and rebuilt by a re-run)


@dataclass
class GpuStudyOptions:
    """What `lvat gpu-study` runs; the field docstrings are its `--help` (`lvat.config.flags`).
    The defaults are the GPU study; the CPU test shrinks data, model, batches and budget."""

    out: str = flag("runs/gpu-study", metavar="DIR")
    """folder for the runs, report, plan and summary (must be new or empty)"""
    budget_s: float = flag(480.0, metavar="S")
    """wall-time budget of the whole study in seconds, from its start: bench, Glow fit, three
    runs, evaluations, report"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N"""
    configs: str = flag("configs/gpu-study", metavar="DIR")
    """folder of the pinned recipe: sup.toml, vat.toml, lvat-glow.toml"""
    glow: str = flag("auto", metavar="SOURCE")
    """LVAT-Glow's Glow: auto = the shipped DATASET/glow weights if any, else fit --glow-config
    first; or a checkpoint, .safetensors file or shipped name, used as it is"""
    glow_config: str = flag("configs/fit/gpu-study-glow.toml", metavar="FILE")
    """`lvat fit glow` config of the Glow fitted when none is given or ships"""
    dataset: str = flag("", metavar="NAME")
    """dataset name or .npz / image-folder path (default: the configs', fashion-mnist)"""
    data_root: str = flag("", metavar="DIR")
    """folder with the dataset files (default: search; give it where nothing can download)"""
    pad_to: int | None = flag(None, metavar="N")
    """zero-pad images to NxN (default: the configs', 32)"""
    model: str = flag("", metavar="NAME")
    """classifier (default: the configs', conv-large)"""
    num_labeled: int | None = flag(None, metavar="N")
    """labeled images (default: the configs', 100)"""
    num_validation: int | None = flag(None, metavar="N")
    """held-out validation images (default: the configs', 1000)"""
    batch_labeled: int | None = flag(None, metavar="N")
    """labeled images per update (default: the configs', 32)"""
    batch_unlabeled: int | None = flag(None, metavar="N")
    """unlabeled images per update (default: the configs', 128)"""
    max_steps: int = flag(PAPER_STEPS, metavar="N")
    """most updates per method (the paper's 48,000 for SVHN)"""
    min_steps: int = flag(300, metavar="N")
    """fewest updates per method worth running; a budget that gives fewer stops the study
    before it trains"""
    fit_share: float = flag(0.25, metavar="F")
    """most of the time left after the bench that the Glow fit may take"""
    job_overhead_s: float = flag(5.0, metavar="S")
    """seconds allowed per fit or run beyond its updates and evaluations (data, model, first
    kernels, checkpoint)"""
    safety: float = flag(0.9, metavar="F")
    """share of the time left that the planned runs fill"""
    bench_out: str = flag("", metavar="FILE")
    """bench JSON (default: bench/cuda.json on CUDA, else OUT/bench-DEVICE.json)"""
    bench_repeats: int | None = flag(None, metavar="N")
    """timed runs per bench row (default: 3 of 10 updates on CUDA, the bench's elsewhere)"""
    bench_naive: bool = True
    """also time the naive port's rows (the >= 2x target on a GPU); --no-bench-naive skips
    them"""
    archive: str = flag("", metavar="FILE")
    """also pack the study's small files (no checkpoints) and the bench JSON into this .tar.gz,
    named relative to the working folder: one file to bring back from a machine"""


@dataclass
class _Study:
    """What the steps of one study share."""

    opts: GpuStudyOptions
    out: Path
    device: torch.device
    log: Callable[[str], None]
    start: float = field(default_factory=time.perf_counter)
    spent: dict[str, float] = field(default_factory=dict)  # seconds per phase

    def clock(self) -> float:
        return time.perf_counter() - self.start

    def config(self, row: str, **values: object) -> Config:
        """Run config of `row`: the pinned file, the options given, the device's fast path."""
        o = self.opts
        keys = {
            "data.name": o.dataset or None,
            "data.root": o.data_root or None,
            "data.pad_to": o.pad_to,
            "model.name": o.model or None,
            "data.num_labeled": o.num_labeled,
            "data.num_validation": o.num_validation,
            "train.batch_labeled": o.batch_labeled,
            "train.batch_unlabeled": o.batch_unlabeled,
        }
        if self.device.type != "cuda":  # the configs pin the GPU's bf16 and channels-last
            keys |= {"train.amp": "off", "train.channels_last": "off"}
        keys |= {"device": str(self.device), "out": str(self.out / row), **values}
        path = Path(o.configs) / f"{row}.toml"
        if not path.is_file():
            raise LvatError(f"{path} not found: run from the repository root or give --configs")
        return load_config(Config, path, to_flags({k: v for k, v in keys.items() if v is not None}))


def _phase(study: _Study, name: str, t0: float) -> float:
    study.spent[name] = round(study.clock() - t0, 2)
    return study.spent[name]


def run_study(opts: GpuStudyOptions, log: Callable[[str], None] = print) -> dict:
    """Run the study (module docstring); return the summary that summary.json holds."""
    from lvat.data import load_from_config
    from lvat.environment import environment
    from lvat.models.transformers import available_transformers
    from lvat.train.setup import resolve_device

    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LvatError(f"{out} is not empty: give a new --out (a study never mixes two runs)")
    study = _Study(opts, out, resolve_device(opts.device), log)
    base = study.config("sup")
    dataset = load_from_config(base.data)
    glow = opts.glow
    if glow == "auto":
        shipped = f"{Path(base.data.name).stem}/glow"
        glow = shipped if shipped in available_transformers() else ""
    fit_cfg = None if glow else _fit_config(study, base, opts.glow_config)
    env = environment(study.device)
    shape = tuple(dataset.image_shape)
    log(
        f"lvat gpu-study on {_hardware(env)}: {dataset.name} {'x'.join(map(str, shape))}, "
        f"{base.model.name}, {base.data.num_labeled} labels, batches {base.train.batch_labeled} "
        f"+ {base.train.batch_unlabeled}; budget {opts.budget_s:g} s; Glow: "
        f"{glow or f'fit {opts.glow_config} first'}"
    )
    _phase(study, "data", 0.0)
    out.mkdir(parents=True, exist_ok=True)

    # 1-2. The bench of exactly this setting; a few timed updates of the Glow fit.
    t0 = study.clock()
    bench, bench_path = _bench(study, base, shape, glow or opts.glow_config)
    _phase(study, "bench", t0)
    rows = {r["method"]: r for r in bench["models"][base.model.name]["rows"] if r["impl"] == "ours"}
    ms = {row: rows[row]["ms_per_step"] for row in ROWS}
    total = base.train.batch_labeled + base.train.batch_unlabeled
    n_eval = len(dataset.x_test) + base.data.num_validation
    sizing = {
        # An evaluation costs at most training on as many images: sup-160's ms per image.
        "eval_s": n_eval * rows[f"sup-{total}"]["ms_per_step"] / total / 1e3,
        "overhead_s": opts.job_overhead_s,
        "safety": opts.safety,
        "max_steps": opts.max_steps,
        "min_steps": opts.min_steps,
    }
    fitting = {}
    if fit_cfg is not None:
        t0 = study.clock()
        fit_ms = time_fit_step(fit_cfg, dataset.x_train, study.device)
        tc = fit_cfg.train
        n_test = tc.final_eval_images or len(dataset.x_test)
        # Its final evaluation: about one update's time per batch of test images.
        fit_eval_s = n_test / tc.batch_size * fit_ms / 1e3
        fitting = {"fit_ms": fit_ms, "fit_steps": tc.steps, "fit_eval_s": fit_eval_s}
        _phase(study, "fit-timing", t0)

    # 3. The plan, before anything trains.
    plan = plan_study(
        opts.budget_s, study.clock(), ms, fit_share=opts.fit_share, **fitting, **sizing
    )
    log(plan.text())
    atomic_write_text(out / "plan.json", json.dumps(plan.to_dict(), indent=1) + "\n")
    first = plan

    # 4. The Glow fit; then the rule again with the time really left (nothing has trained yet).
    fit_results = None
    if fit_cfg is not None:
        fit_results = _fit_glow(study, base, plan.fit_steps)
        glow = str(Path(fit_results["checkpoint"]))
        plan = plan_study(opts.budget_s, study.clock(), ms, **sizing)
        plan.fit_steps, plan.ms_per_step["glow-fit"] = first.fit_steps, fitting["fit_ms"]
        if plan.steps != first.steps:
            log(f"re-planned after the fit: every method {plan.steps:,} updates")

    # 5. The three runs, then `lvat report` over them.
    runs = [_train_row(study, row, plan, ms[row], glow) for row in ROWS]
    t0 = study.clock()
    from lvat.analysis.report import write_report

    write_report([r["run"] for r in runs], out / "report")
    _phase(study, "report", t0)

    # 6. The summary, with the hardware beside every number.
    summary = {
        "study": "lvat gpu-study",
        "options": asdict(opts),
        "budget_s": opts.budget_s,
        "total_s": round(study.clock(), 2),
        "within_budget": study.clock() <= opts.budget_s,
        "seconds": study.spent,
        "plan": plan.to_dict(),
        "first_plan": first.to_dict(),
        "setting": {
            "dataset": dataset.name,
            "image_shape": list(shape),
            "model": base.model.name,
            "num_labeled": base.data.num_labeled,
            "num_validation": base.data.num_validation,
            "batch_labeled": base.train.batch_labeled,
            "batch_unlabeled": base.train.batch_unlabeled,
            "configs": opts.configs,
        },
        "bench": {
            "path": str(bench_path),
            "options": bench["options"],
            "matmul_peak_tflops": bench["matmul_peak"]["tflops"],
            "rows": bench["models"][base.model.name]["rows"],
            "environment": bench["environment"],
        },
        "glow": {"source": glow, "fit": _fit_entry(fit_results, plan)},
        "runs": runs,
        "report": str(out / "report.md"),
        "environment": env,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    log(f"wrote {out / 'summary.md'}, {out / 'summary.json'} and {out / 'report.md'}")
    if opts.archive:
        log(f"wrote {pack(opts.archive, [out, bench_path])}")
    log(
        f"gpu-study took {summary['total_s']:.0f} s of the {opts.budget_s:g} s budget"
        + ("" if summary["within_budget"] else " (OVER BUDGET)")
    )
    return summary


def _bench(study: _Study, base: Config, shape: tuple, glow: str) -> tuple[dict, Path]:
    """`lvat bench` of the study's setting, written at once (bench/cuda.json on CUDA)."""
    from lvat.bench import BenchOptions, run_bench
    from lvat.bench import write_report as write_bench

    opts, device = study.opts, study.device
    cuda = device.type == "cuda"
    bench = BenchOptions(
        models=(base.model.name,),
        methods=ROWS,
        device=str(device),
        batch_labeled=base.train.batch_labeled,
        batch_unlabeled=base.train.batch_unlabeled,
        repeats=opts.bench_repeats if opts.bench_repeats is not None else (3 if cuda else None),
        amp=base.train.amp,
        channels_last=base.train.channels_last,
        compile="on" if base.train.compile else "off",
        exact=False,
        naive=opts.bench_naive,
        seed=base.seed,
        image_shape=",".join(map(str, shape)),
        transformers=(f"glow={glow}",),
    )
    report = run_bench(bench, study.log)
    default = "bench/cuda.json" if cuda else study.out / f"bench-{device.type}.json"
    path = write_bench(report, opts.bench_out or default)
    study.log(f"wrote {path}")
    return report, path


def _fit_glow(study: _Study, base: Config, steps: int) -> dict:
    from lvat.fit import fit, summary

    t0 = study.clock()
    cfg = _fit_config(study, base, study.opts.glow_config, steps)
    study.log(f"[glow] {steps:,} updates -> {cfg.out}")
    results = fit(cfg)
    study.log(f"[glow] {summary(results)} ({_phase(study, 'glow-fit', t0):.0f} s in all)")
    return results


def _train_row(study: _Study, row: str, plan: Plan, ms: float, glow: str) -> dict:
    """Train one method with the plan's updates; its entry in summary.json."""
    from lvat.train import train

    values: dict[str, object] = {
        "train.steps": plan.steps,
        "train.decay_steps": plan.decay_steps,
        "train.eval_every": plan.eval_every,
        "train.checkpoint_every": plan.steps,
        "train.log_every": max(1, min(100, plan.steps // 20)),
    }
    if row == "lvat-glow":
        values["method.transformer"] = glow
    cfg = study.config(row, **values)
    t0 = study.clock()
    study.log(f"[{row}] {plan.steps:,} updates -> {cfg.out}")
    results = train(cfg)
    job_s = _phase(study, row, t0)
    val = results.get("validation_error")
    study.log(
        f"[{row}] test error {results['test_error']:.2f}%"
        + (f", validation {val:.2f}%" if val is not None else "")
        + f"; {results['wall_time_s']:.0f} s training, {job_s:.0f} s in all"
    )
    return {
        "method": row,
        "eps": cfg.method.eps if cfg.method.name != "sup" else None,
        "steps": results["steps"],
        "decay_steps": cfg.train.decay_steps,
        "test_error": results["test_error"],
        "validation_error": val,
        "wall_time_s": results["wall_time_s"],
        "job_s": job_s,
        "estimated_s": round(plan.seconds[row], 1),
        "bench_ms_per_step": ms,
        "measured_ms_per_step": round(1e3 * results["wall_time_s"] / results["steps"], 3),
        "fast_path": {k: results.get(k) for k in ("amp", "channels_last", "compile")},
        "transformer": cfg.method.transformer or None,
        "config": {
            "xi": cfg.method.xi,
            "power_method": cfg.method.power_method,
            "power_iterations": cfg.method.power_iterations,
            "amp": cfg.train.amp,
        },
        "run": cfg.out,
        "hardware": results["hardware"],
        "versions": results["versions"],
    }


def _hardware(env: dict) -> str:
    """ "NVIDIA H200 (cuda), torch 2.11.0, CUDA 13.0" from `lvat.environment.environment`."""
    hw, v = env["hardware"], env["versions"]
    n = hw["torch_threads"]
    what = hw.get("gpu") or f"{hw['cpu']}, {n} thread{'' if n == 1 else 's'}"
    cuda = f", CUDA {v['cuda']}" if v.get("cuda") else ""
    return f"{what} ({hw['device']}), torch {v['torch']}{cuda}"


def _fit_config(study: _Study, base: Config, glow_config: str, steps: int | None = None):
    """The Glow fit config: the pinned file on the classifier's data and padding, in OUT/glow;
    with `steps`, sized (warm-up cut in proportion, one evaluation and checkpoint at the end)."""
    from lvat.fit import fit_config

    if not Path(glow_config).is_file():
        raise LvatError(f"--glow-config {glow_config} not found (run from the repository root)")
    keys: dict[str, object] = {
        "data.name": base.data.name,
        "data.root": base.data.root,
        "data.pad_to": base.data.pad_to,
        "device": str(study.device),
        "out": str(study.out / "glow"),
    }
    cfg = fit_config("glow", glow_config, to_flags(keys))
    if steps is None:
        return cfg
    tc = cfg.train
    keys |= {
        "train.steps": steps,
        "train.warmup_steps": tc.warmup_steps * steps // tc.steps,
        "train.eval_every": steps,
        "train.checkpoint_every": steps,
        "train.log_every": min(tc.log_every, steps),
    }
    return fit_config("glow", glow_config, to_flags(keys))


def time_fit_step(cfg, x_train: torch.Tensor, device: torch.device) -> float:
    """Median ms of one update of the fit `cfg` (a few timed updates from a fresh model)."""
    from lvat.bench.timing import median, time_steps
    from lvat.fit.setup import ImageStream, kind_of

    kind = kind_of(cfg)
    torch.manual_seed(cfg.seed)
    model = kind.build(cfg, tuple(x_train.shape[1:])).to(device).train()
    kind.initialize(model, x_train, cfg, device)
    tc = cfg.train
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    stream = ImageStream(x_train[: 4 * tc.batch_size], tc.batch_size, device=device, seed=cfg.seed)

    def step() -> None:
        loss = kind.loss(model, stream.next(), cfg)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    cuda = device.type == "cuda"
    ms = time_steps(
        step, device, warmup=3 if cuda else 1, repeats=3 if cuda else 1, steps=5 if cuda else 1
    )
    return median(ms)


def _fit_entry(results: dict | None, plan: Plan) -> dict | None:
    """The Glow fit in summary.json (None when the Glow was not fitted here)."""
    if results is None:
        return None
    keep = ("test_bpd", "test_nll", "test_nonfinite_decode_rate", "wall_time_s", "checkpoint")
    return {
        "steps": plan.fit_steps,
        "timed_ms_per_step": plan.ms_per_step["glow-fit"],
        **{k: results.get(k) for k in keep},
        "hardware": results["hardware"],
        "versions": results["versions"],
    }


def summary_markdown(s: dict) -> str:
    """summary.md: the runs' numbers and the bench's, each table row with its hardware."""
    env, st, plan = s["environment"], s["setting"], s["plan"]
    hw = _hardware(env)
    dec = plan["decay_steps"]
    lines = [
        f"# GPU study: {st['dataset']} {'x'.join(map(str, st['image_shape']))}, {st['model']}, "
        f"{st['num_labeled']} labels",
        "",
        f"Measured on {hw}; {env['hardware']['cpu']}, {env['hardware']['cpu_count']} CPUs; "
        f"lvat {env['versions']['lvat']}, Python {env['versions']['python']}. One label seed, "
        f"{plan['steps']:,} updates per method (lr decay over the last {dec:,}; the paper runs "
        "48,000): a check of the recipe at this budget, not Table 3. Configs: "
        f"{st['configs']}; `lvat report`: {s['report']}.",
        "",
        f"Budget {s['budget_s']:g} s; took {s['total_s']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items())
        + ").",
        "",
        "| method | eps | updates | test error % | validation error % | training s "
        "| bench ms/update | measured ms/update | hardware |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["runs"]:
        eps = "–" if r["eps"] is None else f"{r['eps']:g}"
        val = "–" if r["validation_error"] is None else f"{r['validation_error']:.2f}"
        where = r["hardware"].get("gpu") or r["hardware"]["cpu"]
        lines.append(
            f"| {r['method']} | {eps} | {r['steps']:,} | {r['test_error']:.2f} | {val} | "
            f"{r['wall_time_s']:.1f} | {r['bench_ms_per_step']:.2f} | "
            f"{r['measured_ms_per_step']:.2f} | {where}, torch {r['versions']['torch']} |"
        )
    g = s["glow"]
    if g["fit"] is not None:
        f = g["fit"]
        where = f["hardware"].get("gpu") or f["hardware"]["cpu"]
        lines += [
            "",
            f"Glow for LVAT-Glow fitted here: {f['steps']:,} updates in {f['wall_time_s']:.1f} s, "
            f"test {f['test_bpd']:.3f} bits/dim, non-finite decodes at eps 1: "
            f"{f['test_nonfinite_decode_rate']:.1%} ({where}, torch {f['versions']['torch']}).",
        ]
    else:
        lines += ["", f"Glow for LVAT-Glow: {g['source']} (not fitted here)."]
    b = s["bench"]
    o = b["options"]
    bhw = _hardware(b["environment"])
    lines += [
        "",
        f"Bench ({b['path']}; {bhw}; amp {o['amp']}, channels-last {o['channels_last']}, "
        f"compile {o['compile']}; median of {o['repeats']} x {o['steps_per_repeat']} updates "
        f"after {o['warmup']} warm-up; matmul peak {b['matmul_peak_tflops']:.3g} TFLOP/s):",
        "",
        "| row | impl | ms/update | images/s | TFLOP/s | x conv floor | hardware |",
        "|---|---|---|---|---|---|---|",
    ]
    short = b["environment"]["hardware"].get("gpu") or b["environment"]["hardware"]["cpu"]
    for r in b["rows"]:
        lines.append(
            f"| {r['method']} | {r['impl']} | {r['ms_per_step']:.2f} | {r['images_per_s']:.0f} | "
            f"{r['tflops']:.3f} | {r['times_conv_floor']:.2f} | {short} |"
        )
    return "\n".join(lines) + "\n"


def pack(archive: str | Path, paths: list[Path]) -> Path:
    """A .tar.gz of the files under `paths` except checkpoints, locks and temporary files, each
    named relative to the working folder where it lies beneath it."""
    archive = Path(archive).resolve()
    archive.parent.mkdir(parents=True, exist_ok=True)
    here = Path.cwd().resolve()
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    with tarfile.open(archive, "w:gz") as tar:
        for f in files:
            full = f.resolve()
            if not f.is_file() or f.name in SKIP or f.name.startswith(".") or full == archive:
                continue
            name = full.relative_to(here) if full.is_relative_to(here) else full.relative_to("/")
            tar.add(f, arcname=str(name))
    return archive
