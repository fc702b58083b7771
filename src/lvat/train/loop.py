"""The one training loop: SL and SSL, with no regularizer, VAT or LVAT (paper section 5.2).

Per step (`lvat.train.step.train_step`): cross-entropy on a labeled batch (the only pass that
updates BatchNorm statistics), plus alpha times the regularizer's consistency cost on an unlabeled
batch; Adam with the paper's schedule. Metrics are summed on the device and read back every
`log_every` steps only, so a step has no host synchronisation. Under torchrun the same loop runs
data-parallel (`lvat.train.distributed`); rank 0 writes the run folder:

    config.toml  split.json  metrics.jsonl  eval.jsonl  checkpoint.pt  results.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: F401  (the step's F; tests patch loop.F.cross_entropy)

from lvat.config import Config, save_config, to_dict
from lvat.data import load_from_config, resolve_split, train_batches
from lvat.environment import environment
from lvat.errors import LvatError
from lvat.io import atomic_write_text
from lvat.train import checkpoint, distributed, fast, schedule
from lvat.train.distributed import GradSync, World, rank_seed
from lvat.train.monitor import MetricsLog, NonFiniteLoss, Progress, window_means
from lvat.train.runs import evaluate_splits
from lvat.train.setup import build_model, build_regularizer
from lvat.train.step import STATS, train_step

METRICS = STATS  # summed per step, averaged per log row


def train(cfg: Config, *, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train (or resume) the run described by `cfg` in `cfg.out`; return its results.

    Under torchrun every rank calls this and gets the same results back (see
    `lvat.train.distributed` for the data-parallel contract).

    Args:
        cfg: the resolved config.
        resume: continue from `cfg.out/checkpoint.pt` exactly where it stopped.
        stop_at: stop after this many total steps (checkpointing there) without finishing;
            for time-boxed jobs and tests. The schedule still runs to `cfg.train.steps`.
    """
    ckpt_path = Path(cfg.out) / checkpoint.CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise LvatError(
            f"{cfg.out} already holds a run; add --resume to continue it or pick another --out"
        )
    if resume and not ckpt_path.exists():
        raise LvatError(f"nothing to resume: {ckpt_path} does not exist")
    return _train(cfg, distributed.start(cfg.device), resume, stop_at)


