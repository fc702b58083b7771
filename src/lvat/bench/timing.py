"""Timing and counting: per-step wall time, FLOPs of one step, and the machine's reference rates.

Times exclude warm-up steps (first-call allocations, cuDNN heuristics, torch.compile) and are
the median over repeats of (time of `steps` consecutive steps) / steps. On CUDA the region is
bracketed by CUDA events and the end event is waited for; elsewhere by `perf_counter` (CPU ops
run synchronously). FLOPs come from `torch.utils.flop_counter.FlopCounterMode` over one eager
step: it sees every aten op, including those inside `torch.autograd.grad`.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    steps: int,
) -> list[float]:
    """Milliseconds per step for each of `repeats` timed runs of `steps` calls of `step`."""
    for _ in range(warmup):
        step()
    synchronize(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            out.append(begin.elapsed_time(end) / steps)
        else:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            out.append((time.perf_counter() - t0) * 1e3 / steps)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (matmuls and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Rate:
    """A measured throughput: what ran, its FLOPs per call and the median time per call."""

    what: str
    flops: int
    ms: float

    @property
    def flops_per_s(self) -> float:
        return self.flops / (self.ms * 1e-3)

    def to_dict(self) -> dict:
        return {"what": self.what, "flops": self.flops, "ms": self.ms, "tflops": self.tflops}

    @property
    def tflops(self) -> float:
        return self.flops_per_s / 1e12


def matmul_peak(device: torch.device, size: int | None = None, repeats: int = 5) -> Rate:
    """Dense matmul rate, the machine's practical peak: bf16 on CUDA, float32 elsewhere."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = size or (8192 if cuda else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    calls = 10 if cuda else 2
    ms = median(
        time_steps(lambda: a @ b, device, warmup=2, repeats=repeats, steps=calls)  # noqa: B023
    )
    name = str(dtype).removeprefix("torch.")
    return Rate(f"matmul {name} {n}x{n}x{n}", 2 * n**3, ms)


def conv_rate(
    device: torch.device,
    shapes: list[tuple[int, int, int, int]],
    batch: int,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    repeats: int = 3,
) -> Rate:
    """The fastest forward rate over a model's 3x3 conv shapes (c_in, c_out, size, padding).

    The classifiers are 3x3 convs almost entirely, so FLOPs / this rate is a floor on a step's
    time that this machine's conv kernels allow (the fastest layer shape, at `batch` images).
    """
    best: Rate | None = None
    for c_in, c_out, size, pad in shapes:
        x = torch.randn(batch, c_in, size, size, device=device, dtype=dtype)
        w = torch.randn(c_out, c_in, 3, 3, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            w = w.contiguous(memory_format=torch.channels_last)
        call = lambda x=x, w=w, pad=pad: F.conv2d(x, w, padding=pad)  # noqa: E731
        flops = count_flops(call)
        steps = 10 if device.type == "cuda" else 1
        ms = median(time_steps(call, device, warmup=2, repeats=repeats, steps=steps))
        name = str(dtype).removeprefix("torch.")
        rate = Rate(f"conv2d 3x3 {c_in}->{c_out} {size}x{size} batch {batch} {name}", flops, ms)
        if best is None or rate.flops_per_s > best.flops_per_s:
            best = rate
    assert best is not None
    return best


def host_syncs(step: Callable[[], object], device: torch.device) -> int | None:
    """Host synchronisations during one call of `step` (CUDA's sync debug mode); None on CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
