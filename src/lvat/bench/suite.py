"""`lvat bench`: time training steps of sup, VAT, LVAT-VAE and LVAT-Glow, ours vs a naive port.

Per classifier setting (conv-large on 3x32x32, conv-small on 1x32x32 = Fashion-MNIST padded)
and per method, one row for our step (`lvat.train.step.train_step` on device-resident batches,
the fast path resolved for the device) and one for the naive baseline (`lvat.bench.naive`),
plus a `sup-160` reference: a plain supervised step over all 32 + 128 images. Images are random
uint8 and the VAE/Glow are random-init (Glow's ActNorm initialised on one batch): a step costs
the same with trained weights. `image_shape` and `transformers` time another setting instead
(e.g. conv-large on 1x32x32 with the Glow of an `lvat fit` config, as `lvat gpu-study` does).
Each row reports ms/step, images/s, FLOPs per step (counted by FlopCounterMode), achieved
TFLOP/s against the matmul peak measured in the same run, and the "floor": FLOPs / the fastest
measured rate of the classifier's conv blocks, i.e. how close the step runs to what this
machine's conv kernels allow. On CUDA each row also counts the host
synchronisations of one step (sync debug mode): ours should have none.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lvat.bench.naive import NaiveData, naive_step_fn
from lvat.bench.timing import (
    Rate,
    conv_rate,
    count_flops,
    host_syncs,
    matmul_peak,
    median,
    time_steps,
)
from lvat.config import MethodConfig, TrainConfig
from lvat.config.flags import flag
from lvat.data import Batch, ImageDataset, TrainBatches, make_split
from lvat.environment import environment
from lvat.errors import ConfigError
from lvat.models import build_classifier
from lvat.models.registry import KINDS, TransformerKind
from lvat.regularizers import Method, Regularizer
from lvat.regularizers.registry import METHODS as REGISTERED
from lvat.train import fast
from lvat.train.setup import resolve_device
from lvat.train.step import STATS, train_step

MODELS = {"conv-large": (3, 32, 32), "conv-small": (1, 32, 32)}  # classifier -> image shape
# Rows: a registered method, with "-KIND" for one that needs a transformer (`parse_row`); eps
# are the registries' paper values (Method.eps, TransformerKind.eps; docs/method.md §5.2).
METHODS = ("sup", "vat", "lvat-vae", "lvat-glow")
# Performance targets: step time at most this many times sup-160's, and speedup over the naive port.
RATIO_TARGETS = {"vat": 3.0, "lvat-glow": 4.5}
NAIVE_TARGET = {"cuda": 2.0}  # elsewhere: not slower (1.0)
# On a CPU with bf16 units: speed-up of the fast path over float32 with the authors' finite
# difference (row "vat" vs "vat+f32"), and of the exact mode on the fast path over that same
# float32 finite-difference step ("vat+exact" vs "vat+f32").
CPU_FAST_TARGETS = {"vat": (1.3, 1.8), "lvat-glow": (1.3, 1.8)}
_F32 = fast.FastPath(None, False, False)
NOTE = (
    "VAE and Glow are randomly initialised (Glow: ActNorm initialised on one batch) unless "
    "--transformers names trained weights, and images are random: a training step costs the "
    "same with trained weights and real data."
)
_REFERENCE = "sup"  # the reference row "sup-N": this method on all N = labeled + unlabeled images


def _reference(total: int) -> str:
    return f"{_REFERENCE}-{total}"


@dataclass
class BenchOptions:
    """What `lvat bench` runs; None = a default chosen for the device. The field docstrings are
    `lvat bench --help` (`lvat.config.flags`)."""

    models: Sequence[str] = tuple(MODELS)
    """classifiers to time, comma-separated (conv-large on 3x32x32, conv-small on 1x32x32)"""
    methods: Sequence[str] = METHODS
    """rows to time, comma-separated (sup, vat, lvat-vae, lvat-glow)"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N"""
    batch_labeled: int = 32
    """labeled images per step (paper: 32)"""
    batch_unlabeled: int = 128
    """unlabeled images per step (paper: 128)"""
    warmup: int | None = None
    """untimed steps (CPU 1, GPU 5, or 10 with compile)"""
    repeats: int | None = None
    """timed runs (CPU 3, GPU 10)"""
    steps_per_repeat: int | None = None
    """steps per timed run (CPU 1, GPU 10)"""
    amp: Literal["auto", "off", "bf16"] = "auto"
    """train.amp of our rows (auto: bf16 on CUDA)"""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """train.channels_last of our rows (auto: on for CUDA)"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile our step (auto: on for CUDA)"""
    cache_latents: bool = False
    """add LVAT rows with train.cache_latents ("+cache")"""
    exact: bool = True
    """VAT/LVAT rows with the exact power iteration too (power_method exact, "+exact");
    --no-exact skips them"""
    naive: bool = True
    """the naive baseline rows next to ours; --no-naive skips them"""
    float32: bool = True
    """where the fast path is not plain float32 (bf16, channels-last), our rows again in float32
    ("+f32"), side by side; --no-float32 skips them"""
    peak_size: int | None = None
    """matmul n of the measured peak (CPU 1024, GPU 8192)"""
    num_images: int = 1024
    """random image pool size the batches are drawn from"""
    seed: int = 0
    """seed of the random images, split, weights and batches"""
    image_shape: str = flag("", metavar="C,H,W")
    """image shape for every model, e.g. 1,32,32 (default: conv-large 3x32x32, conv-small
    1x32x32)"""
    transformers: Sequence[str] = flag((), metavar="KIND=SOURCE")
    """the model of a transformer kind's rows, comma-separated: an `lvat fit` config (.toml or
    .yaml; random init, e.g. glow=configs/fit/fashion-mnist-glow.toml) or trained weights (a
    checkpoint, .safetensors file or shipped name) (default: each kind's paper-size model)"""


