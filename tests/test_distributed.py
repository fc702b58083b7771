"""Data-parallel training with torchrun on CPU (gloo, 2 processes): same math, rank-0 files, resume.

What is compared and why it is meaningful: with 2 ranks each rank's labeled batch is half the
global batch and BatchNorm normalises it with its own batch statistics. A single process with
the full batch would use other statistics, so the reference is a single process that emulates
exactly that split: the two half-batches from the two ranks' seeded streams, each through its own
BN pass, the loss averaged (= the gradient average the all_reduce computes). With dropout 0 and
no augmentation nothing else is random, so the runs are the same function in exact arithmetic and
differ only by float32 summation order (all_reduce vs autograd's sum; thread counts and kernels
differ between the workers and this process, and between CPUs). The images are noise everywhere
(`noisy_data`): a constant region (the toy data's saturated blob) makes equal values in
max-pooling windows, a kink where rounding decides which input gets the gradient, and one such
tie moves a whole channel's gradient by O(1) between kernels.

Tolerances, from that: a gradient entry differs by ~1e-6 of its tensor's largest entry or less
(float32 sums of <= 1e4 products, random-walk rounding sqrt(n) * 6e-8). Losses are smooth
functions of the weights, so they agree to ~1e-6; we allow 1e-5 (the JSON keeps 6 decimals).
Adam is not smooth at g = 0: its first updates are lr * g / (|g| + 1e-8) ~ lr * sign(g), so an
entry whose gradient is within rounding of zero may move by up to lr in either run at every step.
Such entries are excluded (|g| < 1e-3 of the tensor's max at any step, measured in the emulation,
where noise is at most 1e-3 of |g|); for every other entry Adam's update changes by at most
lr * noise / |g| <= 1e-3 * lr per step, so weights agree to 1e-4 with a wide margin.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_jsonl, tiny_run_flags

from lvat.config import Config, load_config
from lvat.data import Split, TrainBatches, load_from_config
from lvat.errors import ConfigError
from lvat.train import checkpoint, schedule
from lvat.train.distributed import GradSync, World, local_batch, rank_seed
from lvat.train.setup import build_model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory) -> Path:
    """Like conftest's toy_data, but the blob is noisy too: no constant region anywhere, so
    equal 3x3 neighbourhoods (pooling ties) have probability ~64^-9."""
    rng = np.random.default_rng(0)
    y = np.arange(250) % 10
    x = rng.integers(0, 64, (250, 16, 16)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, c : c + 4, 2:8] += 180
    path = tmp_path_factory.mktemp("data") / "noisy.npz"
    np.savez(path, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    return path


def _flags(data: Path, **kw) -> list[str]:
    return tiny_run_flags(data, **{"train.log_every": 1, **kw})


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _emulate(
    run: Path, steps: int
) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process doing what 2 ranks do: per-rank half batches, per-half BN, mean loss.

    Returns the losses, the final weights and, per parameter, a mask of the entries whose
    gradient was resolvable at every step (|g| >= 1e-3 of the tensor's max |g|).
    """
    cfg = load_config(Config, run / "config.toml")
    dataset = load_from_config(cfg.data)
    split = Split.load(run / "split.json")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset).train()
    tc = cfg.train
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    streams = [
        TrainBatches(dataset, split, tc.batch_labeled // 2, tc.batch_unlabeled // 2,
                     seed=rank_seed(cfg.seed, r))
        for r in (0, 1)
    ]  # fmt: skip
    losses = []
    resolvable = {k: torch.ones_like(p, dtype=torch.bool) for k, p in model.named_parameters()}
    for step in range(steps):
        schedule.apply(opt, *schedule.lr_and_beta1(step, tc))
        halves = [s.next() for s in streams]
        loss = sum(F.cross_entropy(model(b.x_labeled), b.y_labeled) for b in halves) / 2
        opt.zero_grad()
        loss.backward()
        for k, p in model.named_parameters():
            resolvable[k] &= p.grad.abs() >= 1e-3 * p.grad.abs().max()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict(), resolvable


