"""The one training loop: SL and SSL, with no regularizer, VAT or LVAT (paper section 5.2).

Per step (`lvat.train.step.train_step`): cross-entropy on a labeled batch (the only pass that
updates BatchNorm statistics), plus alpha times the regularizer's consistency cost on an unlabeled
batch; Adam with the paper's schedule. Around the step, `lvat.train.stepper` logs, evaluates
and checkpoints on schedule; metrics are summed on the device and read back once per log window
only, so a step has no host synchronisation. Under torchrun the same loop runs data-parallel
(`lvat.train.distributed`); rank 0 writes the run folder (`lvat.train.run_folder`: locking,
fresh-run and resume rules):

    config.toml  split.json  metrics.jsonl  eval.jsonl  checkpoint.pt  results.json

metrics.jsonl's `zero_direction` is the fraction of unlabeled samples whose VAT/LVAT perturbation
vanished (a saturated classifier, e.g. after a divergent learning rate); above one half the loop
warns once on stderr, since the regularizer then silently adds nothing.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F  # noqa: F401  (the step's F; tests patch loop.F.cross_entropy)

from lvat.config import Config, to_dict
from lvat.data import load_from_config, resolve_split, train_batches
from lvat.data.prepare import SPLIT_FILE
from lvat.environment import environment
from lvat.errors import LvatError
from lvat.models.registry import kind_for_model
from lvat.train import checkpoint, distributed, fast, schedule
from lvat.train.distributed import GradSync, World, rank_seed
from lvat.train.monitor import NonFiniteLoss
from lvat.train.run_folder import EVALS, METRICS, RunFolder
from lvat.train.runs import evaluate_splits
from lvat.train.setup import build_model, build_regularizer
from lvat.train.step import STATS, train_step
from lvat.train.stepper import Stepper

HINT = "train.lr or method.eps"  # what to lower after a NaN

# NonFiniteLoss: re-exported (lvat.train imports it from here).
__all__ = ["NonFiniteLoss", "train"]


def train(cfg: Config, *, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train (or resume) the run described by `cfg` in `cfg.out`; return its results.

    Under torchrun every rank calls this and gets the same results back (see
    `lvat.train.distributed` for the data-parallel contract).

    Args:
        cfg: the resolved config.
        resume: continue from `cfg.out/checkpoint.pt` exactly where it stopped; a finished
            run is left as it is and its results.json returned.
        stop_at: stop after this many total steps (checkpointing there) without finishing;
            for time-boxed jobs and tests. The schedule still runs to `cfg.train.steps`.
    """
    world = distributed.start(cfg.device)
    keep = [cfg.data.split_file] if cfg.data.split_file else []
    with RunFolder(cfg.out, files=(SPLIT_FILE,), keep=keep, main=world.is_main) as run:
        finished = run.open(resume=resume, steps=cfg.train.steps, broadcast=world.broadcast)
        if finished is not None:
            return finished
        return _train(cfg, world, run, stop_at)


