"""`lvat figures`: the paper's Figs. 2-4, training curves and reconstruction accuracy of a run.

For N random test images (seeded) of a finished VAT or LVAT run this computes, as in training:

- Fig. 2  ||x - x_adv||_2 (LVAT: x_adv = Dec(Enc(x) + r); VAT: x + r_vat), with VAT's eps marked;
- Fig. 3  image grids: original / Dec(Enc(x)) / adversarial (VAT: original / x + r_vat);
- Fig. 4  ||x - x_adv||_2 beside the reconstruction error ||x - Dec(Enc(x))||_2;
- curves  training loss, ce, kl and test error against the step;
- accuracy of the classifier (eval mode) on x, on Dec(Enc(x)) and on x_adv.

Perturbations are computed exactly as the training loop computes them: classifier in train mode
(batch statistics, running statistics frozen, dropout on), batches of `train.batch_unlabeled`,
Glow encoding with its random dequantisation. Reconstructions use Glow's deterministic encoding.
Every figure is drawn with matplotlib (off-screen: `Figure` objects, no pyplot, no display) and
written twice, as NAME.png and as the vector NAME.pdf beside it; the numbers behind the plots go
to figures.json ("files": the PNGs, "vector_files": the PDFs).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from lvat.data import to_float
from lvat.errors import LvatError
from lvat.io import atomic_write, atomic_write_text
from lvat.models.registry import kind_for_model
from lvat.regularizers import METHODS, method_key, method_label
from lvat.train import load_run
from lvat.train.setup import build_regularizer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURES_DIR = "figures"
DEFAULT_EPS_VAT = 2.5  # docs/method.md §5.2: VAT's eps on SVHN without augmentation
BINS = 40
DPI = 100  # PNG pixels per inch: a 7.2 x 4.4 in histogram is 720 x 440 px
VECTOR_FORMAT = "pdf"


# ------------------------------------------------------------------ drawing with matplotlib
def _figure(**kwargs) -> Figure:
    """A matplotlib Figure without pyplot: no global state, no display, no backend switch.
    matplotlib is imported here, on first use, so that `import lvat.analysis` stays fast."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _fit_width(fig: Figure, pad: float = 0.1) -> None:
    """Widen `fig` until everything drawn lies inside it: a constrained layout shrinks the axes
    to make room for long tick labels, but a centred axis label wider than the axes that are left
    is cut off at the edge. Each pass widens by the overhang and lays out again."""
    for _ in range(4):
        fig.draw_without_rendering()
        box, width = fig.get_tightbbox(), fig.get_figwidth()
        over = max(0.0, -box.x0) + max(0.0, box.x1 - width)
        if over <= 0.02:  # two pixels at DPI 100
            return
        fig.set_figwidth(width + over + pad)


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Figure, path: Path) -> Path:
    """`path` (PNG) and its vector twin (same stem, .pdf), each written atomically: an
    interrupted run never leaves half a file. Returns the vector file's path."""
    from matplotlib import rc_context

    vector = path.with_suffix(f".{VECTOR_FORMAT}")
    for target, fmt, meta in (
        (path, "png", {}),
        (vector, VECTOR_FORMAT, {"CreationDate": None}),  # same input, same bytes
    ):
        buf = io.BytesIO()
        with rc_context({"pdf.fonttype": 42}):  # TrueType text in the PDF: editable, searchable
            fig.savefig(buf, format=fmt, dpi=DPI, metadata=meta)
        atomic_write(target, lambda f, b=buf: f.write(b.getvalue()))
    return vector


def _histogram(values: list[Tensor], lo: float, hi: float) -> list[list[int]]:
    return [torch.histc(v.double(), BINS, lo, hi).long().tolist() for v in values]