def _defaults(opts: BenchOptions, device: torch.device) -> tuple[int, int, int, bool]:
    cuda = device.type == "cuda"
    compile_on = opts.compile == "on" or (opts.compile == "auto" and cuda)
    # Plus the untimed FLOP-counting step; CPU oneDNN and cuDNN pick kernels in the first steps.
    warmup = opts.warmup if opts.warmup is not None else ((10 if compile_on else 5) if cuda else 1)
    repeats = opts.repeats if opts.repeats is not None else (10 if cuda else 3)
    steps = opts.steps_per_repeat if opts.steps_per_repeat is not None else (10 if cuda else 1)
    return warmup, repeats, steps, compile_on


def _dataset(shape: tuple[int, int, int], n: int, seed: int) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    return ImageDataset("random", [str(k) for k in range(10)], x, y, x[:10], y[:10])


def parse_row(name: str) -> tuple[Method, TransformerKind | None]:
    """A row name -> its registered method and, for one with a transformer, its kind:
    "vat" -> (VAT, None), "lvat-vae" -> (LVAT, VAE)."""
    if name in REGISTERED:
        method, kind = name, ""
    else:
        method, _, kind = name.rpartition("-")
    entry = REGISTERED[method]
    if entry.needs_transformer != bool(kind):
        need = "needs a transformer kind: NAME-KIND" if entry.needs_transformer else "has none"
        raise ConfigError(f"bench row {name!r}: {entry.display} {need}")
    return entry, KINDS[kind] if kind else None


def _eps(method: Method, kind: TransformerKind | None) -> float:
    """The paper's eps of a row (1.0 where none applies: sup)."""
    eps = method.default_eps(kind.name if kind is not None else None)
    return 1.0 if eps is None else eps


