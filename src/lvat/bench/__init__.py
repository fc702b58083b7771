"""Benchmark: our training step vs a naive port, FLOPs and the machine's reference rates."""

from lvat.bench.suite import BenchOptions, run_bench, write_report

__all__ = ["BenchOptions", "run_bench", "write_report"]