@pytest.mark.numerics
def test_torchrun_2_processes_match_a_single_process_emulating_the_split(noisy_data, tmp_path):
    out = tmp_path / "ddp"
    flags = _flags(noisy_data, **{"method.name": "sup", "model.dropout": 0.0, "out": out})
    proc = _run([*TORCHRUN, "-m", "lvat", "train", *flags], tmp_path)
    assert proc.stdout.count("test error") == 1  # one summary line for the whole job
    # Rank 0 alone writes the run folder: every file once, one metrics row per step.
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["checkpoint.pt", "config.toml", "eval.jsonl", "metrics.jsonl", "results.json",
         "split.json"]
    )  # fmt: skip
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_jsonl(out / "eval.jsonl")] == [3, 6]
    assert json.loads((out / "results.json").read_text())["processes"] == 2
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(  # each rank drew its own batches
        state["ranks"][0]["batches"]["unlabeled"]["order"],
        state["ranks"][1]["batches"]["unlabeled"]["order"],
    )

    losses, weights, resolvable = _emulate(out, 6)
    assert [r["loss"] for r in rows] == pytest.approx(losses, abs=1e-5)
    excluded = sum(int((~m).sum()) for m in resolvable.values())
    assert excluded < 0.05 * sum(m.numel() for m in resolvable.values())  # the check stays wide
    for k, ok in resolvable.items():
        torch.testing.assert_close(state["model"][k][ok], weights[k][ok], atol=1e-4, rtol=0, msg=k)
    # The tolerance separates: one BN pass over the whole global batch gives another loss.
    cfg = load_config(Config, out / "config.toml")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, load_from_config(cfg.data)).train()
    streams = [TrainBatches(load_from_config(cfg.data), Split.load(out / "split.json"), 4, 8,
                            seed=rank_seed(cfg.seed, r)) for r in (0, 1)]  # fmt: skip
    halves = [s.next() for s in streams]
    whole = F.cross_entropy(
        model(torch.cat([b.x_labeled for b in halves])), torch.cat([b.y_labeled for b in halves])
    ).item()
    assert abs(whole - rows[0]["loss"]) > 1e-3


HELPER = textwrap.dedent(
    """
    import os, sys, torch
    from lvat.config import Config, load_config
    from lvat.train import train
    flags = sys.argv[1:]
    train(load_config(Config, None, [*flags, "--out", "whole"]))
    parts = load_config(Config, None, [*flags, "--out", "parts"])
    assert train(parts, stop_at=3) == {"step": 3, "finished": False}
    torch.manual_seed(1234 + int(os.environ["RANK"]))  # a fresh process has other RNG state
    train(parts, resume=True)
    from lvat.train.distributed import finish_worker
    finish_worker()
    """
)


def test_torchrun_resume_restores_every_rank_bit_identically(toy_data, tmp_path):
    (tmp_path / "helper.py").write_text(HELPER)
    flags = _flags(toy_data, **{"method.name": "vat", "data.augment": "true", "model.dropout": 0.5})
    _run([*TORCHRUN, "helper.py", *flags], tmp_path)
    a = checkpoint.load(tmp_path / "whole" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "parts" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    whole, parts = (
        read_jsonl(tmp_path / r / "metrics.jsonl", untimed=True) for r in ("whole", "parts")
    )
    assert whole == parts
    assert all(r["kl"] > 0 for r in whole)


def test_global_batches_must_divide_and_one_process_is_a_no_op():
    assert local_batch(32, World(rank=1, size=4), "train.batch_labeled") == 8
    with pytest.raises(ConfigError, match="train.batch_labeled = 30 is the global batch"):
        local_batch(30, World(rank=0, size=4), "train.batch_labeled")
    assert rank_seed(7, 0) == 7 and rank_seed(7, 1) != rank_seed(8, 0)
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    grad = model.weight.grad.clone()
    GradSync(model, World())()
    assert torch.equal(model.weight.grad, grad)