def image_shape(model: str, text: str = "") -> tuple[int, int, int]:
    """The image shape of a model's rows: "C,H,W" when given, else the model's (`MODELS`)."""
    if not text:
        return MODELS[model]
    try:
        c, h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(f"--image-shape {text!r}: expected C,H,W, e.g. 1,32,32") from None
    if min(c, h, w) < 1:
        raise ConfigError(f"--image-shape {text!r}: every size must be >= 1")
    return c, h, w


def transformer_sources(pairs: Sequence[str]) -> dict[str, str]:
    """ "KIND=SOURCE" pairs -> {kind: source}, each kind registered and named once."""
    out: dict[str, str] = {}
    for pair in pairs:
        kind, sep, source = pair.partition("=")
        if not sep or not source or kind not in KINDS or kind in out:
            raise ConfigError(
                f"--transformers {pair!r}: expected KIND=SOURCE once per kind, KIND one of "
                f"{', '.join(KINDS)}"
            )
        out[kind] = source
    return out


def _transformer(
    kind: TransformerKind, shape: tuple[int, int, int], x: torch.Tensor, device, source: str = ""
) -> nn.Module:
    """The kind's model, frozen: from trained weights when `source` names them; else built from
    the `lvat fit` config `source` (default: the kind's paper-size default config), random init
    plus its data-dependent init (Glow's ActNorm) on the first 128 images."""
    if source and not source.endswith((".toml", ".yaml", ".yml")):
        from lvat.models.transformers import load_transformer

        return load_transformer(source, device)
    if source:
        from lvat.fit import fit_config

        cfg = fit_config(kind.name, source)
    else:
        cfg = kind.config()
    model = kind.build(cfg, shape)
    kind.initialize(model, x[:128], cfg, torch.device("cpu"))
    return model.to(device).eval().requires_grad_(False)


@dataclass
class Row:
    name: str  # method, or "sup-N": supervised over all N = labeled + unlabeled images
    impl: str  # "ours" or "naive"
    images: int  # images per step through the loss
    flops: int
    ms: list[float]
    notes: list[str] = field(default_factory=list)
    host_syncs: int | None = None  # per step, from CUDA's sync debug mode; None off CUDA

    @property
    def ms_median(self) -> float:
        return median(self.ms)

    def to_dict(self, peak: Rate, conv: Rate) -> dict:
        ms = self.ms_median
        achieved = self.flops / (ms * 1e-3)
        floor_ms = self.flops / conv.flops_per_s * 1e3
        return {
            "method": self.name,
            "impl": self.impl,
            "ms_per_step": ms,
            "ms_all": self.ms,
            "images_per_s": self.images / (ms * 1e-3),
            "flops_per_step": self.flops,
            "tflops": achieved / 1e12,
            "fraction_of_matmul_peak": achieved / peak.flops_per_s,
            "conv_floor_ms": floor_ms,
            "times_conv_floor": ms / floor_ms,
            "host_syncs_per_step": self.host_syncs,
            "notes": self.notes,
        }


