"""Data-parallel training with torchrun on CPU (gloo, 2 processes): same math, rank-0 files, resume.

What is compared and why it is meaningful: with 2 ranks each rank's labeled batch is half the
global batch and BatchNorm normalises it with its own batch statistics. A single process with
the full batch would use other statistics, so the reference is a single process that emulates
exactly that split: the two half-batches from the two ranks' seeded streams, each through its own
BN pass, the loss averaged (= the gradient average the all_reduce computes). With dropout 0 and
no augmentation nothing else is random, so the runs differ only by float summation order
(all_reduce vs autograd's sum): observed 1e-7 on weights; we allow 1e-5 on losses (the JSON
keeps 6 decimals) and 1e-4 on weights (Adam's first steps are lr * sign(g), so a rounding-level
gradient entry can move a weight by up to 2 lr = 2e-3 in principle; far from it in practice).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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


def _flags(data: Path, **kw) -> list[str]:
    return tiny_run_flags(data, **{"train.log_every": 1, **kw})


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _emulate(run: Path, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process doing what 2 ranks do: per-rank half batches, per-half BN, mean loss."""
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
    for step in range(steps):
        schedule.apply(opt, *schedule.lr_and_beta1(step, tc))
        halves = [s.next() for s in streams]
        loss = sum(F.cross_entropy(model(b.x_labeled), b.y_labeled) for b in halves) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def test_torchrun_2_processes_match_a_single_process_emulating_the_split(toy_data, tmp_path):
    out = tmp_path / "ddp"
    flags = _flags(toy_data, **{"method.name": "sup", "model.dropout": 0.0, "out": out})
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

    losses, weights = _emulate(out, 6)
    assert [r["loss"] for r in rows] == pytest.approx(losses, abs=1e-5)
    for k, v in weights.items():
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(state["model"][k], v, atol=1e-4, rtol=0, msg=k)
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
