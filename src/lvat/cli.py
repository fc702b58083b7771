"""The `lvat` command line. Each sub-command is a thin layer over the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from lvat.config.flags import add_flags, flag, from_flags
from lvat.errors import LvatError, one_line


def _cmd_data_check(args: argparse.Namespace) -> int:
    from lvat.data import load_dataset

    ds = load_dataset(args.name, args.root, download=False, verify=not args.no_verify)
    checked = "MD5 verified" if not args.no_verify and args.name in _official() else "read"
    print(f"{ds.name}: {len(ds.classes)} classes, from {ds.source} ({checked})")
    for split in ("train", "test"):
        x = getattr(ds, f"x_{split}")
        c, h, w = x.shape[1:]
        print(f"  {split}: {len(x)} images of {c}x{h}x{w} uint8")
        counts = ds.class_counts(split)
        for name, n in zip(ds.classes, counts, strict=True):
            print(f"    {name:>12}: {n}")
        if min(counts) == 0:
            print(f"    warning: {counts.count(0)} class(es) have no {split} images")
    print(f"  fingerprint: {ds.fingerprint}")
    print("OK")
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from lvat.data import load_dataset

    ds = load_dataset(args.name, args.root, download=True, verify=True)
    print(f"{ds.name}: {len(ds.x_train)} train / {len(ds.x_test)} test images in {ds.source}")
    print("OK")
    return 0


def _cmd_config(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from lvat.config import Config, dumps_toml, load_config

    print(dumps_toml(load_config(Config, args.config, rest)), end="")
    return 0


def _cmd_train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from pathlib import Path

    from lvat.config import Config, load_config
    from lvat.config.core import resume_config
    from lvat.train import checkpoint, train

    if args.resume:
        if args.config:
            raise LvatError("--resume RUN_DIR takes its config from the run; drop --config")
        path = Path(args.resume) / checkpoint.CHECKPOINT
        state = checkpoint.load_training(path, checkpoint.RESUME_KEYS)
        cfg = resume_config(Config, dict(state["config"]), rest, args.resume)
    else:
        cfg = load_config(Config, args.config, rest)
    from lvat.train.distributed import finish_worker

    results = train(cfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line for the whole job
        print(
            f"{cfg.method.name} on {results['dataset']}: test error {results['test_error']:.2f}% "
            f"after {results['steps']} steps ({results['wall_time_s']:.0f} s); run folder "
            f"{cfg.out}"
        )
    finish_worker()  # under torchrun: leave together and exit here
    return 0


def _cmd_fit(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from lvat.fit import fit, fit_config, summary

    cfg = fit_config(args.kind, args.config, rest, dataset=args.dataset, resume=args.resume)
    print(summary(fit(cfg, resume=bool(args.resume))))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lvat.train import evaluate_run, load_run

    run = load_run(args.run_dir, args.device)
    res = evaluate_run(run)
    print(f"{run.path} (step {run.step}, {run.config.method.name}, {run.dataset.name})")
    for split in ("validation", "test"):
        if f"{split}_error" in res:
            acc = ", ".join(f"{a:.1f}" for a in res[f"{split}_per_class_accuracy"])
            print(
                f"  {split}: error {res[f'{split}_error']:.2f}% on {res[f'{split}_count']} "
                f"images; per-class accuracy % [{acc}]"
            )
    return 0


def _add_resume(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help=f"continue the {what} in RUN_DIR exactly where its checkpoint stopped",
    )


def _cmd_report(args: argparse.Namespace) -> int:
    from lvat.analysis.report import write_report

    pairs = []
    for text in args.paired:
        a, sep, b = text.partition(":")
        if not (sep and a.strip() and b.strip()):
            raise LvatError(f"--paired {text!r}: give two row names as 'ROW A:ROW B'")
        pairs.append((a.strip(), b.strip()))
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise LvatError(
                f"--seeds {args.seeds!r}: give seeds as integers, e.g. 1,2,3,4"
            ) from None
    report, markdown = write_report(args.run_dirs, args.out, args.metric, pairs, args.chosen, seeds)
    print(markdown, end="")
    n = sum(c.n for c in report.cells)
    print(
        f"{n} finished runs in {len(report.cells)} cells, {len(report.unfinished)} unfinished; "
        f"wrote {args.out}.md and {args.out}.csv"
        + (f" and {args.out}_curves.png" if any(c.mean_curve()[0] for c in report.cells) else "")
    )
    return 0


@dataclass
class FiguresOptions:
    """`lvat figures`: the arguments of `lvat.analysis.figures.make_figures`."""

    run_dir: str
    """a VAT or LVAT run folder written by `lvat train` (or an `lvat fit` folder: its curves)"""
    samples: int = flag(5000, metavar="N")
    """random test images (5000)"""
    eps_vat: float | None = flag(None, metavar="X")
    """VAT eps marked in Fig. 2 for LVAT (2.5)"""
    transformer: str | None = flag(None, metavar="CKPT")
    """VAE/Glow checkpoint for a VAT run"""
    seed: int = 0
    """seed for images and perturbations"""
    batch_size: int | None = flag(None, metavar="B")
    """default: the run's batch_unlabeled"""
    device: str | None = None
    """device (default: the run's)"""