class _Setting:
    """One classifier setting: data, split, transformers, and builders of each row's step."""

    def __init__(self, model: str, opts: BenchOptions, device: torch.device, fp: fast.FastPath):
        self.model, self.opts, self.device, self.fast = model, opts, device, fp
        self.shape = image_shape(model, opts.image_shape)
        self.sources = transformer_sources(opts.transformers)
        self.data = _dataset(self.shape, opts.num_images, opts.seed)
        n_lab = max(10, math.ceil(opts.batch_labeled * 3 / 10) * 10)  # >= batch, class-balanced
        self.split = make_split(
            self.data.y_train.numpy(), n_lab, opts.seed, fingerprint=self.data.fingerprint
        )

    def transformer(self, kind: TransformerKind) -> nn.Module:
        """A fresh one per row (same seed, same weights): `fast.apply` may compile its decode."""
        torch.manual_seed(self.opts.seed)
        source = self.sources.get(kind.name, "")
        return _transformer(kind, self.shape, self.data.x_train, self.device, source)

    def classifier(self) -> nn.Module:
        torch.manual_seed(self.opts.seed)
        net = build_classifier(self.model, in_channels=self.shape[0], num_classes=10)
        return net.to(self.device).train()

    def ours(
        self,
        method: str,
        labeled: int,
        unlabeled: int,
        cache_latents: bool = False,
        power_method: str = "finite-difference",
        fp: fast.FastPath | None = None,
    ) -> tuple[Callable, Callable]:
        """(eager step for counting FLOPs, step to time) of our training step, on the fast path
        `fp` (default: the setting's)."""
        opts, device = self.opts, self.device
        fp = fp or self.fast
        model = self.classifier()
        entry, kind = parse_row(method)
        reg: Regularizer | None = None
        if entry.build is not None:
            cfg = MethodConfig(name=entry.name, eps=_eps(entry, kind), power_method=power_method)
            reg = entry.build(cfg, self.transformer(kind) if kind is not None else None)
        batches = TrainBatches(
            self.data, self.split, labeled, unlabeled, device=device, seed=opts.seed
        )
        cache = None
        transformer = getattr(reg, "transformer", None)
        if cache_latents and transformer is not None:  # built before timing, as at a run's start
            cache = fast.LatentCache.build(transformer, self.data.x_train, device, seed=0)
        tc = TrainConfig()
        optimizer = fast.adam(model, tc, device)
        sums = torch.zeros(len(STATS), device=device)

        def step() -> None:
            nonlocal sums
            batch: Batch = batches.next()
            z = cache.lookup(batch.idx_unlabeled) if cache is not None else None
            sums = sums + train_step(model, reg, optimizer, batch, 1.0, fp.amp_dtype, z_unlabeled=z)

        def prepared() -> Callable:
            fast.apply(model, reg, fp)  # channels-last, compile: after the eager count
            return step

        return step, prepared

    def naive(self, method: str) -> Callable:
        torch.manual_seed(self.opts.seed)
        model = self.classifier()
        data = NaiveData(
            self.data.x_train,
            self.data.y_train,
            self.split.labeled,
            self.split.unlabeled,
            self.opts.batch_labeled,
            self.opts.batch_unlabeled,
            self.opts.seed,
        )
        entry, kind = parse_row(method)
        t = self.transformer(kind) if kind is not None else None
        return naive_step_fn(
            model,
            data,
            self.device,
            regularized=entry.regularized,
            eps=_eps(entry, kind),
            transformer=t,
        )


def _time(step: Callable, device, warmup: int, repeats: int, steps: int) -> list[float]:
    return time_steps(step, device, warmup=warmup, repeats=repeats, steps=steps)


HEADER = (
    f"  {'row':<15} {'impl':<6} {'ms/step':>9} {'img/s':>8} {'GFLOP':>8} {'TFLOP/s':>8} "
    f"{'%peak':>6} {'floor ms':>9} {'x floor':>8}"
)


def _line(d: dict) -> str:
    """One table row from `Row.to_dict`."""
    notes = f"  ({'; '.join(d['notes'])})" if d["notes"] else ""
    return (
        f"  {d['method']:<15} {d['impl']:<6} {d['ms_per_step']:>9.2f} {d['images_per_s']:>8.0f} "
        f"{d['flops_per_step'] / 1e9:>8.1f} {d['tflops']:>8.3f} "
        f"{100 * d['fraction_of_matmul_peak']:>5.1f}% {d['conv_floor_ms']:>9.2f} "
        f"{d['times_conv_floor']:>7.2f}x{notes}"
    )


