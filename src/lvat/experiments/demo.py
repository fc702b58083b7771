"""`lvat demo`: what LVAT does, on a laptop CPU, in minutes.

Fashion-MNIST (padded to 32x32), semi-supervised with few labels: train a small VAE, then
`sup`, `vat` and `lvat-vae` classifiers with the same budget (steps, batches, model, labeled
subset), print the comparison and draw the figures. Finished parts are skipped on a re-run.
The budget is fixed by the constants below; they were chosen so the whole demo fits in 10
minutes on 2 CPU cores (see README: what it shows and what it does not).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lvat.config import Config, load_config
from lvat.regularizers import METHODS, method_key

# The budget (2 CPU cores, <= 10 minutes in all). Units: updates and images.
LABELS = 100  # 10 per class
VALIDATION = 1000  # held out, never trained on; reported beside test
VAE_STEPS, VAE_BATCH = 250, 64
CLASSIFIER_STEPS, DECAY_STEPS = 300, 100
BATCH_LABELED, BATCH_UNLABELED = 32, 64
EPS = {"vat": 2.0, "lvat": 1.0}  # VAT: input-space L2 (VAT used 2.0 on MNIST); LVAT: latent L2
KIND = "vae"  # the transformer kind the demo fits for LVAT
FIGURE_SAMPLES = 1000

DATA_FLAGS = ["--data.name", "fashion-mnist", "--data.pad_to", "32"]


def _classifier_config(method: str, out: Path, transformer: Path) -> Config:
    flags = [
        *DATA_FLAGS,
        *("--data.num_labeled", str(LABELS), "--data.num_validation", str(VALIDATION)),
        *("--model.name", "conv-small", "--method.name", method),
        *("--train.steps", str(CLASSIFIER_STEPS), "--train.decay_steps", str(DECAY_STEPS)),
        *("--train.batch_labeled", str(BATCH_LABELED)),
        *("--train.batch_unlabeled", str(BATCH_UNLABELED)),
        *("--train.eval_every", str(CLASSIFIER_STEPS), "--train.log_every", "50"),
        *("--train.checkpoint_every", "200", "--train.eval_batch_size", "1000"),
        *("--device", "cpu", "--out", str(out / method)),
    ]
    entry = METHODS[method]
    if entry.regularized:
        flags += ["--method.eps", str(EPS[method])]
    if entry.needs_transformer:
        flags += ["--method.transformer", str(transformer)]
    return load_config(Config, None, flags)


def _done(run: Path) -> bool:
    return (run / "results.json").is_file()


def demo(out: str | Path = "runs/demo") -> list[dict]:
    """Run the demo into `out`; return one row per method (test/validation error, time)."""
    from lvat.analysis.figures import make_figures
    from lvat.fit import fit, fit_config, summary
    from lvat.train import train

    out = Path(out)
    t0 = time.perf_counter()
    vae_dir = out / "vae"
    transformer = vae_dir / "checkpoint.pt"
    print(f"[1/5] VAE: {VAE_STEPS} updates at batch {VAE_BATCH} -> {vae_dir}", flush=True)
    if not _done(vae_dir):
        cfg = fit_config(KIND, None, [
            *DATA_FLAGS, "--train.steps", str(VAE_STEPS), "--train.batch_size", str(VAE_BATCH),
            "--train.eval_every", str(VAE_STEPS), "--train.final_eval_images", "1000",
            "--device", "cpu", "--out", str(vae_dir),
        ])  # fmt: skip
        print("      " + summary(fit(cfg, resume=(vae_dir / "checkpoint.pt").is_file())))
    rows = []
    for i, method in enumerate(("sup", "vat", "lvat"), start=2):
        cfg = _classifier_config(method, out, transformer)
        run = Path(cfg.out)
        print(f"[{i}/5] {method}: {CLASSIFIER_STEPS} updates, {LABELS} labels -> {run}", flush=True)
        if not _done(run):
            train(cfg, resume=(run / "checkpoint.pt").is_file())
        res = json.loads((run / "results.json").read_text())
        regularized = METHODS[method].regularized
        rows.append({"method": method_key(method, KIND), "eps": cfg.method.eps
                     if regularized else None, "test_error": res["test_error"],
                     "validation_error": res.get("validation_error"),
                     "wall_time_s": res["wall_time_s"], "run": str(run)})  # fmt: skip
    print("[5/5] figures", flush=True)
    figures = {}
    for method in ("vat", "lvat"):
        info = make_figures(out / method, samples=FIGURE_SAMPLES, seed=0, device="cpu")
        figures[method] = info["files"]
    print(table(rows))
    print(f"\nfigures: {out / 'lvat' / 'figures'} and {out / 'vat' / 'figures'}")
    print(f"demo took {time.perf_counter() - t0:.0f} s (parts already done were skipped)")
    return rows


def table(rows: list[dict]) -> str:
    """The comparison as a Markdown table."""
    lines = [
        f"\nFashion-MNIST, {LABELS} labels, conv-small, {CLASSIFIER_STEPS} updates, one seed:",
        "| method | eps | test error % | validation error % | train time s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "-" if r["eps"] is None else f"{r['eps']:g}"
        val = "-" if r["validation_error"] is None else f"{r['validation_error']:.2f}"
        lines.append(f"| {r['method']} | {eps} | {r['test_error']:.2f} | {val} | "
                     f"{r['wall_time_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)
