"""What the notebooks call (``from afs import report``): where runs and figures live, the profile's pipeline
and summary, the header, figures, invariants, and accuracies with their 95% intervals; `afs.tables` is
re-exported, so a notebook reaches all of it as ``report.X``. Nothing here trains or attacks or imports torch.

Runs live in ``$AFS_RUNS``, else ``<checkout>/runs`` when ``afs`` is imported from a source checkout (found from
the package's location: notebook kernels start in ``notebooks/``), else ``./runs``; figures in
``$AFS_FIGURES``, else ``<runs>/figures``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from afs.tables import *  # noqa: F403 -- the paper's tables and the table builders, as report.X

if TYPE_CHECKING:
    from afs.config import Profile
    from afs.evidence import Rows
    from afs.pipeline import Pipeline

RUNS_ENV = "AFS_RUNS"
FIGURES_ENV = "AFS_FIGURES"


# --- where runs, figures and benchmark rows live; the profile's pipeline and summary -------------------
def repo_root() -> Path | None:
    """The source checkout ``afs`` is imported from (with ``pyproject.toml``), or None for an installed one."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() and (here / "afs").is_dir() else None


def runs_root() -> Path:
    env, root = os.environ.get(RUNS_ENV), repo_root()
    if env:
        return Path(env).expanduser().resolve()
    return (root / "runs") if root is not None else (Path.cwd() / "runs").resolve()


def rel_path(path: str | Path) -> str:
    """``path`` relative to the checkout when it lies inside it (so committed notebook outputs do not carry
    one machine's absolute paths), else the path as given."""
    p, root = Path(path).resolve(), repo_root()
    return str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else str(path)


def figures_dir() -> Path:
    env = os.environ.get(FIGURES_ENV)
    d = Path(env).expanduser().resolve() if env else runs_root() / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _profile(profile: "str | Profile | None") -> "Profile":
    """A profile or its name (``None``: ``$AFS_PROFILE``, else the default)."""
    from afs.config import Profile, get_profile

    return profile if isinstance(profile, Profile) else get_profile(profile)


def pipeline(profile: "str | Profile | None" = None, *, progress: bool = False) -> "Pipeline":
    """The notebooks' `afs.pipeline.Pipeline`: runs under `runs_root`, data from ``$AFS_DATA``, no progress bars
    unless asked (noise in notebook outputs)."""
    from afs.pipeline import Pipeline

    return Pipeline(_profile(profile), runs_root(), data_root=None, progress=progress)


def summary(pipe: "Pipeline") -> dict[str, Any]:
    """``<pipe.root>/summary.json`` when made with this very profile (same version and config), else
    ``pipe.reproduce()``. Reading the file keeps its record of how long each stage really took."""
    from afs.summary import SUMMARY_VERSION

    path = pipe.root / "summary.json"
    if path.is_file():
        done = json.loads(path.read_text())
        config = json.loads(json.dumps(pipe.profile.to_dict()))  # as JSON reads it back (tuples as lists)
        if done.get("version") == SUMMARY_VERSION and done.get("config") == config:
            return done
    return pipe.reproduce()


def bench_dir() -> Path:
    """``<checkout>/results/bench`` (``./results/bench`` outside a checkout): one JSON list of rows per suite."""
    return (repo_root() or Path.cwd()) / "results" / "bench"


def bench_results(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """Every row of ``<folder>/*.json`` (default `bench_dir`), in file order; [] when there are none."""
    rows: list[dict[str, Any]] = []
    for path in sorted(Path(folder or bench_dir()).glob("*.json")):
        data = json.loads(path.read_text() or "[]")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of benchmark rows, got {type(data).__name__}")
        rows.extend(r for r in data if isinstance(r, dict))
    return rows


# --- notebook header, wall time, figures, invariants ------------------------------------------------
class Timer:
    """Wall time since ``start`` (a ``time.perf_counter()``; default: now); ``done()`` prints it."""

    def __init__(self, start: float | None = None) -> None:
        self.t0 = time.perf_counter() if start is None else float(start)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def done(self, what: str = "notebook") -> float:
        s = self.elapsed
        print(f"{what} wall time: {s:.1f} s ({s / 60:.1f} min)")
        return s


def header(profile: "str | Profile | None", reproduces: str, *, started: float | None = None) -> Timer:
    """Print what a notebook reproduces, its profile, data set, code version and hardware; return a `Timer`
    running since ``started`` (a ``time.perf_counter()`` from the notebook's first cell; default: now)."""
    import torch

    from afs.io import git_sha

    prof = _profile(profile)
    d, m = prof.data, prof.model
    size = lambda n: "all" if n is None else f"{n:,}"  # noqa: E731 -- None means the whole split
    gpus = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            if torch.cuda.is_available() else "none (CPU only)")
    lines = [
        f"Reproduces: {reproduces}",
        f"Profile:    {prof.name}  (model {m.arch}-{m.depth}-{m.widen_factor}, "
        f"{prof.extractor.epochs} extractor epochs, budgets {list(prof.extractor.budgets)}/255)",
        f"Data:       {d.name}: {size(d.train_size)} train (+{d.val_size:,} val), {size(d.test_size)} test",
    ]
    if d.name == "cifar10-jpeg":
        lines.append("            (the offline copy: CIFAR-10 re-encoded as JPEG q~75, real images and labels, "
                     "lossy; numbers are close to, not equal to, lossless CIFAR-10's)")
    if prof.name != "paper":
        lines.append("            (a reduced profile: compare trends with the paper, not absolute numbers)")
    lines.append(f"Code:       git {git_sha() or 'unknown (not a git checkout)'}")
    lines.append(f"Hardware:   GPU: {gpus}; CPU cores: {os.cpu_count()}; torch {torch.__version__}; "
                 f"python {platform.python_version()}")
    print("\n".join(lines))
    return Timer(started)