def draw_histograms(
    series: list[tuple[str, Tensor]],
    path: Path,
    title: str,
    marker: tuple[float, str] | None = None,
) -> dict:
    """Overlaid histograms (shared bins from 0) with an optional vertical marker line.

    The bars drawn are the counts returned (and written to figures.json), not a re-binning."""
    series = [(name, v[torch.isfinite(v)]) for name, v in series]
    tops = [float(v.max()) for _, v in series if len(v)] + [marker[0] if marker else 0.0]
    hi = max(tops) * 1.15 or 1.0
    counts = _histogram([v for _, v in series], 0.0, hi)
    edges = [i * hi / BINS for i in range(BINS + 1)]
    fig = _figure(figsize=(7.2, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for k, ((name, v), c) in enumerate(zip(series, counts, strict=True)):
        color = f"C{k}"
        ax.stairs(c, edges, fill=True, color=color, alpha=0.45, label=f"{name} (n={len(v)})")
        ax.stairs(c, edges, color=color, linewidth=1.2)  # outline: overlaps stay readable
    if marker:
        ax.axvline(marker[0], color="crimson", linestyle="--", linewidth=1.8, label=marker[1])
    ax.set_xlim(0.0, hi)
    ax.set_ylim(0.0, max(max(c) for c in counts) * 1.1 or 1.0)
    _integer_ticks(ax.yaxis)  # image counts
    ax.set_title(title)
    ax.set_xlabel("L2 distance to x (pixels in [0, 1])")
    ax.set_ylabel("images")
    ax.legend(loc="best", framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return {"edges": edges, "counts": counts}


def draw_curves(panels: list[tuple[str, str, list[tuple[str, list, list]]]], path: Path) -> None:
    """Line plots side by side: per panel (title, y label, [(name, steps, values)])."""
    fig = _figure(figsize=(5.6 * len(panels), 4.0), layout="constrained")
    for ax, (title, ylabel, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels,
                                          strict=True):  # fmt: skip
        for name, steps, values in lines:
            ys = [float(y) if math.isfinite(y) else math.nan for y in values]  # gaps, not spikes
            ax.plot(steps, ys, marker="o" if len(ys) < 30 else None, markersize=4, label=name)
        if lines:
            ax.legend(loc="best", framealpha=0.9)
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
        ys = [y for _, _, v in lines for y in v if math.isfinite(y)]
        if ys and min(ys) >= 0:
            ax.set_ylim(bottom=0.0)  # losses and error rates: distances from 0 stay visible
        _integer_ticks(ax.xaxis)  # steps are whole numbers
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _save(fig, path)


def draw_intervals(
    rows: list[tuple[str, list[float], float, tuple[float, float] | None]], path: Path, xlabel: str
) -> Figure:
    """One line per row (label, points, mean, interval or None): each point a dot, the mean a
    square with its interval as a bar, and a vertical line at 0, so that whether an interval
    excludes 0 and how the single points scatter are seen at once. The figure is at least 8 in
    wide and wider where the labels need it; it is returned after saving."""
    fig = _figure(figsize=(8.0, 1.2 + 0.55 * len(rows)), layout="constrained")
    ax = fig.subplots()
    for y, (_, points, mean, ci) in enumerate(rows):
        ax.plot(points, [y + 0.18] * len(points), "o", color="0.55", markersize=5)
        lo, hi = ci if ci is not None else (mean, mean)
        ax.errorbar([mean], [y - 0.12], xerr=[[mean - lo], [hi - mean]], fmt="s",
                    color="black" if ci is not None and (lo > 0 or hi < 0) else "C3",
                    capsize=4, markersize=6)  # fmt: skip
    ax.axvline(0.0, color="0.3", linewidth=1.0, linestyle="--")
    ax.set_yticks(range(len(rows)), [label for label, *_ in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row on top
    ax.set_xlabel(xlabel)
    fig.suptitle("dots: one seed each; square and bar: mean and 95% interval (black: excludes 0)",
                 fontsize=9)  # fmt: skip
    ax.grid(axis="x", alpha=0.3)
    _fit_width(fig)
    _save(fig, path)
    return fig


def draw_grid(
    rows: list[tuple[str, Tensor]], path: Path, cell: int = 64, title: str | None = None
) -> None:
    """Labeled image rows: each (label, images (N, C, H, W) in [0, 1]), enlarged to ~`cell` px.

    Pixels stay square and crisp: every row is shown at an integer scale, nearest neighbour,
    in axes sized to exactly that many PNG pixels (the PDF embeds the unscaled images)."""
    from lvat.images import tile  # the package's grid helper: uint8, NaN pixels drawn black

    scale = max(1, round(cell / rows[0][1].shape[-2]))
    strips = [tile(images, nrow=len(images), padding=1).permute(1, 2, 0).numpy()
              for _, images in rows]  # fmt: skip
    label_w, title_h = 120, 28 if title else 0
    width = label_w + scale * max(s.shape[1] for s in strips)
    height = title_h + scale * sum(s.shape[0] for s in strips)
    fig = _figure(figsize=(width / DPI, height / DPI))
    if title:
        fig.text(0.5, 1 - title_h / 2 / height, title, ha="center", va="center", fontsize=11)
    top = title_h
    for (label, _), strip in zip(rows, strips, strict=True):
        h, w = scale * strip.shape[0], scale * strip.shape[1]
        ax = fig.add_axes((label_w / width, 1 - (top + h) / height, w / width, h / height))
        grey = strip.shape[-1] == 1
        ax.imshow(np.ascontiguousarray(strip[..., 0] if grey else strip),
                  cmap="gray" if grey else None, vmin=0, vmax=255,
                  interpolation="nearest", aspect="auto")  # fmt: skip
        ax.set_axis_off()
        fig.text(6 / width, 1 - (top + h / 2) / height, label, ha="left", va="center")
        top += h
    _save(fig, path)


# ------------------------------------------------------------------ the numbers
def _reconstruct(transformer: nn.Module, x: Tensor) -> Tensor:
    """Dec(Enc(x)) as its kind reconstructs (Glow: deterministic, bin-centre dequantisation)."""
    return kind_for_model(transformer).reconstruct(transformer, x)


def _l2(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vector_norm((a.float() - b.float()).flatten(1), dim=1).cpu()


def _summary(v: Tensor) -> dict:
    """Count, then mean, sample std, min and max of the finite values (a Glow decode of a
    perturbed latent can overflow; such samples are counted in `nonfinite`, not hidden)."""
    finite = v.double()[torch.isfinite(v)]
    if not len(finite):
        finite = torch.zeros(1, dtype=torch.float64)
    std = float(finite.std()) if len(finite) > 1 else 0.0
    return {"count": len(v), "nonfinite": int((~torch.isfinite(v)).sum()),
            "mean": float(finite.mean()), "std": std, "min": float(finite.min()),
            "max": float(finite.max())}  # fmt: skip


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines log; a line cut by a stop (or a run still writing) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


# The curves of an `lvat fit` run: the VAE's -ELBO and its two terms (nats per image), Glow's
# bits per dimension (with dequantisation noise); train from metrics.jsonl, test from eval.jsonl.
FIT_CURVES = ("neg_elbo", "bce", "kl", "bpd")


def is_fit_run(run_dir: str | Path) -> bool:
    """An `lvat fit` folder (a transformer), not a classifier run: its config has no [method]."""
    import tomllib

    try:
        config = tomllib.loads((Path(run_dir) / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return "method" not in config and "model" in config


def fit_curves(run_dir: str | Path) -> dict:
    """RUN_DIR/figures/curves.png (+ .pdf) of an `lvat fit` run, finished or still training:
    training (mean over each log window) and test curves side by side. Returns the points."""
    run = Path(run_dir)
    metrics, evals = _read_jsonl(run / "metrics.jsonl"), _read_jsonl(run / "eval.jsonl")
    if not metrics and not evals:
        raise LvatError(f"{run}: no metrics.jsonl or eval.jsonl: not an `lvat fit` run folder")

    def lines(rows: list[dict], prefix: str) -> list[tuple[str, list, list]]:
        return [
            (key, [r["step"] for r in rows if prefix + key in r],
             [r[prefix + key] for r in rows if prefix + key in r])
            for key in FIT_CURVES
            if any(prefix + key in r for r in rows)
        ]  # fmt: skip

    for r in metrics:  # the VAE logs its two terms while training; -ELBO is their sum
        if "bce" in r and "kl" in r and "neg_elbo" not in r:
            r["neg_elbo"] = r["bce"] + r["kl"]
    train, test = lines(metrics, ""), lines(evals, "test_")
    keys = {name for name, _, _ in train + test}
    unit = "bits per dimension" if keys <= {"bpd"} else "nats per image"
    out = run / "figures" / "curves.png"
    out.parent.mkdir(exist_ok=True)
    draw_curves([("training (mean over each log window)", unit, train), ("test", unit, test)], out)
    return {"run": str(run), "png": str(out), "train": train, "test": test}


def make_figures(
    run_dir: str | Path,
    *,
    samples: int = 5000,
    eps_vat: float | None = None,
    transformer: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    grid: int = 10,
    device: str | None = None,
) -> dict:
    """Write the figures of a VAT/LVAT run into RUN_DIR/figures/; return figures.json's content.

    Args:
        run_dir: a run folder written by `lvat train`.
        samples: random test images for the histograms and accuracies (capped at the test size).
        eps_vat: VAT's eps marked in Fig. 2 for an LVAT run (default 2.5); a VAT run's own eps
            is always used for a VAT run.
        transformer: a VAE/Glow checkpoint for the reconstruction panels of a VAT run (an LVAT
            run uses its own transformer).
        seed: seeds the choice of images and the perturbations' random numbers.
        batch_size: images per perturbation batch (default: the run's `train.batch_unlabeled`,
            so BatchNorm sees batches like those of training).
        grid: images per row of Fig. 3.
        device: default: the run's device.
    """
    if samples < 2:
        raise LvatError("--samples must be at least 2 (BatchNorm needs batch statistics)")
    run = load_run(run_dir, device)
    method = run.config.method
    entry = METHODS[method.name]
    if not entry.adversarial:
        drawable = " or ".join(m.display for m in METHODS.values() if m.adversarial)
        raise LvatError(f"{run.path} is a '{method.name}' run; figures need a {drawable} run")
    regularizer = build_regularizer(method, run.device)
    model, dev = run.model, run.device
    if entry.needs_transformer:
        tf = regularizer.transformer
    elif transformer:
        from lvat.models.transformers import load_transformer

        tf = load_transformer(transformer, dev)
    else:
        tf = None
    if not entry.needs_transformer:  # eps in input units, as VAT's
        marker = (method.eps, "run config")
    else:
        marker = (eps_vat, "--eps-vat") if eps_vat else (DEFAULT_EPS_VAT, "default (paper: SVHN)")

    x_test, y_test = run.dataset.x_test, run.dataset.y_test
    n = min(samples, len(x_test))
    idx = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(seed))[:n]
    bs = batch_size or run.config.train.batch_unlabeled
    torch.manual_seed(seed)  # d ~ N(0, I), dropout masks and Glow's dequantisation noise
    adv_l2, rec_l2, examples = [], [], {}
    correct = {"x": 0, "recon": 0, "adv": 0}
    # Near-equal chunks: no tail batch of 1, for which train-mode BatchNorm is undefined.
    for chunk in torch.tensor_split(idx, math.ceil(n / bs)):
        x, y = to_float(x_test[chunk].to(dev)), y_test[chunk].to(dev)
        model.train()  # as in training: batch statistics (running stats frozen), dropout
        x_adv = regularizer.adversarial_examples(model, x)
        model.eval()
        with torch.no_grad():
            correct["x"] += int((model(x).argmax(1) == y).sum())
            correct["adv"] += int((model(x_adv.to(x.dtype)).argmax(1) == y).sum())
            adv_l2.append(_l2(x, x_adv))
            rec = _reconstruct(tf, x) if tf is not None else None
            if rec is not None:
                correct["recon"] += int((model(rec).argmax(1) == y).sum())
                rec_l2.append(_l2(x, rec))
        if not examples:
            examples = {"x": x[:grid], "recon": rec, "adv": x_adv[:grid]}
    model.eval()
    adv, recon = torch.cat(adv_l2), torch.cat(rec_l2) if rec_l2 else None

    out = run.path / FIGURES_DIR
    out.mkdir(exist_ok=True)
    adv_name = "Dec(Enc(x) + r)" if entry.needs_transformer else "(x + r_vat)"
    kind = kind_for_model(tf).name if entry.needs_transformer else None
    key, label = method_key(method.name, kind), method_label(method.name, kind)
    files = {"fig2": out / "fig2_adv_distance.png", "fig3": out / "fig3_examples.png"}
    fig2 = draw_histograms(
        [(f"||x - {adv_name}||", adv)],
        files["fig2"],
        f"Fig. 2: {label}, eps = {method.eps:g}, {n} test images",
        (marker[0], f"VAT eps = {marker[0]:g} ({marker[1]})"),
    )
    hist = {"adv_l2": {**_summary(adv), "edges": fig2["edges"], "counts": fig2["counts"][0]}}
    rows = [("original", examples["x"])]
    if examples["recon"] is not None:
        rows.append(("Dec(Enc(x))", examples["recon"][:grid]))
    draw_grid(
        [*rows, ("adversarial", examples["adv"])],
        files["fig3"],
        title=f"Fig. 3: {label}, eps = {method.eps:g}",
    )
    if recon is not None:
        files["fig4"] = out / "fig4_adv_vs_recon.png"
        both = draw_histograms(
            [("||x - x_adv||", adv), ("||x - Dec(Enc(x))||", recon)],
            files["fig4"],
            f"Fig. 4: {label}, adversarial vs reconstruction, {n} test images",
        )
        hist["recon_l2"] = {**_summary(recon), "edges": both["edges"], "counts": both["counts"][1]}

    metrics, evals = _read_jsonl(run.path / "metrics.jsonl"), _read_jsonl(run.path / "eval.jsonl")
    files["curves"] = out / "curves.png"
    loss_lines = [
        (k, [r["step"] for r in metrics], [r[k] for r in metrics])
        for k in ("loss", "ce", "kl", "entropy")
        if metrics and (k != "entropy" or method.entropy_weight > 0)  # else not in the loss
    ]
    err_lines = [
        (k, [r["step"] for r in evals if k in r], [r[k] for r in evals if k in r])
        for k in ("test_error", "validation_error")
        if any(k in r for r in evals)
    ]
    draw_curves(
        [
            ("training", "mean over each log window", loss_lines),
            ("evaluation", "error %", err_lines),
        ],
        files["curves"],
    )

    accuracy = {k: 100.0 * v / n for k, v in correct.items() if k != "recon" or tf is not None}
    info = {
        "run": str(run.path),
        "method": key,
        "step": run.step,
        "finished": (run.path / "results.json").is_file(),
        "eps": method.eps,
        "eps_vat": {"value": marker[0], "source": marker[1]},
        "samples": samples,
        "count": n,
        "seed": seed,
        "batch_size": bs,
        "transformer": method.transformer if entry.needs_transformer else (transformer or ""),
        "histograms": hist,
        "accuracy": {**accuracy, "count": n, "unit": "% of the sampled test images"},
        "files": {k: str(v) for k, v in files.items()},
        "vector_files": {k: str(v.with_suffix(f".{VECTOR_FORMAT}")) for k, v in files.items()},
    }
    atomic_write_text(out / "figures.json", json.dumps(info, indent=1) + "\n")
    return info


def summary_text(info: dict) -> str:
    """What `lvat figures` prints: accuracies, the eps marker's source, and where files are."""
    acc = info["accuracy"]
    names = {"x": "x", "recon": "Dec(Enc(x))", "adv": "x_adv"}
    lines = [
        f"{info['run']} ({info['method']}, step {info['step']}"
        f"{'' if info['finished'] else ', unfinished'}): {info['count']} random test images",
        "  classifier accuracy (eval mode): "
        + ", ".join(f"{names[k]} {acc[k]:.2f}%" for k in names if k in acc),
        f"  VAT eps marked in Fig. 2: {info['eps_vat']['value']:g} ({info['eps_vat']['source']})",
        *(
            f"  {name}: {path} (vector: {info['vector_files'][name]})"
            for name, path in info["files"].items()
        ),
        f"  numbers: {Path(info['run']) / FIGURES_DIR / 'figures.json'}",
    ]
    return "\n".join(lines)
