"""What the notebooks call (``from afs import report``): where runs and figures live, the profile's
pipeline and summary, the header and timer, figure saving, invariants, and accuracies with their 95%
intervals. The paper's tables and "paper | run | Δ" tables are `afs.tables`, imported here by name so a
notebook reaches all of it as ``report.X``. Nothing here trains or attacks.

Where things live (each overridable by an environment variable, so CI and the notebooks agree):

* ``runs_root()``: ``$AFS_RUNS``, else ``<checkout>/runs`` when ``afs`` is imported from a source checkout
  (found from the package's own location: notebook kernels start in ``notebooks/``), else ``./runs``;
* ``figures_dir()``: ``$AFS_FIGURES``, else ``<runs_root>/figures``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from afs.tables import (MISSING, ablation_table, alpha_table, bench_table, compare_table, comparison_table,
                        default_stack_record, extractor_table, format_table, mask_role, mask_table, paper_table,
                        paper_tables, print_claims, stacks_tagged)

if TYPE_CHECKING:  # imported lazily at run time: `afs.report` must import without torch's start-up cost
    from afs.config import Profile
    from afs.pipeline import Pipeline

__all__ = [
    "RUNS_ENV", "FIGURES_ENV", "repo_root", "runs_root", "figures_dir", "rel_path", "pipeline", "summary",
    "bench_dir", "bench_results", "Timer", "header", "savefig", "check_invariants", "interval", "error_bars",
    "with_ci", "plane_points", "sample_flags", "sample_intervals", "audit_records",
    # afs.tables, for the notebooks
    "paper_tables", "paper_table", "format_table", "compare_table", "print_claims", "stacks_tagged",
    "default_stack_record", "mask_role", "extractor_table", "alpha_table", "mask_table", "comparison_table",
    "ablation_table", "bench_table",
]

RUNS_ENV = "AFS_RUNS"
FIGURES_ENV = "AFS_FIGURES"


# ----------------------------------------------------------------------------------------------------
# Where runs, figures and benchmark rows live; the profile's pipeline and summary
# ----------------------------------------------------------------------------------------------------
def repo_root() -> Path | None:
    """The source checkout ``afs`` is imported from (the folder holding ``pyproject.toml`` and ``afs/``),
    or None when ``afs`` is an installed package (site-packages has no pyproject next to it)."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() and (here / "afs").is_dir() else None


