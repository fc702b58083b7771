"""The `lvat` command line. Each sub-command is a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from lvat.errors import LvatError


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

    from lvat.config import Config, from_dict, load_config
    from lvat.config.core import _merge, parse_overrides
    from lvat.train import checkpoint, train

    if args.resume:
        if args.config:
            raise LvatError("--resume RUN_DIR takes its config from the run; drop --config")
        saved = checkpoint.load(Path(args.resume) / checkpoint.CHECKPOINT)["config"]
        cfg = from_dict(Config, _merge(saved, parse_overrides(rest, Config)))
        cfg.out = args.resume
    else:
        cfg = load_config(Config, args.config, rest)
    results = train(cfg, resume=bool(args.resume))
    print(
        f"{cfg.method.name} on {results['dataset']}: test error {results['test_error']:.2f}% "
        f"after {results['steps']} steps ({results['wall_time_s']:.0f} s); run folder {cfg.out}"
    )
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


def _official() -> tuple[str, ...]:
    from lvat.data import DATASETS

    return tuple(DATASETS)


def _config_help(cls_path: str) -> str:
    from lvat import config

    return "config keys (flags override the file):\n" + config.help_text(getattr(config, cls_path))


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_config_help("Config"),
    )
    tr.add_argument("--config", default=None, help="TOML or YAML config file")
    tr.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR exactly where its checkpoint stopped",
    )
    tr.set_defaults(func=_cmd_train, takes_overrides=True)
    ev = sub.add_parser("eval", help="evaluate a run's classifier on test (and validation)")
    ev.add_argument("run_dir", help="a run folder written by `lvat train`")
    ev.add_argument("--device", default=None, help="device (default: the run's)")
    ev.set_defaults(func=_cmd_eval)

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
    except LvatError as exc:
        print(f"lvat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lvat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