def savefig(fig: Any, name: str) -> Path:
    """Save a matplotlib figure as ``<figures_dir>/<name>.png`` (what the README links) and return the path."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem like 'cpu_fig3_tsne', got {name!r}")
    path = figures_dir() / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path


def check_invariants(checks: Sequence[tuple[str, bool]]) -> None:
    """Print and assert what the *code* guarantees (shapes, sums, bounds, the subset used): it holds under every
    profile, so a failure is a bug. The paper's claims are reported, never asserted: see `print_claims`."""
    print("Invariants of the code")
    for text, ok in checks:
        print(f"  [{'ok' if ok else 'BROKEN'}] {text}")
    failed = [text for text, ok in checks if not ok]
    if failed:
        raise AssertionError("code invariants broken: " + "; ".join(failed))


# --- accuracies with their 95% intervals ------------------------------------------------------------
def interval(rec: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """``rec["ci95"][metric]`` as (lo, hi), or None."""
    ci = (rec.get("ci95") or {}).get(metric)
    return None if ci is None else (float(ci[0]), float(ci[1]))


def yerr(values: Sequence[float], intervals: Sequence[Sequence[float] | None] | None) -> list[list[float]] | None:
    """matplotlib ``yerr`` (2 x n: below, above) from one 95% interval ``(lo, hi)`` per value (None: no bar)."""
    if intervals is None:
        return None
    below = [0.0 if ci is None else max(0.0, v - ci[0]) for v, ci in zip(values, intervals)]
    above = [0.0 if ci is None else max(0.0, ci[1] - v) for v, ci in zip(values, intervals)]
    return [below, above]


def error_bars(recs: Sequence[Mapping[str, Any]], metric: str) -> list[list[float]]:
    """`yerr` from the records' 95% intervals of ``metric``."""
    return yerr([float(r[metric]) for r in recs], [interval(r, metric) for r in recs])  # type: ignore[return-value]


def with_ci(rec: Mapping[str, Any], metric: str) -> str:
    """``"36.0 [31.8, 40.2]"``: an accuracy with its 95% interval, for printing."""
    v, ci = rec.get(metric), interval(rec, metric)
    if v is None:
        return MISSING
    return f"{v:.1f}" + ("" if ci is None else f" [{ci[0]:.1f}, {ci[1]:.1f}]")


def plane_points(recs: Mapping[str, Mapping[str, Any]], x: str = "pgd20", y: str = "clean") -> tuple[dict, dict]:
    """Records as `afs.analysis.plot_accuracy_plane` input: ``({label: (x, y)}, {label: (x CI, y CI)})``,
    the second being the records' 95% intervals (None where a record has none)."""
    points = {k: (float(r[x]), float(r[y])) for k, r in recs.items()}
    return points, {k: (interval(r, x), interval(r, y)) for k, r in recs.items()}


def sample_flags(summary: Mapping[str, Any], subset: str, key: str) -> dict[str, Any]:
    """Row ``key``'s per-sample correctness on ``subset``: ``{metric: bool array (n,)}`` ({} if there is none)."""
    from afs.evidence import unpack_bits

    sub = summary.get("samples", {}).get(subset, {})
    return {m: unpack_bits(text, int(sub["n"])) for m, text in sub.get("rows", {}).get(key, {}).items()}


def _intervals(rows: "Rows", subset: str, key: str, metrics: Sequence[str]) -> dict[str, list[float]]:
    have = set(rows.s.get("samples", {}).get(subset, {}).get("rows", {}).get(key, {}))
    if {"clean", "aa"} <= have:
        have.add("tradeoff")  # mean(clean, aa) per image
    return {m: rows.interval(subset, key, m) for m in metrics if m in have}


def sample_intervals(summary: Mapping[str, Any], subset: str, key: str,
                     metrics: Sequence[str]) -> dict[str, list[float]]:
    """95% intervals of row ``key``'s accuracies from its per-sample flags, with the summary's own bootstrap
    (`afs.evidence.Rows`, as ``ci95``); "tradeoff" is mean(clean, aa) per image; metrics without a row are left out."""
    from afs.evidence import Rows

    return _intervals(Rows(summary), subset, key, metrics)


def audit_records(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The robustness audit as records for `with_ci`: ``"stack"``, ``"member"`` (clean, pgd20, strong, cw20,
    eps<b>) and ``"transfer:<source>"`` (pgd20: the stack on PGD-20 examples crafted on ``source``), each with
    ``ci95`` (as `sample_intervals`) and ``from_bits``, the accuracies recomputed from the per-sample rows."""
    from afs.evidence import Rows

    audit, rows = summary["audit"], Rows(summary)
    recs = {who: {m: v for m, v in rec.items() if m != "key"} for who, rec in audit["models"].items()}
    recs.update({f"transfer:{src}": {"pgd20": acc} for src, acc in audit["transfer"].items()})
    for who, rec in recs.items():
        rec["ci95"] = _intervals(rows, "audit", who, list(rec))
        rec["from_bits"] = {m: 100.0 * float(f.mean()) for m, f in sample_flags(summary, "audit", who).items()}
    return recs
