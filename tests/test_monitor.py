"""The progress line: tqdm's format, one plain line per update in a log file, silent when off."""

from __future__ import annotations

from lvat.train.monitor import Progress


def test_a_log_gets_plain_progress_lines_with_eta_and_metrics(capsys):
    progress = Progress(100, start=10)
    progress.update(20, loss=0.53127)  # within 30 s of the start: not printed
    progress.last -= 31
    progress.update(50, loss=0.5)
    progress.update(100, loss=0.25)  # the last step is always printed
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert lines[0].startswith("step 50/100") and "ETA" in lines[0] and "loss 0.5" in lines[0]
    assert lines[1].startswith("step 100/100") and "100.0%" in lines[1]


def test_disabled_progress_prints_nothing(capsys):
    progress = Progress(10, enabled=False)
    progress.update(10, loss=1.0)
    progress.close()
    assert capsys.readouterr().err == ""
