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
Plots are drawn with Pillow alone (no matplotlib); the numbers behind them go to figures.json.
"""

from __future__ import annotations

import inspect
import io
import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from lvat.analysis.paper import METHOD_LABELS
from lvat.data import to_float
from lvat.errors import LvatError
from lvat.io import atomic_write, atomic_write_text
from lvat.train import load_run
from lvat.train.setup import build_regularizer

FIGURES_DIR = "figures"
DEFAULT_EPS_VAT = 2.5  # SPEC section 4: VAT's eps on SVHN without augmentation
BINS = 40
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


# ------------------------------------------------------------------ drawing with Pillow only
def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


class _Axes:
    """A panel of a figure: data coordinates -> pixels, frame, ticks, labels and legend."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
        self.draw, self.font = draw, _font()
        x0, y0, x1, y1 = box
        self.box = (x0 + 62, y0 + 48, x1 - 20, y1 - 42)  # room for title, legend, tick labels
        self.outer = box
        self.xlim = self.ylim = (0.0, 1.0)

    def px(self, x: float, y: float) -> tuple[float, float]:
        (a, b), (c, d), (x0, y0, x1, y1) = self.xlim, self.ylim, self.box
        return x0 + (x - a) / (b - a or 1) * (x1 - x0), y1 - (y - c) / (d - c or 1) * (y1 - y0)

    def frame(self, title: str, xlabel: str, ylabel: str) -> None:
        d, f, (x0, y0, x1, y1) = self.draw, self.font, self.box
        d.rectangle(self.box, outline=(0, 0, 0))
        for t in _ticks(*self.xlim):
            px = self.px(t, self.ylim[0])[0]
            d.line([(px, y1), (px, y1 + 4)], fill=(0, 0, 0))
            d.text((px, y1 + 6), f"{t:g}", fill=(0, 0, 0), font=f, anchor="ma")
        for t in _ticks(*self.ylim):
            py = self.px(self.xlim[0], t)[1]
            d.line([(x0 - 4, py), (x0, py)], fill=(0, 0, 0))
            d.text((x0 - 6, py), f"{t:g}", fill=(0, 0, 0), font=f, anchor="rm")
        d.text(((x0 + x1) / 2, self.outer[1] + 8), title, fill=(0, 0, 0), font=f, anchor="ma")
        d.text(((x0 + x1) / 2, self.outer[3] - 4), xlabel, fill=(0, 0, 0), font=f, anchor="md")
        d.text((self.outer[0] + 2, y0 - 40), ylabel, fill=(0, 0, 0), font=f)

    def legend(self, items: list[tuple[str, tuple[int, int, int]]]) -> None:
        """One row above the plot, so it never hides data."""
        x, y = self.box[0], self.box[1] - 20
        for label, color in items:
            self.draw.rectangle([x, y + 2, x + 10, y + 12], fill=color)
            self.draw.text((x + 14, y), label, fill=(0, 0, 0), font=self.font)
            x += 30 + self.draw.textlength(label, font=self.font)


def _histogram(values: list[Tensor], lo: float, hi: float) -> list[list[int]]:
    return [torch.histc(v.double(), BINS, lo, hi).long().tolist() for v in values]


def draw_histograms(
    series: list[tuple[str, Tensor]],
    path: Path,
    title: str,
    marker: tuple[float, str] | None = None,
) -> dict:
    """Overlaid histograms (shared bins from 0) with an optional vertical marker line."""
    series = [(name, v[torch.isfinite(v)]) for name, v in series]
    tops = [float(v.max()) for _, v in series if len(v)] + [marker[0] if marker else 0.0]
    hi = max(tops) * 1.15 or 1.0
    counts = _histogram([v for _, v in series], 0.0, hi)
    img = Image.new("RGB", (720, 440), "white")
    draw = ImageDraw.Draw(img, "RGBA")  # RGBA drawing: overlapping bars stay visible
    ax = _Axes(draw, (0, 0, 720, 440))
    ax.xlim, ax.ylim = (0.0, hi), (0.0, max(max(c) for c in counts) * 1.1 or 1.0)
    width = hi / BINS
    for c, color in zip(counts, COLORS, strict=False):
        for i, n in enumerate(c):
            if n:
                a, b = ax.px(i * width, 0), ax.px((i + 1) * width, n)
                draw.rectangle([a[0], b[1], b[0], a[1]], fill=(*color, 140), outline=color)
    if marker:
        (x, top), (_, bottom) = ax.px(marker[0], ax.ylim[1]), ax.px(marker[0], 0)
        for y in range(int(top), int(bottom), 8):  # dashed
            draw.line([(x, y), (x, min(y + 4, bottom))], fill=(200, 0, 0), width=2)
        right = x + 6 + draw.textlength(marker[1], font=ax.font) < ax.box[2]
        anchor, dx = ("la", 6) if right else ("ra", -6)  # the label stays inside the plot
        draw.text((x + dx, top + 6), marker[1], fill=(200, 0, 0), font=ax.font, anchor=anchor)
    ax.frame(title, "L2 distance to x (pixels in [0, 1])", "images")
    names = [f"{name} (n={len(v)})" for name, v in series]
    ax.legend(list(zip(names, COLORS, strict=False)))
    _save(img, path)
    return {"edges": [i * width for i in range(BINS + 1)], "counts": counts}


