"""Benchmarks of the GPU-speed work: one shared harness (:mod:`benchmarks.harness`), the suites the issue
asks for (:mod:`benchmarks.suites`) and a command line (``python -m benchmarks <suite> ...``).

Results are appended to ``results/bench/<suite>.json``; every row carries the environment it was measured
in and a ratio to a baseline measured in the same run. Nothing here runs on import.
"""

from .harness import Recorder, Timing, append_rows, environment, first_call_seconds, measure
from .suites import SUITES, BenchConfig

__all__ = ["SUITES", "BenchConfig", "Recorder", "Timing", "append_rows", "environment", "first_call_seconds", "measure"]
