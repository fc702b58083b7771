"""How good is the direction VAT/LVAT perturbs along? Per-sample cosines against references.

The power iteration of Algorithms 1/2 is meant to find the direction of largest curvature of the
consistency cost. Whether the direction a run actually uses is that direction depends on the
arithmetic (a float32 probe of norm xi = 1e-6 is at rounding level), on the network's kinks
(max-pooling ties, leaky ReLU) and, for LVAT, on a first-order term (docs/numerics.md). For a
batch of images this module measures, per sample, the cosine between the run's direction (its
power method, xi, iterations and precision) and:

- ``float64``: the same computation in float64 (same method and xi, same random d): what the
  algorithm means, without float32 rounding.
- ``top_eigenvector``: the top eigenvector of the curvature, by `reference_iterations` exact
  Fisher-vector products in float64 (`lvat.regularizers.exact`; |cosine|: its sign is arbitrary).
- ``finite_vs_exact``: float64 finite difference at the run's xi against one float64 exact
  product from the same d; both mean the same thing where the network is smooth, and differ where
  a probe crosses a kink (ties in max-pooling, leaky ReLU at 0).
- ``first_order`` (LVAT only): the float64 gradient of KL(p(x) || p(decode(z + r))) at r = 0,
  which does not depend on d; a cosine near 1 means the "power iteration" only returned it.

The classifier runs as in training (BatchNorm batch statistics, running statistics untouched)
but with dropout off, so that every computation sees the same network.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lvat.regularizers import LVAT, VAT, kl_divergence
from lvat.regularizers.common import frozen_bn_stats

__all__ = ["KEYS", "direction_quality", "summarize", "write_report"]

KEYS = ("float64", "top_eigenvector", "finite_vs_exact", "first_order")


def _flat(r: Tensor | tuple | list) -> Tensor:
    """A perturbation (one tensor or groups) as one float64 row per sample."""
    groups = [r] if isinstance(r, Tensor) else list(r)
    return torch.cat([g.reshape(g.shape[0], -1).double() for g in groups], dim=1)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample cosine of two (B, n) float64 tensors (0 where either vector is 0)."""
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


def _like(reg: VAT | LVAT, transformer: nn.Module | None = None, **changes) -> VAT | LVAT:
    """A copy of `reg` (without entropy term) with some hyper-parameters changed."""
    kw = dict(
        eps=reg.eps, xi=reg.xi, power_iterations=reg.power_iterations,
        power_method=reg.power_method,
    )  # fmt: skip
    kw.update(changes)
    if isinstance(reg, LVAT):
        return LVAT(transformer or reg.transformer, latent_groups=reg.latent_groups, **kw)
    return VAT(**kw)


def _seeded(seed: int, fn: Callable[[], Tensor | tuple]) -> Tensor:
    torch.manual_seed(seed)  # the same d (and Glow dequantisation noise) for every computation
    return _flat(fn())


def _first_order(model: nn.Module, reg: LVAT, x: Tensor, seed: int) -> Tensor:
    """grad_r KL(p(x) || p(decode(encode(x) + r))) at r = 0, (B, n)."""
    t = reg.transformer
    torch.manual_seed(seed)
    with torch.no_grad():
        z = t.encode(x)
    groups = [z] if isinstance(z, Tensor) else list(z)
    r = [torch.zeros_like(g, requires_grad=True) for g in groups]
    with frozen_bn_stats(model), torch.enable_grad():
        target = model(x).detach()
        moved = [g + ri for g, ri in zip(groups, r, strict=True)]
        logits = model(t.decode(moved[0] if isinstance(z, Tensor) else tuple(moved)))
        grads = torch.autograd.grad(kl_divergence(target, logits), r, allow_unused=True)
    return _flat([torch.zeros_like(ri) if g is None else g for ri, g in zip(r, grads, strict=True)])


