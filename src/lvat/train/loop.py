"""The one training loop: SL and SSL, with no regularizer, VAT or LVAT (paper section 5.2).

Per step: cross-entropy on a labeled batch (the only pass that updates BatchNorm statistics),
plus alpha times the regularizer's consistency cost on an unlabeled batch; Adam with the paper's
schedule. Metrics are summed on the device and read back every `log_every` steps only, so a
step has no host synchronisation. A run folder holds:

    config.toml  split.json  metrics.jsonl  eval.jsonl  checkpoint.pt  results.json
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lvat.config import Config, save_config, to_dict
from lvat.data import load_from_config, resolve_split, train_batches
from lvat.environment import environment
from lvat.errors import LvatError
from lvat.io import atomic_write_text
from lvat.train import checkpoint, schedule
from lvat.train.monitor import MetricsLog, Progress
from lvat.train.runs import evaluate_splits
from lvat.train.setup import build_model, build_regularizer, resolve_device

METRICS = ("loss", "ce", "kl", "entropy", "adv_l2")  # summed per step, averaged per log row


class NonFiniteLoss(LvatError):
    """The training loss became NaN or infinite."""


def train(cfg: Config, *, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train (or resume) the run described by `cfg` in `cfg.out`; return its results.

    Args:
        cfg: the resolved config.
        resume: continue from `cfg.out/checkpoint.pt` exactly where it stopped.
        stop_at: stop after this many total steps (checkpointing there) without finishing;
            for time-boxed jobs and tests. The schedule still runs to `cfg.train.steps`.
    """
    run = Path(cfg.out)
    ckpt_path = run / checkpoint.CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise LvatError(
            f"{run} already holds a run; add --resume to continue it or pick another --out"
        )
    if resume and not ckpt_path.exists():
        raise LvatError(f"nothing to resume: {ckpt_path} does not exist")
    tc = cfg.train
    device = resolve_device(cfg.device)
    dataset = load_from_config(cfg.data)
    run.mkdir(parents=True, exist_ok=True)
    split = resolve_split(cfg.data, dataset, run)
    if cfg.method.name == "sup" and len(split.labeled) < 1:
        raise LvatError("no labeled images in the split")
    save_config(cfg, run / "config.toml")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset).to(device).train()
    regularizer = build_regularizer(cfg.method, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    batches = train_batches(
        cfg.data, dataset, split, tc.batch_labeled, tc.batch_unlabeled, device=device, seed=cfg.seed
    )
    metrics, evals = (
        MetricsLog(run / "metrics.jsonl", tc.tensorboard),
        MetricsLog(run / "eval.jsonl"),
    )
    start, elapsed = 0, 0.0
    if resume:
        state = checkpoint.load(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        checkpoint.set_rng_state(state["rng"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        metrics.truncate_after(start)
        evals.truncate_after(start)
    end = min(tc.steps, stop_at) if stop_at is not None else tc.steps

    def save(step: int) -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise NonFiniteLoss(f"non-finite weights at step {step}; {ckpt_path} was not touched")
        checkpoint.save(
            ckpt_path,
            {
                "step": step,
                "elapsed": elapsed + time.perf_counter() - t0,
                "config": to_dict(cfg),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "batches": batches.state_dict(),
                "rng": checkpoint.rng_state(),
            },
        )

    def run_eval(step: int) -> dict:
        row = {"step": step, **evaluate_splits(model, dataset, split, tc.eval_batch_size, device)}
        evals.write({k: v for k, v in row.items() if not isinstance(v, list)})
        return row

    progress = Progress(end, start, tc.progress)
    final: dict = {}
    sums = torch.zeros(len(METRICS), device=device)
    window = 0
    t0 = time.perf_counter()
    t_log = t0
    for step in range(start, end):
        lr, beta1 = schedule.lr_and_beta1(step, tc)
        schedule.apply(optimizer, lr, beta1)
        batch = batches.next()
        ce = F.cross_entropy(model(batch.x_labeled), batch.y_labeled)  # updates BN statistics
        loss, zero = ce, ce.new_zeros(())
        stats = {"kl": zero, "entropy": zero, "adv_l2": zero}
        if regularizer is not None:
            reg_loss, stats = regularizer.loss_and_stats(model, batch.x_unlabeled)
            loss = ce + cfg.method.alpha * reg_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.stack(
            [loss.detach(), ce.detach(), stats["kl"], stats["entropy"], stats["adv_l2"]]
        ).float()
        window += 1
        done = step + 1
        last = done == end
        if done % tc.log_every == 0 or last or done % tc.checkpoint_every == 0:
            means = (sums / window).tolist()  # the host sync, once per window
            if not all(math.isfinite(v) for v in means):
                raise NonFiniteLoss(
                    f"non-finite loss between steps {done - window + 1} and {done}; training "
                    f"stopped and the last good checkpoint in {ckpt_path} is intact. Lower "
                    f"train.lr or method.eps, then continue with --resume"
                )
            now = time.perf_counter()
            row = {
                "step": done,
                **dict(zip(METRICS, means, strict=True)),
                "lr": lr,
                "beta1": beta1,
                "steps_per_s": window / (now - t_log),
                "time_s": elapsed + now - t0,
            }
            metrics.write(row)
            progress.update(done, loss=row["loss"])
            sums.zero_()
            window, t_log = 0, now
        if done % tc.eval_every == 0 or last:
            final = run_eval(done)
        if done % tc.checkpoint_every == 0 or last:
            save(done)
    progress.close()
    metrics.close()
    if end < tc.steps:
        return {"step": end, "finished": False}
    if not final:  # resumed a run that had already finished
        final = run_eval(tc.steps)
    results = {
        "method": cfg.method.name,
        "dataset": dataset.name,
        "num_labeled": len(split.labeled),
        "seed": cfg.seed,
        "split_seed": split.seed,
        **{k: v for k, v in final.items() if k != "step"},
        "steps": tc.steps,
        "wall_time_s": round(elapsed + time.perf_counter() - t0, 2),
        **environment(device),
    }
    atomic_write_text(run / "results.json", json.dumps(results, indent=1) + "\n")
    return results