def draw_curves(panels: list[tuple[str, str, list[tuple[str, list, list]]]], path: Path) -> None:
    """Line plots side by side: per panel (title, y label, [(name, steps, values)])."""
    img = Image.new("RGB", (560 * len(panels), 400), "white")
    draw = ImageDraw.Draw(img)
    for k, (title, ylabel, lines) in enumerate(panels):
        ax = _Axes(draw, (560 * k, 0, 560 * (k + 1), 400))
        xs = [x for _, s, _ in lines for x in s] or [0.0]
        ys = [y for _, _, v in lines for y in v if math.isfinite(y)] or [0.0]
        ax.xlim = (min(0.0, min(xs)), max(xs) or 1.0)
        ax.ylim = (min(0.0, min(ys)), max(ys) * 1.05 or 1.0)
        for (_, steps, values), color in zip(lines, COLORS, strict=False):
            pts = [ax.px(x, y) for x, y in zip(steps, values, strict=True) if math.isfinite(y)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for p in pts if len(pts) < 30 else pts[-1:]:  # dots where lines would hide points
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        ax.frame(title, "step", ylabel)
        if lines:
            ax.legend([(name, color) for (name, _, _), color in zip(lines, COLORS, strict=False)])
    _save(img, path)


def draw_grid(rows: list[tuple[str, Tensor]], path: Path, cell: int = 64) -> None:
    """Labeled image rows: each (label, images (N, C, H, W) in [0, 1]), enlarged to ~`cell` px."""
    from lvat.images import tile  # the package's grid helper: uint8, NaN pixels drawn black

    h = rows[0][1].shape[-2]
    scale = max(1, round(cell / h))  # integer nearest-neighbour scaling keeps pixels crisp
    strips = []
    for _, images in rows:
        canvas = tile(images, nrow=len(images), padding=1).permute(1, 2, 0)  # (H', W', C)
        strip = Image.fromarray(
            canvas.squeeze(-1).numpy() if canvas.shape[-1] == 1 else canvas.numpy()
        )
        strips.append(
            strip.convert("RGB").resize((strip.width * scale, strip.height * scale), Image.NEAREST)
        )
    label_w = 120
    img = Image.new(
        "RGB", (label_w + max(s.width for s in strips), sum(s.height for s in strips)), "white"
    )
    draw, font, y = ImageDraw.Draw(img), _font(), 0
    for (label, _), strip in zip(rows, strips, strict=True):
        draw.text((6, y + strip.height // 2), label, fill=(0, 0, 0), font=font, anchor="lm")
        img.paste(strip, (label_w, y))
        y += strip.height
    _save(img, path)


def _save(img: Image.Image, path: Path) -> None:
    """PNG written atomically: an interrupted run never leaves half a file."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


# ------------------------------------------------------------------ the numbers
def _reconstruct(transformer: nn.Module, x: Tensor) -> Tensor:
    """Dec(Enc(x)), with Glow's deterministic (bin-centre) dequantisation."""
    if "deterministic" in inspect.signature(transformer.encode).parameters:
        return transformer.decode(transformer.encode(x, deterministic=True))
    return transformer.decode(transformer.encode(x))


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
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    if method.name not in ("vat", "lvat"):
        raise LvatError(f"{run.path} is a '{method.name}' run; figures need a VAT or LVAT run")
    regularizer = build_regularizer(method, run.device)
    model, dev = run.model, run.device
    if method.name == "lvat":
        tf = regularizer.transformer
    elif transformer:
        from lvat.models.transformers import load_transformer

        tf = load_transformer(transformer, dev)
    else:
        tf = None
    if method.name == "vat":
        marker = (method.eps, "run config")
    else:
        marker = (eps_vat, "--eps-vat") if eps_vat else (DEFAULT_EPS_VAT, "default (SPEC: SVHN)")

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
    adv_name = "Dec(Enc(x) + r)" if method.name == "lvat" else "(x + r_vat)"
    key = f"lvat-{type(tf).__name__.lower()}" if method.name == "lvat" else "vat"
    label = METHOD_LABELS.get(key, "LVAT")
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
    draw_grid([*rows, ("adversarial", examples["adv"])], files["fig3"])
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
        [("training (log windows)", "", loss_lines), ("evaluation", "error %", err_lines)],
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
        "transformer": method.transformer if method.name == "lvat" else (transformer or ""),
        "histograms": hist,
        "accuracy": {**accuracy, "count": n, "unit": "% of the sampled test images"},
        "files": {k: str(v) for k, v in files.items()},
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
        *(f"  {name}: {path}" for name, path in info["files"].items()),
        f"  numbers: {Path(info['run']) / FIGURES_DIR / 'figures.json'}",
    ]
    return "\n".join(lines)