def _train(cfg: Config, world: World, resume: bool, stop_at: int | None) -> dict:
    run = Path(cfg.out)
    ckpt_path = run / checkpoint.CHECKPOINT
    tc, device, main = cfg.train, world.device, world.is_main
    batch_l = distributed.local_batch(tc.batch_labeled, world, "train.batch_labeled")
    batch_u = distributed.local_batch(tc.batch_unlabeled, world, "train.batch_unlabeled")
    fast.check_cache(cfg)
    fast_path = fast.resolve(tc, device)
    dataset = load_from_config(cfg.data)
    if main:
        run.mkdir(parents=True, exist_ok=True)
    # Drawn (or read) once on rank 0, which writes split.json; the same object everywhere.
    split = world.broadcast(resolve_split(cfg.data, dataset, run) if main else None)
    if cfg.method.name == "sup" and len(split.labeled) < 1:
        raise LvatError("no labeled images in the split")
    if main:
        save_config(cfg, run / "config.toml")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, dataset).to(device).train()
    distributed.broadcast_module(model, world)
    if world.rank:  # other ranks draw other dropout masks and perturbation noise
        torch.manual_seed(rank_seed(cfg.seed, world.rank))
    regularizer = build_regularizer(cfg.method, device)
    cache = fast.latent_cache(cfg, regularizer, dataset.x_train, device, log=main)
    fast.apply(model, regularizer, fast_path)
    optimizer = fast.adam(model, tc, device)
    sync = GradSync(model, world) if world.size > 1 else None
    seed = rank_seed(cfg.seed, world.rank)
    batches = train_batches(cfg.data, dataset, split, batch_l, batch_u, device=device, seed=seed)
    metrics = MetricsLog(run / "metrics.jsonl", tc.tensorboard) if main else None
    evals = MetricsLog(run / "eval.jsonl") if main else None
    start, elapsed = 0, 0.0
    if resume:
        state = checkpoint.load(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        own = distributed.own_state(state, world)
        if own is not None:
            batches.load_state_dict(own["batches"])
            checkpoint.set_rng_state(own["rng"])
        else:  # the number of processes changed: fresh, seeded streams (documented approximation)
            if main:
                print(
                    f"resume: {state.get('world_size', 1)} -> {world.size} processes; batch order "
                    "and noise restart from (seed + step, rank)",
                    file=sys.stderr,
                )
            fresh = rank_seed(cfg.seed + start, world.rank)
            torch.manual_seed(fresh)
            batches = train_batches(
                cfg.data, dataset, split, batch_l, batch_u, device=device, seed=fresh
            )
        if main:
            metrics.truncate_after(start)
            evals.truncate_after(start)
    end = min(tc.steps, stop_at) if stop_at is not None else tc.steps

    def save(step: int) -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise NonFiniteLoss(f"non-finite weights at step {step}; {ckpt_path} was not touched")
        own = {"batches": batches.state_dict(), "rng": checkpoint.rng_state()}
        ranks = distributed.rank_states(world, **own)  # a collective: every rank takes part
        if not main:
            return
        checkpoint.save(
            ckpt_path,
            {
                "step": step,
                "elapsed": elapsed + time.perf_counter() - t0,
                "config": to_dict(cfg),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                **own,  # rank 0's; the other ranks' are in "ranks"
                **ranks,
            },
        )

    def run_eval(step: int) -> dict:
        row = {"step": step, **evaluate_splits(model, dataset, split, tc.eval_batch_size, device)}
        evals.write({k: v for k, v in row.items() if not isinstance(v, list)})
        return row

    progress = Progress(end, start, tc.progress and main)
    final: dict = {}
    sums = torch.zeros(len(METRICS), device=device)
    window = 0
    t0 = time.perf_counter()
    t_log = t0
    for step in range(start, end):
        lr, beta1 = schedule.lr_and_beta1(step, tc)
        schedule.apply(optimizer, lr, beta1)
        batch = batches.next()
        z = cache.lookup(batch.idx_unlabeled) if cache is not None else None
        sums += train_step(
            model,
            regularizer,
            optimizer,
            batch,
            cfg.method.alpha,
            fast_path.amp_dtype,
            z_unlabeled=z,
            sync=sync,
        )
        window += 1
        done = step + 1
        last = done == end
        if done % tc.log_every == 0 or last or done % tc.checkpoint_every == 0:
            means = window_means(
                world.mean(sums), window, done, ckpt_path, "train.lr or method.eps"
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
            if main:
                metrics.write(row)
            progress.update(done, loss=row["loss"])
            sums.zero_()
            window, t_log = 0, now
        if main and (done % tc.eval_every == 0 or last):
            final = run_eval(done)
        if done % tc.checkpoint_every == 0 or last:
            save(done)
    progress.close()
    if main:
        metrics.close()
    if end < tc.steps:
        world.barrier()  # nobody leaves (and maybe resumes) before rank 0 has saved
        return {"step": end, "finished": False}
    if main and not final:  # resumed a run that had already finished
        final = run_eval(tc.steps)
    results = None
    if main:
        results = {
            "method": cfg.method.name,
            "dataset": dataset.name,
            "num_labeled": len(split.labeled),
            "seed": cfg.seed,
            "split_seed": split.seed,
            **{k: v for k, v in final.items() if k != "step"},
            "steps": tc.steps,
            "wall_time_s": round(elapsed + time.perf_counter() - t0, 2),
            "processes": world.size,
            **fast_path.describe(),
            **fast.describe_cache(cache),
            **environment(device),
        }
        atomic_write_text(run / "results.json", json.dumps(results, indent=1) + "\n")
    return world.broadcast(results)  # also keeps the other ranks until rank 0 has written
