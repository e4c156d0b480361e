"""The one benchmark harness: timing, compile time, the environment record and the results file.

Rules every suite follows through this module (STYLE.md "Evidence"):

* **Timing** -- on CUDA, CUDA events around each repetition after ``warmup`` untimed calls; the host is
  synchronised once after all repetitions, so the events measure GPU time of back-to-back calls without
  host round trips in between. On the CPU, ops are synchronous, so ``time.perf_counter`` around each call
  is exact and needs no synchronisation.
* **Compile time** is measured separately: the first call of a compiled function (trace + compile + one
  run) is timed on its own with a synchronise, and is never part of the steady-state repetitions.
* **Ratios** -- every row names the baseline it is compared with (a case measured in the same run, same
  process, same device) and carries the ratio; a baseline row has itself as baseline and ratio 1.
* **Results** are appended to ``<results_dir>/<suite>.json`` (a JSON list of rows), atomically: a temp
  file in the same folder and ``os.replace``, one row at a time, so a run killed mid-suite keeps every row
  it finished and never leaves half a file.
* **Environment** in every row: GPU name, driver, torch/triton/CUDA/cuDNN versions, TF32 flags, date,
  code version. No hostname.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = [
    "Timing",
    "synchronize",
    "measure",
    "first_call_seconds",
    "environment",
    "append_rows",
    "Recorder",
    "config_dict",
    "read_rows",
    "merge_results",
    "summarize",
]


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Per-repetition wall times of one measured case, in milliseconds."""

    times_ms: tuple[float, ...]
    warmup: int  # untimed calls before the first timed one
    clock: str  # "cuda_event" or "perf_counter"

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def median_s(self) -> float:
        return self.median_ms / 1e3

    def to_dict(self) -> dict[str, Any]:
        t = self.times_ms
        return {
            "median_ms": self.median_ms,
            "mean_ms": statistics.fmean(t),
            "min_ms": min(t),
            "max_ms": max(t),
            # Spread as a fraction of the median: a quick read on how noisy the case was.
            "rel_spread": (max(t) - min(t)) / self.median_ms if self.median_ms > 0 else 0.0,
            "reps": len(t),
            "warmup": self.warmup,
            "clock": self.clock,
        }


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work on ``device``; a no-op on the CPU (its ops are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int, reps: int) -> Timing:
    """Time ``fn()`` ``reps`` times after ``warmup`` untimed calls (see the module docstring for clocks)."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        synchronize(device)  # once, after all repetitions: no host round trip between them
        times = tuple(float(s.elapsed_time(e)) for s, e in zip(starts, ends))
        return Timing(times, warmup, "cuda_event")
    times_l = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times_l.append((time.perf_counter() - t0) * 1e3)
    return Timing(tuple(times_l), warmup, "perf_counter")


def first_call_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call including everything it triggers (for a compiled fn: trace, compile, run)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------
# Environment record
# --------------------------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _git_sha() -> str | None:
    """The code version: ``git rev-parse HEAD`` (+ ``-dirty``), else ``$AFS_GIT_SHA`` -- a device machine gets
    a copy of the working tree without ``.git``, so scripts/device_bench.sh is told the commit instead."""
    here = Path(__file__).resolve().parent.parent
    sha = _run(["git", "-C", str(here), "rev-parse", "HEAD"])
    if sha is None:
        return os.environ.get("AFS_GIT_SHA") or None
    dirty = _run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"])
    return sha + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what the numbers were made. Deliberately hostname-free."""
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device_type": device.type,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            # fp32 convolutions/matmuls may run on TF32 tensor cores: it changes every fp32 number.
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"])
        if smi is not None:
            env["driver"], env["driver_source"] = smi.splitlines()[0].strip(), "nvidia-smi"
        else:  # no nvidia-smi: the CUDA driver API version torch sees (e.g. 12040 = CUDA 12.4)
            version = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
            env["driver"], env["driver_source"] = version, "torch cuda driver api version"
    return env