def run_bench(opts: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark, print a table through `log`, return the JSON-ready report."""
    device = resolve_device(opts.device)
    for name in opts.models:  # a bad shape or transformer source: refused before any timing
        image_shape(name, opts.image_shape)
    transformer_sources(opts.transformers)
    warmup, repeats, steps, compile_on = _defaults(opts, device)
    tc = TrainConfig(amp=opts.amp, channels_last=opts.channels_last, compile=compile_on)
    fp = fast.resolve(tc, device)
    env = environment(device)
    peak = matmul_peak(device, opts.peak_size)
    hw = env["hardware"].get("gpu", env["hardware"]["cpu"])
    log(
        f"lvat bench on {device} ({hw}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    log(
        f"fast path: {fp.describe()}; median of {repeats} x {steps} steps after {warmup} "
        "warm-up steps"
    )
    log(f"matmul peak: {peak.tflops * 1e3:.1f} GFLOP/s ({peak.what})")
    log(NOTE)
    report: dict = {
        "environment": env,
        "note": NOTE,
        "options": {
            "batch_labeled": opts.batch_labeled,
            "batch_unlabeled": opts.batch_unlabeled,
            "warmup": warmup,
            "repeats": repeats,
            "steps_per_repeat": steps,
            "cache_latents": opts.cache_latents,
            "exact": opts.exact,
            "image_shape": opts.image_shape or "per model",
            "transformers": transformer_sources(opts.transformers) or "paper-size, random init",
            **fp.describe(),
        },
        "matmul_peak": peak.to_dict(),
        "models": {},
    }
    total = opts.batch_labeled + opts.batch_unlabeled
    # "+f32": the same row on plain float32 (both layouts NCHW), where the fast path is anything
    # else; the transformer's layout counts for the LVAT rows only
    plain = (fp.amp_dtype, fp.channels_last) == (None, False)
    f32 = ["", "+f32"] if opts.float32 and not plain else [""]
    f32_lvat = (
        ["", "+f32"] if opts.float32 and not (plain and not fp.transformer_channels_last) else [""]
    )
    plan = [(_reference(total) + v, "ours") for v in f32]
    for m in opts.methods:
        entry, kind = parse_row(m)
        plan += [(m + v, "ours") for v in (f32 if kind is None else f32_lvat)]
        if opts.cache_latents and kind is not None:
            plan.append((f"{m}+cache", "ours"))
        if opts.exact and entry.regularized:
            plan.append((f"{m}+exact", "ours"))
        if opts.naive:
            plan.append((m, "naive"))
    for name in opts.models:
        setting = _Setting(name, opts, device, fp)
        w1, w2, w3, _, _ = build_classifier(name, in_channels=1, num_classes=10).widths
        size = setting.shape[1]  # the three conv blocks (32: at 32, 16 and 8 pixels)
        shapes = [(w1, w1, size, 1), (w2, w2, size // 2, 1), (w2, w3, max(3, size // 4), 0)]
        dtype = fp.amp_dtype or torch.float32
        conv = conv_rate(device, shapes, opts.batch_unlabeled, dtype, fp.channels_last)
        log("")
        log(
            f"{name} on {'x'.join(map(str, setting.shape))}, batches {opts.batch_labeled} "
            f"labeled + {opts.batch_unlabeled} unlabeled; floor = FLOPs at the fastest conv "
            f"block's rate, {conv.tflops * 1e3:.1f} GFLOP/s ({conv.what})"
        )
        log(HEADER)
        rows = []
        for method, impl in plan:
            row = _run_row(setting, method, impl, total, warmup, repeats, steps)
            rows.append(row)
            log(_line(row.to_dict(peak, conv)))
        targets = _targets(rows, device)
        for t in targets:
            verdict = "met" if t["met"] else "MISSED"
            if t.get("unreachable"):
                verdict += " (the FLOP ratio alone exceeds it on this model)"
            log(
                f"  target {t['target']}: {t['value']:.2f}x (FLOP ratio {t['flop_ratio']:.2f}x)  "
                f"{verdict}"
            )
        report["models"][name] = {
            "image_shape": list(setting.shape),
            "conv_reference": conv.to_dict(),
            "rows": [r.to_dict(peak, conv) for r in rows],
            "targets": targets,
        }
    return report


def _run_row(
    setting: _Setting, method: str, impl: str, total: int, warmup: int, repeats: int, steps: int
) -> Row:
    opts, device = setting.opts, setting.device
    base, *tags = method.split("+")  # e.g. "lvat-glow+exact": tags cache, exact, f32
    reference = base == _reference(total)
    regularized = reference or parse_row(base)[0].regularized
    images = total if regularized else opts.batch_labeled
    if impl == "naive":
        step = setting.naive(method)
        flops = count_flops(step)
        ms = _time(step, device, warmup, repeats, steps)
        return Row(method, impl, images, flops, ms, host_syncs=host_syncs(step, device))
    fp = replace(_F32, compile=setting.fast.compile) if "f32" in tags else None
    if reference:
        count, prepared = setting.ours(_REFERENCE, total, 1, fp=fp)
    else:
        power = "exact" if "exact" in tags else "finite-difference"
        count, prepared = setting.ours(
            base, opts.batch_labeled, opts.batch_unlabeled, "cache" in tags, power, fp
        )
    flops = count_flops(count)  # eager, before channels-last/compile: FLOPs do not change
    try:
        step = prepared()
        ms = _time(step, device, warmup, repeats, steps)
    except Exception as exc:  # a compiler failure must not sink the whole benchmark
        if not setting.fast.compile:
            raise
        torch._dynamo.reset()
        setting.fast = replace(setting.fast, compile=False)
        row = _run_row(setting, method, impl, total, warmup, repeats, steps)
        row.notes.insert(0, f"torch.compile failed ({type(exc).__name__}: {exc}"[:200] + "); eager")
        return row
    row = Row(method, impl, images, flops, ms, host_syncs=host_syncs(step, device))
    if row.host_syncs:
        row.notes.append(f"{row.host_syncs} host syncs per step")
    return row


def _targets(rows: list[Row], device: torch.device) -> list[dict]:
    """The performance targets for the rows present, each with the FLOP ratio that bounds it."""
    ours = {r.name: r for r in rows if r.impl == "ours"}
    naive = {r.name: r for r in rows if r.impl == "naive"}
    ref = next((r for r in rows if r.name.startswith(f"{_REFERENCE}-")), None)
    out = []
    for method, limit in RATIO_TARGETS.items():
        if method in ours and ref is not None:
            value = ours[method].ms_median / ref.ms_median
            out.append(
                {
                    "target": f"{method} <= {limit} x {ref.name}",
                    "value": value,
                    "flop_ratio": ours[method].flops / ref.flops,
                    "met": value <= limit,
                    "unreachable": ours[method].flops / ref.flops > limit,
                }
            )
    for method, (fd_target, exact_target) in CPU_FAST_TARGETS.items():
        if device.type != "cpu" or f"{method}+f32" not in ours:
            continue
        today = ours[f"{method}+f32"]
        for row, limit in ((method, fd_target), (f"{method}+exact", exact_target)):
            if row in ours:
                out.append(
                    _speedup(
                        ours[row], today, limit, f"{row} >= {limit:g}x faster than {today.name}"
                    )
                )
    need = NAIVE_TARGET.get(device.type, 1.0)
    for method, row in naive.items():
        if method in ours and parse_row(method)[0].regularized:  # sup is shown, not targeted
            what = f"{method} >= {need:g}x faster than naive ({device.type})"
            out.append(_speedup(ours[method], row, need, what))
    return out


def _speedup(fast_row: Row, slow_row: Row, limit: float, what: str) -> dict:
    """A target "`fast_row` at least `limit` times faster than `slow_row`"."""
    value = slow_row.ms_median / fast_row.ms_median
    return {
        "target": what,
        "value": value,
        "flop_ratio": slow_row.flops / fast_row.flops,
        "met": value >= limit,
    }


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path
