"""`lvat fit vae|glow`: train the transformer that LVAT perturbs (docs/method.md §3.3-3.5).

The transformer is trained once per dataset (and augmentation setting) on ALL training images,
labels ignored, then frozen and reused by every LVAT classifier run (paper section 5.2). Test
images are only evaluated, never trained on or augmented.

Per step: one batch, the model's loss (VAE: BCE + 0.1 KL; Glow: NLL in bits/dim), Adam, the
schedule of `lr_at`. Around the step, `lvat.train.stepper` logs, evaluates and checkpoints on
schedule, as for `lvat train`; metrics are summed on the device and read back once per log
window, so a step has no host synchronisation. Glow's ActNorms are initialised from data once,
explicitly, before the first step (their values then live in the state dict, so resume does not
redo it).
The checkpoint is a transformer checkpoint: `lvat.load_transformer(run/checkpoint.pt)` works on
it directly; the extra entries (optimizer, RNG, stream, config) make `--resume` exact. A run
folder (`lvat.train.run_folder`: locking, fresh-run and resume rules, as for `lvat train`) holds:

    config.toml  metrics.jsonl  eval.jsonl  checkpoint.pt  results.json
    test.png  reconstruction.png  samples.png
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lvat.config import from_dict, load_config, to_dict
from lvat.config.core import check_resume, resume_config
from lvat.data import load_from_config
from lvat.data.prepare import resolve_flip
from lvat.environment import environment
from lvat.errors import ConfigError, LvatError
from lvat.fit.evaluate import GRIDS, evaluate_transformer, probe, write_grids
from lvat.fit.export import weight_history
from lvat.fit.setup import (
    FitConfig,
    ImageStream,
    Kind,
    check_image_size,
    check_schedule,
    default_out,
    kind_of,
    lr_at,
)
from lvat.models.registry import KINDS, kind_for_model
from lvat.models.transformers import load_transformer, save_transformer
from lvat.train import checkpoint
from lvat.train.distributed import World
from lvat.train.run_folder import EVALS, METRICS, RunFolder
from lvat.train.setup import resolve_device
from lvat.train.stepper import Stepper

HINT = "train.lr"  # what to lower after a NaN


def fit_config(
    kind: str,
    path: str | None = None,
    overrides: Sequence[str] = (),
    *,
    dataset: str | None = None,
    resume: str | None = None,
) -> FitConfig:
    """The config of `lvat fit KIND` (a registered kind): file, then flags (`dataset` =
    `--data.name`); or, with `resume`, the config saved in that run's checkpoint with the flags
    on top."""
    cls = KINDS[kind].config
    overrides = list(overrides)
    if dataset is not None:
        if any(a == "--data.name" or a.startswith("--data.name=") for a in overrides):
            raise ConfigError("give the dataset once: --dataset or --data.name")
        overrides += ["--data.name", dataset]
    if not resume:
        return resolve_out(load_config(cls, path, overrides))
    if path:
        raise LvatError("--resume RUN_DIR takes its config from the run; drop --config")
    state = checkpoint.load(Path(resume) / checkpoint.CHECKPOINT)
    if "config" not in state or state.get("kind") not in KINDS:
        raise LvatError(f"{resume} is not an `lvat fit` run (no fit config in its checkpoint)")
    if state["kind"] != kind:
        found = state["kind"]
        raise LvatError(f"{resume} holds a {found} run; resume it with lvat fit {found}")
    # The saved config, the flags on top; a flag that changes a RESUME_FIXED key is refused.
    return resume_config(cls, dict(state["config"]), overrides, str(resume))


def resolve_out(cfg: FitConfig) -> FitConfig:
    """`cfg` with its run folder filled in (empty `out` -> runs/fit/DATASET-KIND)."""
    if cfg.out:
        return cfg
    return dataclasses.replace(cfg, out=default_out(kind_of(cfg).name, cfg.data.name))


def fit(cfg: FitConfig, *, resume: bool = False, stop_at: int | None = None) -> dict:
    """Train (or resume) the transformer described by `cfg` in `cfg.out`; return its results.

    Args:
        cfg: a resolved fit config of a registered kind (`VAEFitConfig`, `GlowFitConfig`, ...).
        resume: continue from `cfg.out/checkpoint.pt` exactly where it stopped; a finished
            run is left as it is and its results.json returned.
        stop_at: stop after this many total steps (checkpointing there) without finishing;
            for time-boxed jobs and tests. The schedule still runs to `cfg.train.steps`.

    Returns:
        results.json's content, or ``{"step": k, "finished": False}`` when stopped early.
    """
    kind = kind_of(cfg)
    cfg = resolve_out(cfg)
    check_schedule(cfg.train)
    with RunFolder(cfg.out, files=GRIDS) as run:
        finished = run.open(resume=resume, steps=cfg.train.steps)
        if finished is not None:
            return finished
        return _fit(cfg, kind, run, stop_at)


def _fit(cfg: FitConfig, kind: Kind, run: RunFolder, stop_at: int | None) -> dict:
    tc = cfg.train
    device = resolve_device(cfg.device)
    world = World(device=device)  # one process: `lvat fit` is not data-parallel
    dataset = load_from_config(cfg.data)
    check_image_size(kind, cfg, dataset)

    torch.manual_seed(cfg.seed)
    model = kind.build(cfg, dataset.image_shape).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    stream = ImageStream(
        dataset.x_train,
        tc.batch_size,
        device=device,
        seed=cfg.seed,
        augment=cfg.data.augment,
        translate=cfg.data.translate,
        flip=resolve_flip(cfg.data, dataset),
    )
    metrics = run.log(METRICS, tc.tensorboard)
    evals = run.log(EVALS)

    def restore(state: dict) -> None:
        if state.get("kind") != kind.name:
            raise LvatError(f"{run.checkpoint} holds a {state.get('kind')} run, not {kind.name}")
        if isinstance(state.get("config"), dict):  # the library path: no CLI checked the flags
            check_resume(from_dict(type(cfg), state["config"]), cfg, str(run.path))
        # Glow: the state dict includes the initialised ActNorms.
        checkpoint.load_model_state(model, state["state_dict"], run.checkpoint, f"the {kind.name}")
        checkpoint.load_optimizer_state(optimizer, state["optimizer"], run.checkpoint)
        stream.load_state_dict(state["batches"])
        checkpoint.set_rng_state(state["rng"])

    state = run.restore(restore)  # resume: load, then cut metrics back to its step
    prior = state.get("init") if state else None  # what a resumed run started from
    if state is None and tc.init:  # continue from weights (Glow's include its ActNorms)
        prior = start_from(model, tc.init, kind)
    elif state is None:  # a fresh run: the kind's data-dependent init (Glow's ActNorm)
        kind.initialize(model, dataset.x_train, cfg, device)
    run.write_config(cfg)  # only now: a resume that does not fit the checkpoint changes nothing
    steps = Stepper(tc, kind.terms, run, metrics, world, resumed=state, stop_at=stop_at, hint=HINT)

    def save(step: int) -> None:
        run.check_finite(model, step, HINT)
        run.write_checkpoint(
            lambda path: save_transformer(
                model,
                path,
                step=step,
                elapsed=steps.time_s(),
                config=to_dict(cfg),
                optimizer=optimizer.state_dict(),
                batches=stream.state_dict(),
                rng=checkpoint.rng_state(),
                init=prior,
            )
        )

    def run_eval(step: int, record: bool = True) -> dict:
        n = tc.final_eval_images if step == tc.steps else tc.eval_images
        x_test = dataset.x_test[: n or len(dataset.x_test)]
        bs = tc.eval_batch_size
        test = evaluate_transformer(
            kind, model, x_test, cfg, batch_size=bs, device=device, seed=cfg.seed
        )
        row = {"step": step, **test}
        if record:
            write_grids(kind, model, dataset.x_test, cfg, run.path, device, cfg.seed)
            evals.write({**row, "time_s": steps.time_s()})
        return row

    def evaluate(step: int) -> dict:
        if step == tc.steps:  # the last step (always evaluated) first makes BatchNorm exact
            recalibrate_batchnorm(model, stream, tc.bn_recalibration_batches)
        return run_eval(step)

    # The loop: logging, evaluation and checkpoints on schedule are the stepper's.
    for step in steps.run(evaluate=evaluate, save=save):
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = stream.next()
        terms = kind.loss(model, x, cfg)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if tc.clip_grad_norm:
            nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
        optimizer.step()
        stats = torch.stack([terms[k].detach() for k in kind.terms]).float()
        # A log row also probes this batch: reconstruction error, non-finite decodes.
        steps.add(stats, partial(probe, kind, model, x, device, cfg.seed + step + 1), lr=lr)
    if not steps.finished:
        return steps.unfinished()
    wall_time = steps.time_s()  # not counting a re-evaluation (below)
    final = steps.evaluation
    if not final:  # resumed after the final checkpoint, killed before results.json
        final = run_eval(tc.steps, record=False)  # eval.jsonl and the grids already have it
    results = {
        "kind": kind.name,
        "dataset": dataset.name,
        "image_shape": list(dataset.image_shape),
        "model": model.hparams,
        "data_fingerprint": dataset.fingerprint,
        **{k: v for k, v in final.items() if k != "step"},
        "steps": tc.steps,
        "init": prior,  # None, or the weights this fit continued and their own history
        "batch_size": tc.batch_size,
        "augment": cfg.data.augment,
        "seed": cfg.seed,
        "wall_time_s": round(wall_time, 2),
        "checkpoint": str(run.checkpoint),
        **environment(device),
    }
    run.write_results(results)
    return results


def start_from(model: nn.Module, source: str, kind: Kind) -> dict:
    """Load the weights named by `train.init` into the freshly built `model`, refusing another
    kind or architecture; return what the run records about them (source and history)."""
    what = f"--train.init {source}"
    try:
        trained = load_transformer(source)
    except LvatError as exc:
        raise LvatError(f"{what}: {exc}") from None
    found = kind_for_model(trained).name
    if found != kind.name:
        raise ConfigError(f"{what} holds a {found}; this is a {kind.name} fit")
    if dict(trained.hparams) != dict(model.hparams):
        raise ConfigError(
            f"{what} is a {found} with {dict(trained.hparams)}; this fit builds "
            f"{dict(model.hparams)}: set the same model.* keys"
        )
    model.load_state_dict(trained.state_dict())
    return {"source": source, "history": weight_history(source)}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, stream, batches: int) -> None:
    """Replace BatchNorm running statistics by their exact average over `batches` batches.

    With momentum 0.01 the running averages still weigh activations from early training after
    a few hundred steps; an eval-mode VAE then decodes far worse than in training.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches == 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches seen
    was_training = model.training
    model.train()
    for _ in range(batches):
        model(stream.next())
    model.train(was_training)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def summary(results: dict) -> str:
    """The one line `lvat fit` prints at the end (the middle part is the kind's `summary`)."""
    r = results
    bad = f"non-finite decodes at eps=1: {r['test_nonfinite_decode_rate']:.1%}"
    what = KINDS[r["kind"]].summary(r)
    return (
        f"{r['kind']} on {r['dataset']}: {what}, {bad}; {r['steps']} steps in "
        f"{r['wall_time_s']:.0f} s; checkpoint {r['checkpoint']}"
    )
