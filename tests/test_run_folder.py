"""The run folder shared by `lvat train` and `lvat fit` (`lvat.train.run_folder`): leftovers of an
attempt without a checkpoint, one process at a time, torn metrics lines, resume validation, a
finished run's resume, NaN advice, temp files, full disks, unusable folders, vanished directions."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, tiny_run_flags

from lvat.cli import main
from lvat.config import Config, VAEFitConfig, load_config, to_flags
from lvat.data import Split
from lvat.errors import LvatError
from lvat.fit import fit
from lvat.regularizers import VAT
from lvat.regularizers.common import zero_direction
from lvat.train import NonFiniteLoss, checkpoint, train
from lvat.train.monitor import MetricsLog
from lvat.train.run_folder import LOCK

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["train", "fit"]
FIT = {  # a 6-step tiny VAE on toy_data's 1x16x16 images
    "train.steps": 6, "train.batch_size": 16, "train.log_every": 2, "train.eval_every": 3,
    "train.checkpoint_every": 3, "train.grid_images": 16, "train.progress": "false",
    "device": "cpu", "model.latent_dim": 8,
}  # fmt: skip


def _cfg(kind: str, data: Path, out: Path, **kw):
    if kind == "train":
        return load_config(Config, None, tiny_run_flags(data, out, **{"method.name": "sup", **kw}))
    flags = to_flags({**FIT, "data.name": str(data), "out": str(out), **kw})
    return load_config(VAEFitConfig, None, flags)


def _go(kind: str, cfg, **kw) -> dict:
    return (train if kind == "train" else fit)(cfg, **kw)


def _cli_flags(kind: str, data: Path, out: Path, **kw) -> list[str]:
    if kind == "train":
        return ["train", *tiny_run_flags(data, out, **{"method.name": "sup", **kw})]
    return ["fit", "vae", *to_flags({**FIT, "data.name": str(data), "out": str(out), **kw})]


def _poison(kind: str, monkeypatch, at: int) -> dict:
    """Make the `at`-th loss of the run NaN (train: cross-entropy; fit: the VAE loss); returns a
    switch: calls["on"] = False stops the poisoning."""
    calls = {"n": 0, "on": True}
    nan = float("nan")
    if kind == "train":
        import lvat.train.loop as loop

        real = loop.F.cross_entropy

        def poisoned(*args, **kwargs):
            calls["n"] += 1
            loss = real(*args, **kwargs)
            return loss * nan if calls["on"] and calls["n"] == at else loss

        monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    else:
        import lvat.fit.setup as setup

        real = setup.vae_loss

        def poisoned(*args, **kwargs):
            calls["n"] += 1
            terms = real(*args, **kwargs)
            if calls["on"] and calls["n"] == at:
                return {k: v * nan for k, v in terms.items()}
            return terms

        monkeypatch.setattr(setup, "vae_loss", poisoned)
    return calls


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


# 1. A fresh run in a folder with leftovers of an attempt that never saved a checkpoint.


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_run_moves_the_leftovers_of_an_attempt_without_checkpoint_aside(
    kind, toy_data, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    first = {"train.log_every": 1, **({"data.num_labeled": 10} if kind == "train" else {})}
    switch = _poison(kind, monkeypatch, at=2)  # step 1 is logged, step 2 is NaN: no checkpoint
    with pytest.raises(NonFiniteLoss):
        _go(kind, _cfg(kind, toy_data, run, **first))
    switch["on"] = False
    stale_tmp = run / ".checkpoint.pt.x1y2z3w4.tmp"  # a kill during the first checkpoint write
    stale_tmp.write_bytes(b"half a checkpoint")
    left = _files(run)
    left.pop(stale_tmp.name)
    assert {"metrics.jsonl", "config.toml"} <= set(left) and LOCK not in left
    assert kind == "fit" or "split.json" in left
    capsys.readouterr()

    results = _go(kind, _cfg(kind, toy_data, run))  # a new attempt, other settings, same --out
    assert "moved" in capsys.readouterr().err
    assert _files(run / "abandoned-1") == left  # nothing of the old attempt is lost...
    assert not stale_tmp.exists()  # ...but a half-written temp file is garbage
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2, 3, 4, 6]  # no old rows
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == [3, 6]
    if kind == "train":  # the new data.num_labeled, not the stale split.json's
        assert results["num_labeled"] == 20 and len(Split.load(run / "split.json").labeled) == 20
        assert load_config(Config, run / "config.toml").data.num_labeled == 20


def test_a_fresh_run_refuses_a_folder_with_results_or_a_checkpoint(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg("train", toy_data, run))
    (run / "checkpoint.pt").unlink()  # results of a finished run, its checkpoint gone
    before = _files(run)
    assert main(_cli_flags("train", toy_data, run)) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "pick another --out" in err and err.count("\n") == 1
    assert _files(run) == before and not (run / "abandoned-1").exists()


def test_a_split_file_given_inside_the_run_folder_is_kept(toy_data, tmp_path):
    run = tmp_path / "run"
    train(_cfg("train", toy_data, tmp_path / "first", **{"data.num_labeled": 30}))
    run.mkdir()
    (run / "split.json").write_bytes((tmp_path / "first" / "split.json").read_bytes())
    split_file = str(run / "split.json")
    results = train(_cfg("train", toy_data, run, **{"data.split_file": split_file}))
    assert results["num_labeled"] == 30 and not (run / "abandoned-1").exists()


# 2. One process at a time.


def _hold_lock(run: Path, pid: int = 4242) -> int:
    """Lock `run` as another `lvat` process would (a second open file description)."""
    import fcntl

    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{pid}\n".encode())
    return fd


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("resume", [False, True])
def test_a_run_folder_in_use_is_refused_at_once(kind, resume, toy_data, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(kind, toy_data, run)
    if resume:
        _go(kind, cfg, stop_at=3)
    before = _files(run) if resume else {}
    fd = _hold_lock(run)
    try:
        with pytest.raises(LvatError, match=r"is in use by another process \(pid 4242\)"):
            _go(kind, cfg, resume=resume)
        assert {k: v for k, v in _files(run).items() if k != LOCK} == before  # nothing written
    finally:
        os.close(fd)
    assert _go(kind, cfg, resume=resume)["steps"] == 6
    assert not (run / LOCK).exists()  # removed on a clean exit


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lvat.train.run_folder import RunFolder
    run = RunFolder(Path(sys.argv[1]))
    run.open(resume=False, steps=1)
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_second_process_fails_at_once_and_kill_9_leaves_no_stale_lock(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_cli_flags("train", toy_data, run)) == 2
        err = capsys.readouterr().err
        assert f"is in use by another process (pid {holder.pid})" in err
        assert err.count("\n") == 1
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert (run / LOCK).exists()  # the file stays behind, but the kernel dropped the lock
    assert main(_cli_flags("train", toy_data, run)) == 0
    assert not (run / LOCK).exists()


# 3. Torn and corrupt metrics lines.


def test_metrics_truncation_drops_a_torn_last_line_and_replaces_the_file_atomically(
    tmp_path, capsys
):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 0.5})
    inode = path.stat().st_ino
    log.truncate_after(3)  # nothing to drop: the file is not rewritten
    assert path.stat().st_ino == inode
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # the disk filled up in the middle of a row
    log.truncate_after(2)
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}]
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not an in-place edit
    assert "torn last line" in capsys.readouterr().err
    with open(path, "ab") as f:
        f.write(b"\x00" * 64)  # power loss: the file's tail reads as zeros
    log.truncate_after(2)
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}]


def test_resume_drops_a_torn_last_line_and_ends_as_an_unstopped_run(toy_data, tmp_path, capsys):
    train(_cfg("train", toy_data, tmp_path / "whole"))
    parts = _cfg("train", toy_data, tmp_path / "parts")
    train(parts, stop_at=3)
    with open(tmp_path / "parts" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 2.3')
    with open(tmp_path / "parts" / "eval.jsonl", "a") as f:
        f.write('{"step"')
    train(parts, resume=True)
    assert "torn last line" in capsys.readouterr().err
    for name in ("metrics.jsonl", "eval.jsonl"):
        whole, part = (read_jsonl(tmp_path / r / name, untimed=True) for r in ("whole", "parts"))
        assert whole == part, name


def test_a_corrupt_line_before_the_last_is_a_clear_error_and_changes_nothing(
    toy_data, tmp_path, capsys
):
    run = tmp_path / "run"
    train(_cfg("train", toy_data, run), stop_at=3)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0][:12] + "\n" + lines[1] + "\n")
    before = _files(run)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line 1 is not a JSON row" in err and err.count("\n") == 1
    assert _files(run) == before


# 4. A resume whose overrides do not fit the checkpoint writes nothing.


def test_a_failed_resume_with_overrides_leaves_config_toml_untouched(toy_data, tmp_path, capsys):
    run, fitted = tmp_path / "run", tmp_path / "vae"
    train(_cfg("train", toy_data, run), stop_at=3)
    fit(_cfg("fit", toy_data, fitted), stop_at=3)
    before = {r: _files(r) for r in (run, fitted)}
    # The library path (sweeps): the loop itself refuses, before writing anything.
    for kind, out, override in (
        ("train", run, {"model.top_bn": "true"}),
        ("train", run, {"data.num_labeled": 30}),
        ("fit", fitted, {"model.latent_dim": 16}),
    ):
        key = next(iter(override))
        with pytest.raises(LvatError, match=f"{key}.*fixed on resume"):
            _go(kind, _cfg(kind, toy_data, out, **override), resume=True)
    # The CLI (whichever layer refuses first): one line.
    for argv in (
        ["train", "--resume", str(run), "--model.top_bn", "true"],
        ["fit", "vae", "--resume", str(fitted), "--model.latent_dim", "16"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lvat: error:") and err.count("\n") == 1, err
    assert {r: _files(r) for r in (run, fitted)} == before
    # Weights that do not fit the model under an unchanged config: refused before any write.
    state = checkpoint.load(run / "checkpoint.pt")
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3, 3)
    checkpoint.save(run / "checkpoint.pt", state)
    before = _files(run)
    with pytest.raises(LvatError, match=f"{key}.*shape"):
        train(_cfg("train", toy_data, run), resume=True)
    assert _files(run) == before


# 5. Resuming a finished run is a no-op.


@pytest.mark.parametrize("kind", KINDS)
def test_resuming_a_finished_run_returns_its_results_and_touches_nothing(
    kind, toy_data, tmp_path, capsys
):
    run = tmp_path / "run"
    cfg = _cfg(kind, toy_data, run)
    _go(kind, cfg)
    before = _snapshot(run)
    capsys.readouterr()
    assert _go(kind, cfg, resume=True) == json.loads((run / "results.json").read_text())
    assert "already finished" in capsys.readouterr().err
    assert _snapshot(run) == before


@pytest.mark.parametrize("kind", KINDS)
def test_resume_after_the_final_checkpoint_writes_results_without_a_second_eval_row(
    kind, toy_data, tmp_path
):
    run = tmp_path / "run"
    cfg = _cfg(kind, toy_data, run)
    results = _go(kind, cfg)
    rows = read_jsonl(run / "eval.jsonl")
    (run / "results.json").unlink()  # killed between the final checkpoint and results.json
    again = _go(kind, cfg, resume=True)
    assert read_jsonl(run / "eval.jsonl") == rows
    metric = "test_error" if kind == "train" else "test_neg_elbo"
    assert again[metric] == results[metric]
    assert again["wall_time_s"] <= results["wall_time_s"]  # no re-evaluation time added


def test_resume_past_train_steps_is_refused(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg("train", toy_data, run))
    before = _files(run)
    assert main(["train", "--resume", str(run), "--train.steps", "3"]) == 2
    assert "past train.steps" in capsys.readouterr().err
    assert _files(run) == before


# 6. The advice after a non-finite loss matches what is on disk.


@pytest.mark.parametrize("kind", KINDS)
def test_a_nonfinite_loss_before_any_checkpoint_says_nothing_was_saved(
    kind, toy_data, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    _poison(kind, monkeypatch, at=1)
    with pytest.raises(NonFiniteLoss) as err:
        _go(kind, _cfg(kind, toy_data, run))
    message = str(err.value)
    assert "between steps 1 and 2" in message and "no checkpoint" in message
    assert "start the run again" in message
    assert "intact" not in message and "--resume" not in message
    assert not (run / "checkpoint.pt").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_nonfinite_loss_after_a_checkpoint_says_how_to_resume(
    kind, toy_data, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    _poison(kind, monkeypatch, at=5 if kind == "train" else 6)  # step 5 (fit: + 1 eval call)
    with pytest.raises(NonFiniteLoss, match=f"intact.*--resume {run}"):
        _go(kind, _cfg(kind, toy_data, run))


# 7. Temp files, full disks, unusable folders.


def test_stale_temp_files_of_the_run_are_removed_when_it_resumes(toy_data, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg("train", toy_data, run)
    train(cfg, stop_at=3)
    stale = [
        ".checkpoint.pt.k2j4x9_a.tmp",
        ".results.json.abcdefgh.tmp",
        ".eval.jsonl.0a1b2c3d.tmp",
    ]
    other = ["notes.tmp", ".mine.abcdefgh.tmp", ".checkpoint.pt.tmp", ".checkpoint.pt.abc.tmp"]
    for name in stale + other:
        (run / name).write_bytes(b"x" * 1000)
    train(cfg, resume=True)
    assert not [n for n in stale if (run / n).exists()]
    assert all((run / n).exists() for n in other)  # only what lvat.io.atomic_write leaves


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(
    kind, toy_data, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    real, calls = torch.save, {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(_cli_flags(kind, toy_data, run)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run / 'checkpoint.pt'}" in err and "No space left on device" in err
    assert "previous checkpoint" in err and "intact" in err
    assert checkpoint.load(run / "checkpoint.pt")["step"] == 3
    assert not list(run.glob(".*.tmp")) and not (run / LOCK).exists()


@pytest.mark.parametrize("kind", KINDS)
def test_an_unusable_out_is_refused_before_the_data_loads(
    kind, toy_data, tmp_path, monkeypatch, capsys
):
    import lvat.fit.loop
    import lvat.train.loop

    def no_loading(*args, **kwargs):
        raise AssertionError("the data loaded before the run folder was checked")

    for module in (lvat.train.loop, lvat.fit.loop):
        monkeypatch.setattr(module, "load_from_config", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    for out in (blocker / "run", blocker):  # under a regular file; a regular file itself
        assert main(_cli_flags(kind, toy_data, out)) == 2
        err = capsys.readouterr().err
        assert f"cannot use {out} as a run folder" in err and err.count("\n") == 1, err
    assert blocker.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_before_the_data_loads(toy_data, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(_cli_flags("train", toy_data, folder / "run")) == 2
        assert "cannot use" in capsys.readouterr().err
    finally:
        folder.chmod(0o755)


# 8. A regularizer whose direction vanished is visible.


def test_zero_direction_counts_the_samples_whose_perturbation_vanished():
    r = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0], [0.0, 2.6]])  # eps 5
    assert zero_direction([r], 5.0).item() == pytest.approx(0.5)
    assert zero_direction([r], 5.0).dtype == torch.float32
    second = torch.tensor([[0.0], [5.0], [0.0], [0.0]])  # a sample lives on in another group
    assert zero_direction([r, second], 5.0).item() == pytest.approx(0.25)


def test_vat_reports_the_fraction_of_zero_directions():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(8, 1, 4, 4)
    _, stats = VAT(1.0).loss_and_stats(model, x)
    assert stats["zero_direction"].item() == 0.0 and stats["adv_l2"] > 0.9
    with torch.no_grad():  # saturated softmax (a divergent lr): dKL/dd is exactly 0
        model[1].weight.mul_(1e8)
    _, stats = VAT(1.0).loss_and_stats(model, x)
    assert stats["zero_direction"].item() == 1.0 and stats["adv_l2"].item() == 0.0


def test_a_vanished_direction_is_logged_and_warned_about_once(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    flags = {"method.name": "vat", "train.lr": 1e6, "train.log_every": 1}
    train(load_config(Config, None, tiny_run_flags(toy_data, run, **flags)))
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[0]["zero_direction"] == 0.0 and rows[-1]["zero_direction"] > 0.5
    err = capsys.readouterr().err
    assert err.count("zero_direction") == 1 and "train.lr" in err
    healthy = tmp_path / "healthy"
    train(load_config(Config, None, tiny_run_flags(toy_data, healthy, **{"method.name": "vat"})))
    assert all(r["zero_direction"] == 0.0 for r in read_jsonl(healthy / "metrics.jsonl"))
    assert "zero_direction" not in capsys.readouterr().err


# Under torchrun rank 0 alone decides, and every rank follows its verdict.

TORCHRUN_HELPER = textwrap.dedent(
    """
    import json, os, sys
    from lvat.config import Config, load_config
    from lvat.errors import LvatError
    from lvat.train import train
    cfg = load_config(Config, None, [*sys.argv[1:], "--out", "run"])
    assert train(cfg, stop_at=3) == {"step": 3, "finished": False}
    try:
        train(cfg)
    except LvatError as exc:  # on every rank, at once: no rank waits for the other
        assert "already holds a run" in str(exc), exc
    else:
        raise AssertionError("a fresh run over a checkpoint")
    results = json.loads(json.dumps(train(cfg, resume=True)))
    assert train(cfg, resume=True) == results  # finished: a no-op on every rank
    print("rank", os.environ["RANK"], "ok", flush=True)
    from lvat.train.distributed import finish_worker
    finish_worker()
    """
)


def test_under_torchrun_every_rank_follows_rank_0s_verdict(toy_data, tmp_path):
    (tmp_path / "helper.py").write_text(TORCHRUN_HELPER)
    flags = tiny_run_flags(toy_data, **{"method.name": "sup", "model.dropout": 0.0})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    proc = subprocess.run(
        [*torchrun, "--nproc_per_node", "2", "helper.py", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2
    assert proc.stderr.count("already finished") == 1  # rank 0 alone prints
    assert not (tmp_path / "run" / LOCK).exists()