# --------------------------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if isinstance(o, (Path, torch.device, torch.dtype)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def append_rows(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the JSON list at ``path`` (created if missing), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing: list[Any] = []
    if path.exists():
        try:
            existing = json.loads(path.read_text() or "[]")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); move it aside before appending results") from None
        if not isinstance(existing, list):
            raise ValueError(f"{path} holds a {type(existing).__name__}, expected a JSON list of result rows")
    text = json.dumps(existing + rows, indent=1, default=_json_default, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite(v: Any) -> Any:
    """JSON has no NaN/Inf: non-finite floats become None (and say so by being null)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


@dataclass
class Recorder:
    """Collects one suite's rows, writes each as soon as it is made, and prints one progress line for it.

    ``config`` (the suite's options) and the environment go into every row, so a row stands on its own.
    """

    suite: str
    results_dir: Path
    device: torch.device
    config: dict[str, Any]
    run_id: str = field(default_factory=lambda: f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}")
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results_dir = Path(self.results_dir)
        self.env = environment(self.device)

    @property
    def path(self) -> Path:
        return self.results_dir / f"{self.suite}.json"

    def add(
        self,
        case: str,
        *,
        baseline: str,
        ratio: float,
        ratio_meaning: str,
        metric: str,
        value: float,
        unit: str,
        timing: Timing | None,
        batch_size: int | None,
        model: str | None,
        dtype: str,
        shapes: dict[str, Any],
        compile_s: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write one row. ``ratio`` compares this case with ``baseline`` as ``ratio_meaning`` says."""
        row = {
            "suite": self.suite,
            "case": case,
            "baseline": baseline,
            "ratio": ratio,
            "ratio_meaning": ratio_meaning,
            "metric": metric,
            "value": value,
            "unit": unit,
            "time": timing.to_dict() if timing is not None else None,
            "compile_s": compile_s,
            "batch_size": batch_size,
            "model": model,
            "dtype": dtype,
            "shapes": shapes,
            "extra": extra or {},
            "run_id": self.run_id,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": self.config,
            "env": self.env,
        }
        row = _finite(row)
        append_rows(self.path, [row])
        self.rows.append(row)
        comp = f", first call (compile) {compile_s:.1f} s" if compile_s is not None else ""
        bs = f" B={batch_size}" if batch_size is not None else ""
        print(
            f"[{self.suite}]{bs} {case}: {value:.4g} {unit} (x{ratio:.3g} vs {baseline}: {ratio_meaning}){comp}",
            flush=True,
        )
        return row

    def note(self, message: str) -> None:
        """A progress/skip line that is not a result."""
        print(f"[{self.suite}] {message}", flush=True)

    @contextmanager
    def guard(self, label: str) -> Iterator[None]:
        """Run one case (or one batch size's cases); if it raises, print and record the failure and go on.

        A device session is one shot: a case that fails (an out-of-memory at a big batch, a backend bug) must
        not cost the rows of the cases after it. Failures are never silent: each is printed with its error,
        kept in ``self.failures``, and the command line exits non-zero when there are any.
        """
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported, counted and turned into a non-zero exit
            self.failures.append(f"{label}: {type(e).__name__}: {e}")
            print(f"[{self.suite}] FAILED {label}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=-4)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (tuples become lists when written)."""
    return asdict(config)


# --------------------------------------------------------------------------------------------------------
# Reading results back: merge (device output -> repo) and a one-line-per-row summary
# --------------------------------------------------------------------------------------------------------
def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of one results file (a JSON list), with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    rows = json.loads(path.read_text() or "[]")
    if not isinstance(rows, list):
        raise ValueError(f"{path} holds a {type(rows).__name__}, expected a JSON list of result rows")
    return rows


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row.get("run_id"), row.get("suite"), row.get("case"), row.get("batch_size")


def merge_results(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> dict[str, int]:
    """Append the rows of every ``src_dir/*.json`` to ``dst_dir/<same name>``, skipping rows already there
    (same run, suite, case and batch size), so merging a device run twice adds nothing. Returns the number
    of rows added per file."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    files = sorted(src_dir.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no *.json result files in {src_dir}")
    added: dict[str, int] = {}
    for src in files:
        dst = dst_dir / src.name
        have = {_row_key(r) for r in read_rows(dst)} if dst.exists() else set()
        new = [r for r in read_rows(src) if _row_key(r) not in have]
        if new:
            append_rows(dst, new)
        added[src.name] = len(new)
    return added


def summarize(results_dir: str | os.PathLike, run_ids: set[str] | None = None) -> str:
    """One line per row (suite, batch, case, value, ratio to its baseline, compile time) of every results
    file in ``results_dir``, optionally only for the given runs."""
    lines = []
    for path in sorted(Path(results_dir).glob("*.json")):
        for r in read_rows(path):
            if run_ids is not None and r.get("run_id") not in run_ids:
                continue
            comp = f"  compile {r['compile_s']:.1f}s" if r.get("compile_s") is not None else ""
            extra = r.get("extra") or {}
            tail = "".join(
                f"  {k}={extra[k]:.3g}" for k in ("achieved_tflops", "fraction_of_peak", "fraction_of_copy_bandwidth",
                                                   "time_over_bound", "speedup_vs_unfused_compiled")
                if isinstance(extra.get(k), (int, float))
            )
            wins = f"  wins={extra['wins']}" if "wins" in extra else ""
            lines.append(
                f"{r['suite']:<12} B={r.get('batch_size')!s:<6} {r['case']:<44} {r['value']:>11.4g} {r['unit']:<16}"
                f" x{r['ratio']:.3g} vs {r['baseline']}{comp}{tail}{wins}"
            )
    return "\n".join(lines)