def direction_quality(
    model: nn.Module,
    regularizer: VAT | LVAT,
    x: Tensor,
    *,
    reference_iterations: int = 30,
    seed: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Per-sample cosines (B,) of the run's direction with the references of the module docstring.

    Args:
        model: the trained classifier (its mode is restored on return).
        regularizer: the run's VAT or LVAT, as built for training.
        x: a batch of images (B, ...) in the run's precision (float32), on the model's device.
        reference_iterations: exact float64 products for the top eigenvector.
        seed: seeds the random d (the same for every computation).
        amp_dtype: compute the run's direction under autocast to this dtype (e.g. bfloat16), as
            a training step with `train.amp` would; the references stay float64.

    Returns:
        {key: (B,) float64 tensor} for the keys of `KEYS` that apply (no "first_order" for VAT).
    """
    was_training = {m: m.training for m in model.modules()}
    model64 = copy.deepcopy(model).double()
    for m in (model, model64):
        m.train()
        for sub in m.modules():
            if isinstance(sub, nn.Dropout | nn.Dropout2d | nn.Dropout1d | nn.AlphaDropout):
                sub.eval()  # dropout off: every computation sees the same network
    t64 = None
    if isinstance(regularizer, LVAT):
        t64 = copy.deepcopy(regularizer.transformer).double()
    x64 = x.double()
    try:
        amp = (
            torch.autocast(x.device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with amp:
            run = _seeded(seed, lambda: regularizer.perturbation(model, x))
        same64 = _seeded(seed, lambda: _like(regularizer, t64).perturbation(model64, x64))
        top = _seeded(
            seed,
            lambda: _like(
                regularizer, t64, power_method="exact", power_iterations=reference_iterations
            ).perturbation(model64, x64),
        )
        fd = _seeded(
            seed,
            lambda: _like(
                regularizer, t64, power_method="finite-difference", power_iterations=1
            ).perturbation(model64, x64),
        )
        ex = _seeded(
            seed,
            lambda: _like(regularizer, t64, power_method="exact", power_iterations=1).perturbation(
                model64, x64
            ),
        )
        out = {
            "float64": _cos(run, same64),
            "top_eigenvector": _cos(run, top).abs(),
            "finite_vs_exact": _cos(fd, ex),
        }
        if t64 is not None:
            lvat64 = _like(regularizer, t64)
            out["first_order"] = _cos(run, _first_order(model64, lvat64, x64, seed))
    finally:
        for m, flag in was_training.items():
            m.train(flag)
    return {k: v.cpu() for k, v in out.items()}


def summarize(cosines: Tensor) -> dict:
    """Median, 10th percentile, min and the share below 0.9 of per-sample cosines."""
    c = cosines.double()
    return {
        "median": round(c.median().item(), 4),
        "p10": round(torch.quantile(c, 0.1).item(), 4),
        "min": round(c.min().item(), 4),
        "below_0.9": round((c < 0.9).double().mean().item(), 4),
        "count": len(c),
    }


LABELS = {
    "float64": "vs float64 (same method, same xi)",
    "top_eigenvector": "vs top eigenvector (|cos|)",
    "finite_vs_exact": "float64: finite difference vs exact",  # LVAT: ~first order vs Fisher
    "first_order": "vs first-order term (LVAT)",
}


def summary_line(info: dict) -> str:
    """One line a human can read: the medians (and the share below 0.9) of every cosine."""
    parts = []
    for key, label in LABELS.items():
        s = info["summary"].get(key)
        if s is not None:
            parts.append(f"{label}: median {s['median']:.2f} ({100 * s['below_0.9']:.0f}% < 0.9)")
    amp = ", bf16" if info.get("amp") == "bf16" else ""
    head = f"direction of {info['method']} ({info['power_method']}, xi={info['xi']:g}{amp})"
    return f"{head} on {info['count']} test images: " + "; ".join(parts)


def write_report(cosines: dict[str, Tensor], meta: dict, out: Path) -> dict:
    """directions.json (per-sample cosines and summaries) and a histogram figure (PNG + PDF),
    each written atomically."""
    from lvat.analysis.figures import _figure, _save
    from lvat.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    info = {
        **meta,
        "summary": {k: summarize(v) for k, v in cosines.items()},
        "cosines": {k: [round(float(c), 5) for c in v] for k, v in cosines.items()},
        "files": {"json": str(out / "directions.json"), "png": str(out / "directions.png"),
                  "pdf": str(out / "directions.pdf")},
    }  # fmt: skip
    cols = len(cosines)
    fig = _figure(figsize=(3.6 * cols, 3.0))
    axes = fig.subplots(1, cols, squeeze=False)
    bins = torch.linspace(-1, 1, 41).tolist()
    for ax, (key, values) in zip(axes[0], cosines.items(), strict=True):
        ax.hist(values.tolist(), bins=bins, color="#3b6ea5")
        ax.set_title(LABELS[key], fontsize=9)
        ax.set_xlabel("per-sample cosine")
        ax.set_xlim(-1, 1)
        med = float(values.median())
        ax.axvline(med, color="#c0392b", lw=1)
        ax.text(
            med, ax.get_ylim()[1] * 0.92, f" median {med:.2f} ", color="#c0392b", fontsize=8,
            ha="right" if med > 0 else "left",
        )  # fmt: skip
    axes[0][0].set_ylabel("images")
    fig.suptitle(summary_line(info).split(":", 1)[0], fontsize=10)
    fig.tight_layout()
    _save(fig, out / "directions.png")  # and directions.pdf
    atomic_write_text(out / "directions.json", json.dumps(info, indent=1) + "\n")
    return info


def diagnose_run(
    run_dir: str | Path,
    *,
    images: int = 256,
    batch_size: int | None = None,
    reference_iterations: int = 30,
    seed: int = 0,
    device: str | None = None,
    xi: float | None = None,
    power_method: str | None = None,
    amp: str = "off",
    out: str | Path | None = None,
    transformer: str | None = None,
) -> dict:
    """`lvat diagnose RUN_DIR`: the direction cosines of a VAT/LVAT run on its test images,
    written to RUN_DIR/diagnostics/ (or `out`); returns directions.json's content.

    `xi`, `power_method` and `amp` ("off" or "bf16") replace the run's own settings for the
    direction being judged: what another choice would have given on the same trained network.
    `transformer` (a checkpoint, .safetensors file or shipped name) judges LVAT's latent
    direction with it on the run's classifier, whatever method trained it.
    """
    from lvat.data import to_float
    from lvat.errors import LvatError
    from lvat.models.registry import kind_for_model
    from lvat.regularizers import method_key
    from lvat.train.runs import load_run
    from lvat.train.setup import build_regularizer

    run = load_run(run_dir, device)
    method = run.config.method
    changes = {"xi": xi, "power_method": power_method, "transformer": transformer}
    if transformer is not None:
        changes["name"] = "lvat"
    method = dataclasses.replace(method, **{k: v for k, v in changes.items() if v is not None})
    if amp not in ("off", "bf16"):
        raise LvatError(f"--amp must be off or bf16, got {amp!r}")
    regularizer = build_regularizer(method, run.device)
    if not isinstance(regularizer, VAT | LVAT):  # sup, or a plugin's cost without a direction
        raise LvatError(f"{run.path} is a '{method.name}' run: no perturbation to diagnose")
    transformer = getattr(regularizer, "transformer", None)
    kind = kind_for_model(transformer).name if transformer is not None else None
    if images < 2:
        raise LvatError("--images must be at least 2 (BatchNorm needs batch statistics)")
    x_test = run.dataset.x_test
    n = min(images, len(x_test))
    idx = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(seed))[:n]
    bs = batch_size or run.config.train.batch_unlabeled
    parts: dict[str, list[Tensor]] = {}
    for i, chunk in enumerate(torch.tensor_split(idx, math.ceil(n / bs))):
        x = to_float(x_test[chunk].to(run.device))
        got = direction_quality(
            run.model,
            regularizer,
            x,
            reference_iterations=reference_iterations,
            seed=seed + i,
            amp_dtype=torch.bfloat16 if amp == "bf16" else None,
        )
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
    cosines = {k: torch.cat(v) for k, v in parts.items()}
    meta = {
        "run": str(run.path),
        "step": run.step,
        "method": method_key(method.name, kind),
        "power_method": method.power_method,
        "xi": method.xi,
        "power_iterations": method.power_iterations,
        "amp": amp,
        "reference_iterations": reference_iterations,
        "count": n,
        "batch_size": bs,
        "seed": seed,
    }
    return write_report(cosines, meta, Path(out) if out else run.path / "diagnostics")