def _cmd_figures(args: argparse.Namespace) -> int:
    from lvat.analysis.figures import fit_curves, is_fit_run, make_figures, summary_text

    if is_fit_run(args.run_dir):  # a transformer: its training and test curves
        info = fit_curves(args.run_dir)
        last = {name: values[-1] for name, _, values in info["test"]}
        print(f"{info['run']}: test {last or 'not evaluated yet'}; wrote {info['png']}")
        return 0
    print(summary_text(make_figures(**asdict(from_flags(FiguresOptions, args)))))
    return 0


@dataclass
class DiagnoseOptions:
    """`lvat diagnose`: the arguments of `lvat.analysis.directions.diagnose_run`."""

    run_dir: str
    """a VAT or LVAT run folder written by `lvat train`"""
    images: int = flag(256, metavar="N")
    """test images (256)"""
    batch_size: int | None = flag(None, metavar="B")
    """default: the run's batch_unlabeled"""
    reference_iterations: int = flag(30, metavar="K")
    """exact float64 products for the top eigenvector (30)"""
    seed: int = 0
    """seed for images and the random d"""
    xi: float | None = None
    """judge this xi instead of the run's"""
    power_method: Literal["finite-difference", "exact"] | None = None
    """judge this power method instead of the run's"""
    amp: Literal["off", "bf16"] = "off"
    """the direction under bf16 autocast"""
    out: str | None = None
    """folder for the report (default RUN_DIR/diagnostics)"""
    device: str | None = None
    """device (default: the run's)"""
    transformer: str | None = flag(None, metavar="CKPT")
    """judge LVAT's latent direction with this VAE/Glow on the run's classifier (any run)"""


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from lvat.analysis.directions import diagnose_run, summary_line

    info = diagnose_run(**asdict(from_flags(DiagnoseOptions, args)))
    print(summary_line(info))
    print(f"wrote {info['files']['json']}, {info['files']['png']} and {info['files']['pdf']}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from lvat.fit.export import export_run, read_card

    path = export_run(args.run_dir, args.out, name=args.name, command=args.command)
    card = read_card(path)
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {path.with_suffix('.json')}: "
        f"{card['kind']}, {card['steps_total']} steps, check recon MSE "
        f"{card['check']['recon_mse']:.5f} on {card['check']['images']} test images"
    )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from lvat.experiments.sweep import parse_shard, sweep

    shard = parse_shard(args.shard)
    failed = sweep(args.file, shard=shard, dry_run=args.dry_run, only=args.only, wait=args.wait)
    if failed:
        print(f"lvat: {failed} job(s) failed; fix them and re-run to continue", file=sys.stderr)
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lvat.experiments.demo import demo

    demo(args.out, workers=args.workers, lr=args.lr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from lvat.bench import run_bench, write_report
    from lvat.bench.suite import METHODS, MODELS, BenchOptions
    from lvat.train.setup import resolve_device

    opts = from_flags(BenchOptions, args)
    for what, given, known in (("model", opts.models, MODELS), ("method", opts.methods, METHODS)):
        if not given or set(given) - set(known):
            raise LvatError(f"--{what}s: choose from {', '.join(known)}; got {','.join(given)}")
    out = args.out or f"bench/{resolve_device(args.device).type}.json"
    print(f"wrote {write_report(run_bench(opts), out)}")
    return 0


def _cmd_gpu_study(args: argparse.Namespace) -> int:
    from lvat.experiments.gpu_study import GpuStudyOptions, run_study

    run_study(from_flags(GpuStudyOptions, args))
    return 0


def _official() -> tuple[str, ...]:
    from lvat.data import DATASETS

    return tuple(DATASETS)


def _config_help(cls: str | type) -> str:
    """The config keys of `cls` (a class, or its name in `lvat.config`) for an epilog."""
    from lvat import config

    cls = getattr(config, cls) if isinstance(cls, str) else cls
    return "config keys (flags override the file):\n" + config.help_text(cls)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvat",
        description="Latent space Virtual Adversarial Training (LVAT) and VAT for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="check or download datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    names = "svhn, cifar10, fashion-mnist, mnist, or a path to an .npz file / image folder"
    check = data_sub.add_parser(
        "check",
        help="verify a dataset's files and print its splits, shapes and class counts",
        description="Verify a dataset's files (MD5 for official ones), then print per split the "
        "number of images, their shape and the per-class counts, then OK.",
    )
    check.add_argument("name", help=names)
    check.add_argument("--root", default="", help="folder with the files (default: search)")
    check.add_argument("--no-verify", action="store_true", help="skip MD5 checks")
    check.set_defaults(func=_cmd_data_check)
    dl = data_sub.add_parser("download", help="download an official dataset into the cache")
    dl.add_argument("name", help="svhn, cifar10, fashion-mnist or mnist")
    dl.add_argument("--root", default="", help="download here instead of the cache")
    dl.set_defaults(func=_cmd_data_download)

    tr = sub.add_parser(
        "train",
        help="train a classifier (sup, VAT or LVAT; SL or SSL)",
        usage="lvat train [--config FILE | --resume RUN_DIR] [--key value ...]",
        description="Train a classifier. Data-parallel on N processes (GPUs, or CPU with gloo):\n"
        "  torchrun --nproc_per_node N -m lvat train [...]\n"
        "train.batch_* are then global batches (each process takes 1/N); rank 0 writes the run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_help("Config"),
    )
    tr.add_argument("--config", default=None, help="TOML or YAML config file")
    _add_resume(tr, "run")
    tr.set_defaults(func=_cmd_train, takes_overrides=True)
    from lvat.models.registry import KINDS, kinds_text

    fit = sub.add_parser(
        "fit",
        help=f"train a transformer for LVAT: {kinds_text(', ')}",
        description=f"Train the transformer ({kinds_text()}) whose latent space LVAT perturbs, on "
        "all training images (labels ignored); evaluate on test images; write PNG grids and a "
        "checkpoint that `--method.transformer` accepts. See "
        + ", ".join(f"`lvat fit {k} --help`" for k in KINDS)
        + ".",
    )
    fit_sub = fit.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind in KINDS.values():
        what = kind.help or f"the {kind.display or kind.name}"
        size = (
            f" H and W must be divisible by {kind.divisible}, so 28x28 images need "
            "--data.pad_to 32, and the classifier run must then use the same data.pad_to."
            if kind.divisible
            else ""
        )
        fk = fit_sub.add_parser(
            kind.name,
            help=f"train {what}",
            usage=f"lvat fit {kind.name} [--config FILE | --resume RUN_DIR] [--dataset NAME] "
            "[--key value ...]",
            description=f"Train {what}.{size} The data.num_labeled / num_validation / split keys "
            "are ignored: every training image is used, labels ignored.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=_config_help(kind.config),
        )
        fk.add_argument("--config", default=None, help="TOML or YAML config (configs/fit/)")
        fk.add_argument("--dataset", default=None, metavar="NAME", help="same as --data.name")
        _add_resume(fk, "fit")
        fk.set_defaults(func=_cmd_fit, takes_overrides=True)

    ex = sub.add_parser(
        "export",
        help="a finished `lvat fit` run as .safetensors weights with a JSON model card",
        description="Write the transformer of a finished `lvat fit` run as OUT.safetensors (no "
        "pickle: safe to exchange) and its model card OUT.json: architecture, data fingerprint, "
        "config, every training segment (steps, batch, wall time, hardware, command; a fit that "
        "continued from other weights with --train.init keeps their history), test metrics and "
        "a reconstruction check on the first 64 test images. Put it in a folder of "
        "$LVAT_WEIGHTS as DATASET/KIND.safetensors to load it by name.",
    )
    ex.add_argument("run_dir", help="a finished run folder written by `lvat fit`")
    ex.add_argument("--out", required=True, help="the weights file, ending in .safetensors")
    ex.add_argument("--name", default="", help="name on the card, e.g. fashion-mnist/vae")
    ex.add_argument(
        "--command", default="", help="the exact `lvat fit` command of this run, for the card"
    )
    ex.set_defaults(func=_cmd_export)
    ev = sub.add_parser("eval", help="evaluate a run's classifier on test (and validation)")
    ev.add_argument("run_dir", help="a run folder written by `lvat train`")
    ev.add_argument("--device", default=None, help="device (default: the run's)")
    ev.set_defaults(func=_cmd_eval)
    rep = sub.add_parser(
        "report",
        help="Table 3: mean ± std test error over seeds per method and setting, vs the paper",
        description="Group finished runs into the cells of the paper's Table 3 (method x "
        "dataset, augmentation, SSL/SL); print a Markdown table and write PREFIX.md and "
        "PREFIX.csv. Unfinished runs are listed, not averaged.",
    )
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders or parents")
    rep.add_argument("--out", default="report", metavar="PREFIX", help="default: ./report")
    rep.add_argument(
        "--metric",
        choices=("test", "validation"),
        default="test",
        help="test error (Table 3; default) or validation error (for choosing eps)",
    )
    rep.add_argument(
        "--paired",
        action="append",
        default=[],
        metavar="'A:B'",
        help="also row A minus row B, seed by seed, with a 95%% confidence interval (repeatable;"
        " rows as printed, e.g. 'LVAT-VAE:VAT')",
    )
    rep.add_argument(
        "--chosen",
        action="store_true",
        help="after an eps search: one row per method, each column at the eps with the most "
        "finished runs (the chosen one, run with every seed), that eps shown in the cell",
    )
    rep.add_argument(
        "--seeds",
        metavar="LIST",
        help="only runs whose seed is in LIST (e.g. 1,2,3,4: leave out the seed an eps search "
        "ran on, whose result chose eps)",
    )
    rep.set_defaults(func=_cmd_report)
    fig = sub.add_parser(
        "figures",
        help="Figs. 2-4, training curves and Dec(Enc(x)) accuracy of a VAT/LVAT run",
        description="Write PNG and PDF figures and figures.json into RUN_DIR/figures/: "
        "histogram of ||x - x_adv|| (Fig. 2), image grids (Fig. 3), adversarial vs reconstruction "
        "distances (Fig. 4), training curves; print accuracy on x vs Dec(Enc(x)).",
    )
    add_flags(fig, FiguresOptions)
    fig.set_defaults(func=_cmd_figures)
    diag = sub.add_parser(
        "diagnose",
        help="how close a VAT/LVAT run's perturbation direction is to what the method means",
        description="Per test image, the cosine of the run's direction with the same "
        "computation in float64, with the top eigenvector of the curvature (exact float64 "
        "power iteration), float64 finite difference vs exact, and (LVAT) the first-order "
        "term. Writes RUN_DIR/diagnostics/directions.{json,png,pdf}; see docs/numerics.md.",
    )
    add_flags(diag, DiagnoseOptions)
    diag.set_defaults(func=_cmd_diagnose)
    bench = sub.add_parser(
        "bench",
        help="time training steps of sup, VAT, LVAT-VAE, LVAT-Glow against a naive port",
        description="Time training steps (batches 32 labeled + 128 unlabeled) of conv-large on "
        "3x32x32 and conv-small on 1x32x32 on this device, ours and a naive PyTorch port side "
        "by side, with a supervised sup-160 reference row; print ms/step, images/s, TFLOP/s "
        "against the matmul peak measured in the same run, the conv-rate floor, and whether "
        "the speed targets are met; write a JSON with hardware and versions. VAE and Glow are "
        "random-init: timing needs no trained weights.",
    )
    from lvat.bench.suite import BenchOptions

    add_flags(bench, BenchOptions)
    bench.add_argument("--out", default=None, help="JSON report (default: bench/DEVICE.json)")
    bench.set_defaults(func=_cmd_bench)

    sw = sub.add_parser(
        "sweep",
        help="run a grid of fits and trainings from one file (skips done, resumes interrupted)",
    )
    sw.add_argument("file", help="sweep file, e.g. configs/sweeps/table3.toml")
    sw.add_argument("--dry-run", action="store_true", help="list the jobs and their status only")
    sw.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="run only jobs I, I+N, I+2N, ... (0 <= I < N), to spread over machines",
    )
    sw.add_argument(
        "--only",
        default="",
        metavar="GLOB",
        help="run only the jobs whose run folder matches, e.g. 'lvat-glow/*100_*' (before --shard)",
    )
    sw.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when only waiting jobs are left while another process (shard) runs a job of this "
        "sweep, plan again every SECONDS instead of returning (not for a choice only an edit "
        "of the sweep file can make)",
    )
    sw.set_defaults(func=_cmd_sweep)
    from lvat.experiments.gpu_study import GpuStudyOptions

    gs = sub.add_parser(
        "gpu-study",
        help="sup / VAT / LVAT-Glow on one GPU in a time budget, sized by a first lvat bench",
        description="The paper's recipe (configs/gpu-study: Fashion-MNIST padded to 32x32, "
        "conv-large, batches 32 + 128) for sup, VAT and LVAT-Glow within a wall-time budget: "
        "lvat bench of that setting first (bench/cuda.json on CUDA), a short Glow fit unless "
        "weights ship, the same number of updates for every method sized from the bench, "
        "lvat report, and OUT/summary.{json,md} with the hardware beside every number. The "
        "plan is printed before anything trains.",
    )
    add_flags(gs, GpuStudyOptions)
    gs.set_defaults(func=_cmd_gpu_study)
    dm = sub.add_parser(
        "demo",
        help="Fashion-MNIST on CPU: sup/vat/lvat-vae/lvat-glow compared (shipped transformers)",
    )
    dm.add_argument("--out", default="runs/demo", help="folder for the demo's runs")
    dm.add_argument(
        "--lr", type=float, default=1e-3, help="Adam's learning rate of every run (paper: 1e-3)"
    )
    dm.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes, sharing the cores (default: one per core, at most four)",
    )
    dm.set_defaults(func=_cmd_demo)

    cfg = sub.add_parser(
        "config",
        help="print the resolved training config (file, then --key value flags)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_help("Config"),
    )
    cfg.add_argument("--config", default=None, help="TOML or YAML config file")
    cfg.set_defaults(func=_cmd_config, takes_overrides=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lvat` console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    func: Callable = args.func
    try:
        if getattr(args, "takes_overrides", False):
            return func(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return func(args)
    except LvatError as exc:  # input, not a bug: one line that says what to do, no traceback
        print(f"lvat: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lvat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lvat ... | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
