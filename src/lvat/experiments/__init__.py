"""Experiments: grids of runs (`sweep`) and the CPU demo."""

from lvat.experiments.sweep import Job, plan, sweep

__all__ = ["Job", "plan", "sweep"]