def _train(cfg: Config, world: World, run: RunFolder, stop_at: int | None) -> dict:
    tc, device, main = cfg.train, world.device, world.is_main
    batch_l = distributed.local_batch(tc.batch_labeled, world, "train.batch_labeled")
    batch_u = distributed.local_batch(tc.batch_unlabeled, world, "train.batch_unlabeled")
    fast.check_cache(cfg)
    fast_path = fast.resolve(tc, device, cfg.method.name)
    dataset = load_from_config(cfg.data)
    # Drawn (or read) once on rank 0, which writes split.json; the same object everywhere.
    split = world.broadcast(resolve_split(cfg.data, dataset, run.path) if main else None)
    if len(split.labeled) < 1:  # every method's loss has a cross-entropy on labeled images
        where = cfg.data.split_file or "the split"
        raise LvatError(f"{where} has no labeled images; every method needs some (num_labeled)")

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
    metrics = run.log(METRICS, tc.tensorboard)
    evals = run.log(EVALS)

    def restore(state: dict) -> None:
        nonlocal batches
        # Entries, saved config, and the keys a resume must keep (model, split, method, seed):
        # an override that changes them is refused here too, not only by the CLI.
        checkpoint.check_resume_state(state, run.checkpoint, cfg)
        checkpoint.load_model_state(model, state["model"], run.checkpoint, "the model")
        checkpoint.load_optimizer_state(optimizer, state["optimizer"], run.checkpoint)
        start = int(state["step"])
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

    state = run.restore(restore)  # resume: load, then cut metrics back to its step
    run.write_config(cfg)  # only now: a resume that does not fit the checkpoint changes nothing
    steps = Stepper(tc, STATS, run, metrics, world, resumed=state, stop_at=stop_at, hint=HINT)

    def save(step: int) -> None:
        run.check_finite(model, step, HINT)
        own = {"batches": batches.state_dict(), "rng": checkpoint.rng_state()}
        ranks = distributed.rank_states(world, **own)  # a collective: every rank takes part
        if not main:
            return
        run.write_checkpoint(
            lambda path: checkpoint.save(
                path,
                {
                    "step": step,
                    "elapsed": steps.time_s(),
                    "config": to_dict(cfg),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    **own,  # rank 0's; the other ranks' are in "ranks"
                    **ranks,
                },
            )
        )

    def run_eval(step: int, record: bool = True) -> dict:
        row = {"step": step, **evaluate_splits(model, dataset, split, tc.eval_batch_size, device)}
        if record:
            evals.write({k: v for k, v in row.items() if not isinstance(v, list)})
        return row

    warned = False  # about vanished regularizer directions: once per run

    def watch(row: dict, first: int) -> None:
        nonlocal warned
        if not warned and row["zero_direction"] > 0.5:
            warned = True
            print(vanished_direction(row["zero_direction"], first, row["step"]), file=sys.stderr)

    # The loop: logging, evaluation and checkpoints on schedule are the stepper's.
    for step in steps.run(evaluate=run_eval, save=save, watch=watch):
        lr, beta1 = schedule.lr_and_beta1(step, tc)
        schedule.apply(optimizer, lr, beta1)
        batch = batches.next()
        z = cache.lookup(batch.idx_unlabeled) if cache is not None else None
        stats = train_step(
            model,
            regularizer,
            optimizer,
            batch,
            cfg.method.alpha,
            fast_path.amp_dtype,
            z_unlabeled=z,
            sync=sync,
        )
        steps.add(stats, lr=lr, beta1=beta1)
    if not steps.finished:
        return steps.unfinished()
    wall_time = steps.time_s()  # not counting a re-evaluation (below)
    final = steps.evaluation
    if main and not final:  # resumed after the final checkpoint, killed before results.json
        final = run_eval(tc.steps, record=False)  # eval.jsonl already has this row
    results = None
    if main:
        results = {
            "method": cfg.method.name,
            # the transformer's kind, so that a report can name the row ("LVAT-VAE") where the
            # transformer file itself is absent (results committed without runs/fit/)
            "transformer_kind": _kind_name(getattr(regularizer, "transformer", None)),
            "dataset": dataset.name,
            "num_labeled": len(split.labeled),
            "seed": cfg.seed,
            "split_seed": split.seed,
            **{k: v for k, v in final.items() if k != "step"},
            "steps": tc.steps,
            "wall_time_s": round(wall_time, 2),
            "processes": world.size,
            **fast_path.describe(),
            **fast.describe_cache(cache),
            **environment(device),
        }
        run.write_results(results)
    return world.broadcast(results)  # also keeps the other ranks until rank 0 has written


def vanished_direction(fraction: float, first: int, last: int) -> str:
    """The one warning a run prints when its regularizer stopped perturbing (see module doc)."""
    return (
        f"warning: steps {first}-{last}: the regularizer's direction vanished for "
        f"{fraction:.0%} of unlabeled samples (zero_direction in metrics.jsonl; the classifier's "
        "outputs saturated), so VAT/LVAT adds nothing there; lower train.lr (warned once)"
    )


def _kind_name(transformer: object) -> str | None:
    if transformer is None:
        return None
    try:
        return kind_for_model(transformer).name
    except TypeError:  # a user's object that is no registered kind
        return None