def runs_root() -> Path:
    """``$AFS_RUNS``, else ``<checkout>/runs``, else ``./runs`` (see the module docstring)."""
    env = os.environ.get(RUNS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    root = repo_root()
    return (root / "runs") if root is not None else (Path.cwd() / "runs").resolve()


def rel_path(path: str | Path) -> str:
    """``path`` relative to the checkout when it lies inside it (what notebook outputs print, so that
    committed outputs do not carry one machine's absolute paths), else the path as given."""
    p, root = Path(path).resolve(), repo_root()
    if root is not None:
        try:
            return str(p.relative_to(root))
        except ValueError:
            pass
    return str(path)


def figures_dir() -> Path:
    """``$AFS_FIGURES``, else ``<runs_root>/figures``; created if missing."""
    env = os.environ.get(FIGURES_ENV)
    d = Path(env).expanduser().resolve() if env else runs_root() / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def pipeline(profile: "str | Profile | None" = None) -> "Pipeline":
    """The notebooks' `afs.pipeline.Pipeline`: the profile (``None``: ``$AFS_PROFILE``, else the default),
    runs under `runs_root`, data from ``$AFS_DATA``, no progress bars (noise in notebook outputs)."""
    from afs.config import Profile, get_profile
    from afs.pipeline import Pipeline

    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    return Pipeline(prof, runs_root(), data_root=None, progress=False)


def summary(pipe: "Pipeline") -> dict[str, Any]:
    """``<pipe.root>/summary.json`` when it was made with this very profile (same summary version and config),
    else ``pipe.reproduce()``. Reading the file keeps its record of how long each stage really took."""
    from afs.summary import SUMMARY_VERSION

    path = pipe.root / "summary.json"
    if path.is_file():
        done = json.loads(path.read_text())
        same_config = done.get("config") == json.loads(json.dumps(pipe.profile.to_dict()))
        if done.get("version") == SUMMARY_VERSION and same_config:
            return done
    return pipe.reproduce()


def bench_dir() -> Path:
    """``<checkout>/results/bench`` (``./results/bench`` outside a checkout): where the benchmark harness
    appends its rows, one JSON list per suite."""
    root = repo_root()
    return (root if root is not None else Path.cwd()) / "results" / "bench"


def bench_results(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """Every row of ``<folder>/*.json`` (default `bench_dir`), in file order; [] when there are none."""
    d = Path(folder) if folder is not None else bench_dir()
    rows: list[dict[str, Any]] = []
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        data = json.loads(path.read_text() or "[]")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of benchmark rows, got {type(data).__name__}")
        rows.extend(r for r in data if isinstance(r, dict))
    return rows


# ----------------------------------------------------------------------------------------------------
# Notebook header and wall time
# ----------------------------------------------------------------------------------------------------
class Timer:
    """Wall time since ``start`` (a ``time.perf_counter()`` value; default: now); ``done()`` prints it (the
    last line of every notebook)."""

    def __init__(self, start: float | None = None) -> None:
        self.t0 = time.perf_counter() if start is None else float(start)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def done(self, what: str = "notebook") -> float:
        s = self.elapsed
        print(f"{what} wall time: {s:.1f} s ({s / 60:.1f} min)")
        return s


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        dev = f"GPU: {gpu}"
    else:
        dev = "GPU: none (CPU only)"
    return (f"{dev}; CPU cores: {os.cpu_count()}; torch {torch.__version__}; "
            f"python {platform.python_version()}")


def header(profile: "str | Profile | None", reproduces: str, *, started: float | None = None) -> Timer:
    """Print what a notebook reproduces, its profile, data set, code version and hardware; return a `Timer`
    running since ``started`` (a ``time.perf_counter()`` from the notebook's first cell; default: now)."""
    from afs.config import Profile, get_profile

    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    d, m = prof.data, prof.model
    size = lambda n: "all" if n is None else f"{n:,}"  # noqa: E731 -- None means the whole split
    data = f"{d.name}: {size(d.train_size)} train (+{d.val_size:,} val), {size(d.test_size)} test"
    lines = [
        f"Reproduces: {reproduces}",
        f"Profile:    {prof.name}  (model {m.arch}-{m.depth}-{m.widen_factor}, "
        f"{prof.extractor.epochs} extractor epochs, budgets {list(prof.extractor.budgets)}/255)",
        f"Data:       {data}",
    ]
    if d.name == "cifar10-jpeg":
        lines.append("            (the offline copy: CIFAR-10 re-encoded as JPEG q~75, real images and labels, "
                     "lossy; numbers are close to, not equal to, lossless CIFAR-10's)")
    if prof.name != "paper":
        lines.append("            (a reduced profile: compare trends with the paper, not absolute numbers)")
    from afs.io import git_sha

    lines.append(f"Code:       git {git_sha() or 'unknown (not a git checkout)'}")
    lines.append(f"Hardware:   {_hardware()}")
    print("\n".join(lines))
    return Timer(started)


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------
def savefig(fig: Any, name: str, *, dpi: int = 130) -> Path:
    """Save a matplotlib figure as ``<figures_dir>/<name>.png`` (a name without a suffix) and return the path.
    The notebooks still show the figure inline; this is the copy the README and a reader can open."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem like 'cpu_fig3_tsne', got {name!r}")
    path = figures_dir() / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------------------------------
# Invariants (asserted) and accuracies with their intervals
# ----------------------------------------------------------------------------------------------------
def check_invariants(checks: Sequence[tuple[str, bool]], *, context: str = "") -> None:
    """Print and assert what the *code* guarantees (shapes, sums, bounds, the subset used): these hold under
    every profile, so a failure is a bug. The paper's claims are never asserted: see `print_claims`."""
    failed = [text for text, ok in checks if not ok]
    print(f"Invariants of the code{': ' + context if context else ''}")
    for text, ok in checks:
        print(f"  [{'ok' if ok else 'BROKEN'}] {text}")
    if failed:
        raise AssertionError("code invariants broken: " + "; ".join(failed))


def interval(rec: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """``rec["ci95"][metric]`` as (lo, hi), or None."""
    ci = (rec.get("ci95") or {}).get(metric)
    return None if ci is None else (float(ci[0]), float(ci[1]))


def error_bars(recs: Sequence[Mapping[str, Any]], metric: str) -> list[list[float]]:
    """matplotlib ``yerr`` (2 x n: below, above) from the records' 95% intervals of ``metric``."""
    lo, hi = [], []
    for r in recs:
        ci = interval(r, metric)
        v = float(r[metric])
        lo.append(0.0 if ci is None else max(0.0, v - ci[0]))
        hi.append(0.0 if ci is None else max(0.0, ci[1] - v))
    return [lo, hi]


def with_ci(rec: Mapping[str, Any], metric: str, digits: int = 1) -> str:
    """``"36.0 [31.8, 40.2]"``: an accuracy with its 95% interval, for printing."""
    v, ci = rec.get(metric), interval(rec, metric)
    if v is None:
        return MISSING
    return f"{v:.{digits}f}" + ("" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")


def plane_points(recs: Mapping[str, Mapping[str, Any]], x: str = "pgd20", y: str = "clean") -> tuple[dict, dict]:
    """Records as `afs.analysis.plot_accuracy_plane` input: ``({label: (x, y)}, {label: (x CI, y CI)})``,
    the second being the records' 95% intervals (None where a record has none)."""
    points = {k: (float(r[x]), float(r[y])) for k, r in recs.items()}
    return points, {k: (interval(r, x), interval(r, y)) for k, r in recs.items()}


def sample_flags(summary: Mapping[str, Any], subset: str, key: str) -> dict[str, Any]:
    """Per-sample correctness of row ``key`` on ``subset``, unpacked from ``summary["samples"]``:
    ``{metric: bool array (n,)}`` ({} when the summary holds no such row). Raises if a row's length is not
    the subset's ``n`` (`afs.evidence.unpack_bits`)."""
    from afs.evidence import unpack_bits

    sub = summary.get("samples", {}).get(subset, {})
    return {m: unpack_bits(text, int(sub["n"])) for m, text in sub.get("rows", {}).get(key, {}).items()}


def sample_intervals(summary: Mapping[str, Any], subset: str, key: str, metrics: Sequence[str]) -> dict[str, list[float]]:
    """95% intervals of row ``key``'s accuracies, recomputed from its per-sample flags with the summary's
    own bootstrap (`afs.evidence.Bootstrap`, seeded with the profile's seed, as ``ci95`` is). "tradeoff" is
    mean(clean, aa) per image; a metric without a per-sample row is left out."""
    from afs.evidence import percentile_interval

    flags = {m: f.astype("float32") for m, f in sample_flags(summary, subset, key).items()}
    if "clean" in flags and "aa" in flags:
        flags["tradeoff"] = (flags["clean"] + flags["aa"]) / 2  # Table IV's trade-off, image by image
    boot = _bootstrap(int(summary["samples"][subset]["n"]), int(summary.get("config", {}).get("seed", 0))) if flags else None
    return {m: percentile_interval(boot.means(flags[m])) for m in metrics if m in flags}


_BOOTSTRAPS: dict[tuple[int, int], Any] = {}


def _bootstrap(n: int, seed: int) -> Any:
    """One `afs.evidence.Bootstrap` per (n, seed): its count matrix is the costly part, and every row of a
    subset shares it (that is what makes differences between rows paired)."""
    from afs.evidence import Bootstrap

    if (n, seed) not in _BOOTSTRAPS:
        _BOOTSTRAPS[(n, seed)] = Bootstrap(n, seed=seed)
    return _BOOTSTRAPS[(n, seed)]


def audit_records(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The robustness audit (``summary["audit"]``) as records that `with_ci` and `error_bars` read:
    ``"stack"`` and ``"member"`` (clean, pgd20, strong, cw20, eps<b>) and ``"transfer:<source>"`` (pgd20: the
    stack's accuracy on PGD-20 examples crafted on ``source``). Each has the summary's accuracies, ``ci95``
    from `sample_intervals`, and ``from_bits``: the accuracies recomputed from the per-sample rows, so a
    notebook can check that the rows are the ones the numbers came from."""
    audit = summary["audit"]
    recs = {who: {m: v for m, v in rec.items() if m != "key"} for who, rec in audit["models"].items()}
    recs.update({f"transfer:{src}": {"pgd20": acc} for src, acc in audit["transfer"].items()})
    for who, rec in recs.items():
        flags = sample_flags(summary, "audit", who)
        rec["ci95"] = sample_intervals(summary, "audit", who, list(rec))
        rec["from_bits"] = {m: 100.0 * float(f.mean()) for m, f in flags.items()}
    return recs


