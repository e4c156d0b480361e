"""Reporting for the notebooks and the README: the paper's tables as data, "paper | this run | delta" tables,
notebook headers and timers, figure saving, and the README results table.

Everything here reads numbers; nothing trains or attacks. The paper's numbers come from
``afs/paper_tables.json`` (package data, transcribed from the paper and checked against its text); this
run's numbers come from ``summary.json`` files written by :meth:`afs.pipeline.Pipeline.reproduce`
(``runs/<profile>/`` while working, ``results/<profile>/`` once committed). No number is typed by hand.

Where things live (each overridable by an environment variable, so CI and the notebooks agree):

* ``runs_root()``: ``$AFS_RUNS``, else ``<checkout>/runs`` when ``afs`` is imported from a source checkout
  (the notebooks run with ``notebooks/`` as their working directory, so the checkout is found from the
  package's own location), else ``./runs``;
* ``figures_dir()``: ``$AFS_FIGURES``, else ``<runs_root>/figures``.

Tables are plain aligned text (no pandas): the notebooks print them and nbval compares them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # imported lazily at run time: `afs.report` must import without torch's start-up cost
    from afs.config import Profile
    from afs.pipeline import Pipeline

__all__ = [
    "RUNS_ENV",
    "FIGURES_ENV",
    "README_BEGIN",
    "README_END",
    "paper_tables",
    "paper_table",
    "repo_root",
    "runs_root",
    "figures_dir",
    "rel_path",
    "pipeline",
    "load_summary",
    "summary",
    "bench_dir",
    "bench_results",
    "bench_table",
    "Timer",
    "header",
    "format_table",
    "compare_table",
    "fmt",
    "savefig",
    "check_invariants",
    "claim_rows",
    "claims_table",
    "print_claims",
    "interval",
    "error_bars",
    "with_ci",
    "plane_points",
    "sample_flags",
    "sample_intervals",
    "audit_records",
    "readme_claims_table",
    "mask_role",
    "extractor_table",
    "alpha_table",
    "mask_table",
    "comparison_table",
    "ablation_table",
    "default_stack_record",
    "stacks_tagged",
    "readme_results_table",
    "update_readme",
    "main",
]

RUNS_ENV = "AFS_RUNS"
FIGURES_ENV = "AFS_FIGURES"
README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
CLAIMS_BEGIN = "<!-- claims:begin -->"
CLAIMS_END = "<!-- claims:end -->"
_PAPER_FILE = "paper_tables.json"
_MISSING = "—"  # printed for a value a table does not have (not measured, or not in the paper)

# Order of the profiles wherever several are listed (README); unknown names follow alphabetically.
_PROFILE_ORDER = ("smoke", "cpu", "quick", "paper")


# ----------------------------------------------------------------------------------------------------
# The paper's tables
# ----------------------------------------------------------------------------------------------------
_PAPER_CACHE: dict[str, Any] | None = None


def paper_tables() -> dict[str, Any]:
    """Tables I-VI of the paper as data (``afs/paper_tables.json``); a fresh copy on every call.

    Keys: ``table_I_extractors``, ``table_II_alpha``, ``table_III_stacks``, ``table_IV_cifar10``,
    ``table_V_cifar100``, ``table_VI_ablation``; each has ``columns`` and ``rows`` (lists, in the
    paper's order) and a ``title``. ``_source`` records where the numbers come from.
    """
    global _PAPER_CACHE
    if _PAPER_CACHE is None:
        text = _read_package_text(_PAPER_FILE)
        _PAPER_CACHE = json.loads(text)
    return copy.deepcopy(_PAPER_CACHE)  # callers may edit their copy without touching the cache


def _read_package_text(name: str) -> str:
    """Package data, via importlib.resources (works installed or from a checkout, also zipped)."""
    from importlib import resources

    try:
        return resources.files("afs").joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise FileNotFoundError(f"package data {name!r} not found next to afs/__init__.py ({e})") from None


def paper_table(key: str) -> list[dict[str, Any]]:
    """One paper table as a list of ``{column: value}`` dicts, e.g. ``paper_table("table_I_extractors")``."""
    tables = paper_tables()
    if key not in tables or key.startswith("_"):
        valid = [k for k in tables if not k.startswith("_")]
        raise ValueError(f"no paper table {key!r}; valid: {valid}")
    t = tables[key]
    return [dict(zip(t["columns"], row)) for row in t["rows"]]


# ----------------------------------------------------------------------------------------------------
# Where runs and figures live
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
    runs under `runs_root`, data from ``$AFS_DATA`` (``data_root=None``), no progress bars (they would
    make notebook outputs noisy). It trains what is missing and reuses what the run directory holds."""
    from afs.config import Profile, get_profile
    from afs.pipeline import Pipeline

    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    return Pipeline(prof, runs_root(), data_root=None, progress=False)


def load_summary(profile: str, root: str | Path | None = None) -> dict[str, Any]:
    """``<root>/<profile>/summary.json`` (root: `runs_root`), with the paths looked at on failure."""
    base = Path(root) if root is not None else runs_root()
    path = base / profile / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"no summary for profile {profile!r}: looked at {path} "
                                f"(run `afs reproduce --profile {profile} --out {base}`)")
    return json.loads(path.read_text())


def summary(pipe: "Pipeline") -> dict[str, Any]:
    """The profile's summary: ``<pipe.root>/summary.json`` when it exists and was made with this very
    profile (same summary version, same config), else ``pipe.reproduce()`` (which trains and evaluates
    what is missing and writes the file). Reading the file rather than re-running ``reproduce`` keeps its
    record of how long each stage took when it was really computed."""
    from afs.pipeline import SUMMARY_VERSION

    path = pipe.root / "summary.json"
    if path.is_file():
        done = json.loads(path.read_text())
        same_config = done.get("config") == json.loads(json.dumps(pipe.profile.to_dict()))
        if done.get("version") == SUMMARY_VERSION and same_config:
            return done
    return pipe.reproduce()


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
    """Print what a notebook reproduces, its profile, data set and hardware; return a `Timer` running since
    ``started`` (a ``time.perf_counter()`` taken at the notebook's first cell; default: now).

    The offline data set ``cifar10-jpeg`` is named as what it is: CIFAR-10 re-encoded as JPEG, so its
    numbers are close to, not equal to, those on the lossless originals.
    """
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
# Plain-text tables
# ----------------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, None/NaN as a dash, anything else as ``str``."""
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return _MISSING if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
                 digits: int = 2) -> str:
    """Rows as aligned plain text: first column left-aligned, the others right-aligned, a rule under
    the header. Every row must have one cell per column."""
    cols = [str(c) for c in columns]
    for i, r in enumerate(rows):
        if len(r) != len(cols):
            raise ValueError(f"row {i} has {len(r)} cells but there are {len(cols)} columns: {list(r)!r}")
    cells = [[fmt(v, digits) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(cols)]

    def line(parts: Sequence[str]) -> str:
        out = [parts[0].ljust(widths[0])] + [p.rjust(w) for p, w in zip(parts[1:], widths[1:])]
        return "  ".join(out).rstrip()

    body = [line(cols), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
    return "\n".join(([title] if title else []) + body)


def _delta(run: Any, paper: Any) -> float | None:
    if isinstance(run, (int, float)) and isinstance(paper, (int, float)) and not isinstance(run, bool):
        if not (math.isnan(float(run)) or math.isnan(float(paper))):
            return float(run) - float(paper)
    return None


def compare_table(title: str, columns: Sequence[str],
                  paper_rows: Mapping[str, Sequence[Any] | None],
                  run_rows: Mapping[str, Sequence[Any] | None], *, key: str = "", digits: int = 2,
                  note: str | None = None) -> str:
    """Side by side "paper | this run | delta" for each metric in ``columns``, rows joined by label.

    Args:
        title: printed above the table (name the paper's table, e.g. "Table I").
        columns: metric names, e.g. ``["clean", "pgd10", "pgd20"]``.
        paper_rows / run_rows: ``{row label: values in column order}``; a missing label or a None value
            prints as a dash, and its delta too. Rows come in paper order, then run-only rows.
        key: header of the label column.
        note: an extra line printed under the table (e.g. what differs between the two settings).

    Delta is this run minus the paper, in the metric's own units (percentage points for accuracies).
    """
    labels = list(paper_rows) + [k for k in run_rows if k not in paper_rows]
    header_cells = [key] + [f"{c} {side}" for c in columns for side in ("paper", "run", "Δ")]
    rows = []
    for lab in labels:
        p = paper_rows.get(lab) or [None] * len(columns)
        r = run_rows.get(lab) or [None] * len(columns)
        if len(p) != len(columns) or len(r) != len(columns):
            raise ValueError(f"row {lab!r}: expected {len(columns)} values per side, got paper {list(p)!r}, run {list(r)!r}")
        cells: list[Any] = [lab]
        for pv, rv in zip(p, r):
            d = _delta(rv, pv)
            cells += [pv, rv, None if d is None else f"{d:+.{digits}f}"]
        rows.append(cells)
    text = format_table(header_cells, rows, title=title, digits=digits)
    return text + (f"\n{note}" if note else "")


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
# Invariants (asserted) and claims (reported)
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


def _num(v: Any, digits: int = 2) -> str:
    return _MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.{digits}f}"


def _threshold_text(c: Mapping[str, Any]) -> str:
    op, t = c.get("op"), c.get("threshold")
    return f"within ±{t:g}" if op == "within" else f"{op} {t:g}"


def _from_source(claim: Mapping[str, Any], source: str | None) -> bool:
    """Whether a claim's ``source`` ("Table II (III-B)") starts with the word(s) ``source``: "Table I" picks
    "Table I (III-A)" but not "Table II ..." (the prefix must end where a word ends)."""
    src = str(claim.get("source", ""))
    return source is None or (src.startswith(source) and (len(src) == len(source) or not src[len(source)].isalnum()))


def claim_rows(claims: Sequence[Mapping[str, Any]], source: str | None = None) -> list[list[Any]]:
    """Rows (claim, paper, ours, 95% CI, test, verdict) of the claims whose ``source`` starts with the words
    ``source`` (see `_from_source`)."""
    rows = []
    for c in claims:
        if not _from_source(c, source):
            continue
        ci = c.get("ci95")
        ci_text = _MISSING if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
        ours = _num(c.get("estimate")) if c.get("verdict") != "not run" else f"not run ({c.get('reason', '')})"
        rows.append([f"{c.get('source')}: {c.get('claim')}", _num(c.get("paper")), ours, ci_text,
                     _threshold_text(c), str(c.get("verdict")).upper() if c.get("verdict") == "fails" else c.get("verdict")])
    return rows


def claims_table(summary: Mapping[str, Any], source: str | None = None, *, which: str = "claims") -> str:
    """The paper's claims (``which="claims"``) or the audit's checks (``"audit"``) of a summary as a verdict
    table: the statistic on the paper's own numbers, this run's estimate with its paired-bootstrap 95%
    interval, the threshold from the paper's words, and holds / fails / inconclusive (`afs.evidence`)."""
    claims = summary.get("claims", []) if which == "claims" else summary.get("audit", {}).get("checks", [])
    rows = claim_rows(claims, source)
    if not rows:
        return f"(no {which} from {source!r} in this summary)"
    n = {c.get("subset"): c.get("n") for c in claims if c.get("n") and _from_source(c, source)}
    note = ("estimate and paper value are the claim's statistic (a difference in points, or a slope); "
            "95% CI: paired bootstrap over the same test images"
            + (" (" + ", ".join(f"{k}: {v} images" for k, v in n.items()) + ")" if n else ""))
    return format_table(["claim", "paper", "ours", "95% CI", "test", "verdict"], rows,
                        title=f"{'Paper claims' if which == 'claims' else 'Robustness audit'}"
                              f"{' (' + source + ')' if source else ''}: verdicts at this scale") + "\n" + note


def print_claims(summary: Mapping[str, Any], source: str | None = None, *, which: str = "claims") -> None:
    """Print `claims_table`; never raises on a verdict (a reduced-scale outcome is a finding, not a bug)."""
    print(claims_table(summary, source, which=which))


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
        return _MISSING
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


# ----------------------------------------------------------------------------------------------------
# The paper's tables next to a summary.json
# ----------------------------------------------------------------------------------------------------
def stacks_tagged(summary: Mapping[str, Any], prefix: str) -> list[dict[str, Any]]:
    """Stack records of ``summary["stacks"]`` with a tag starting with ``prefix`` (e.g. "alpha-sweep")."""
    return [s for s in summary.get("stacks", []) if any(t.startswith(prefix) for t in s.get("tags", []))]


def default_stack_record(summary: Mapping[str, Any], mode: str | None = None) -> dict[str, Any]:
    """The default stack (profile's members, alpha and merger mode, or ``mode``) of a summary."""
    mode = mode or summary["config"]["merger"]["mode"]
    found = stacks_tagged(summary, f"default-{mode}")
    if not found:
        raise ValueError(f"summary has no stack tagged 'default-{mode}'; tags: "
                         f"{sorted({t for s in summary.get('stacks', []) for t in s.get('tags', [])})}")
    return found[0]


def mask_role(mask: str) -> str:
    """What a stacking mask selects, independent of its length, so a 4-digit mask of a small profile can
    be set beside the paper's 9-digit one: "ends" (first and last), "ends+middle", "alternate", "all",
    else the mask itself."""
    if not mask or set(mask) - {"0", "1"}:
        raise ValueError(f"a stack mask is a string of 0/1 digits, got {mask!r}")
    n, on = len(mask), [i for i, c in enumerate(mask) if c == "1"]
    if len(on) == n:
        return "all"
    if on == [0, n - 1]:
        return "ends"
    if n % 2 == 1 and on == [0, n // 2, n - 1]:
        return "ends+middle"
    if n % 2 == 1 and on == list(range(0, n, 2)):
        return "alternate"
    return mask


def _acc(rec: Mapping[str, Any] | None, cols: Sequence[str]) -> list[Any] | None:
    return None if rec is None else [rec.get(c) for c in cols]


def extractor_table(summary: Mapping[str, Any]) -> str:
    """Table I: clean / PGD-10 / PGD-20 of each budget's network, paper next to this run."""
    cols = ["clean", "pgd10", "pgd20"]
    paper = {f"#{r['budget_255']} ({r['budget_255']}/255)": _acc(r, cols) for r in paper_table("table_I_extractors")}
    run = {f"#{b} ({b}/255)": _acc(rec, cols) for b, rec in sorted(summary["extractors"].items(), key=lambda kv: int(kv[0]))}
    return compare_table("Table I: single networks PGD-trained at each budget (accuracy %, eps 8/255)", cols,
                         paper, run, key="network")


def alpha_table(summary: Mapping[str, Any]) -> str:
    """Table II: the alpha sweep of the default stack (paper: networks #3..#8)."""
    cols = ["clean", "pgd10", "pgd20"]
    paper = {f"alpha={r['alpha']:.1f}": _acc(r, cols) for r in paper_table("table_II_alpha")}
    recs = sorted(stacks_tagged(summary, "alpha-sweep"), key=lambda s: s["alpha"])
    run = {f"alpha={s['alpha']:.1f}": _acc(s, cols) for s in recs}
    members = recs[0]["members"] if recs else summary["config"]["merger"]["stack"]
    return compare_table("Table II: merger trained at each alpha (accuracy %)", cols, paper, run, key="alpha",
                         note=f"paper stack: networks #3..#8; this run's stack: budgets {members}/255, "
                              f"merger mode 'paired'")


def mask_table(summary: Mapping[str, Any]) -> str:
    """Table III: stacks chosen by binary masks, matched to the paper's rows by what the mask selects."""
    cols = ["clean", "pgd10", "pgd20"]
    t3 = paper_tables()["table_III_stacks"]
    paper = {f"{role} ({m})": _acc(dict(zip(t3["columns"], row)), cols)
             for role, m, row in zip(t3["roles"], t3["masks_9digit"], t3["rows"])}
    run: dict[str, Any] = {}
    for s in stacks_tagged(summary, "mask:"):
        for t in s["tags"]:
            if t.startswith("mask:"):
                mask = t[len("mask:"):]
                role = mask_role(mask)
                label = next((k for k in paper if k.startswith(f"{role} (")), f"{role} ({mask})")
                run[label] = _acc(s, cols)
                run_masks = run.setdefault("_masks", {})
                run_masks[label] = (mask, s["members"])
    masks = run.pop("_masks", {})
    note = "\n".join(f"this run's {lab.split(' (')[0]!r} = mask {m} over the candidates, budgets {b}/255"
                     for lab, (m, b) in masks.items())
    return compare_table("Table III: stacks chosen by masks, alpha = 0.5 (accuracy %)", cols, paper, run,
                         key="stack (paper mask)",
                         note="rows are matched by what the mask selects; the paper's first mask is printed "
                              "'10000001' (8 digits)\n" + note)


def comparison_table(summary: Mapping[str, Any]) -> str:
    """Table IV: PGD-AT (the single 8/255 network) and AFS with AutoAttack and the trade-off."""
    cols = ["clean", "pgd", "aa", "tradeoff"]
    paper = {r["method"]: _acc(r, cols) for r in paper_table("table_IV_cifar10")}
    run = {}
    for r in summary["comparison"]["rows"]:
        lab = "PGD-AT" if r["method"].startswith("PGD-AT") else r["method"]
        run[lab] = _acc(r, cols)
    n = summary["comparison"].get("aa_images")
    return compare_table("Table IV: CIFAR-10 comparison (accuracy %; PGD = PGD-20; trade-off = mean(clean, AA))",
                         cols, paper, run, key="method",
                         note=f"this run: every column on the same {n} test images (the class-balanced AutoAttack "
                              f"subset), so the trade-off averages two numbers measured on the same images")


def ablation_table(summary: Mapping[str, Any]) -> str:
    """Table VI: accuracies of the ablation settings, and their cost relative to the baseline."""
    cols = ["clean", "pgd20"]
    names = ["Baseline", "Rand. pert.", "Large model", "AFS"]
    p_rows = paper_table("table_VI_ablation")
    paper = {n: _acc(r, cols) for n, r in zip(names, p_rows)}
    run_rows = summary["ablation"]
    run = {n: _acc(r, cols) for n, r in zip(names, run_rows)}
    acc = compare_table("Table VI: ablation (accuracy %)", cols, paper, run, key="setting")
    # Costs: the paper counts multiply-accumulates ("Flops (G)"); the run's macs_G is flop_counter / 2.
    p0, r0 = p_rows[0], run_rows[0]
    cost_rows = []
    for n, p, r in zip(names, p_rows, run_rows):
        cost_rows.append([n, p["params_M"], r["params_M"], p["params_M"] / p0["params_M"], r["params_M"] / r0["params_M"],
                          p["flops_G"], r["macs_G"], p["flops_G"] / p0["flops_G"], r["macs_G"] / r0["macs_G"]])
    cost = format_table(["setting", "params M paper", "params M run", "× base paper", "× base run",
                         "GMAC paper", "GMAC run", "× base paper", "× base run"], cost_rows,
                        title="Table VI: cost per 1x3x32x32 image (GMAC = torch.utils.flop_counter FLOPs / 2, "
                              "the paper's 'Flops (G)')", digits=3)
    settings = "; ".join(f"{n} = {r['setting']}" for n, r in zip(names, run_rows))
    return f"{acc}\nthis run: {settings}\n\n{cost}"


# ----------------------------------------------------------------------------------------------------
# Benchmark results (07_performance)
# ----------------------------------------------------------------------------------------------------
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


def bench_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Benchmark rows as text: device, suite, case, batch, median time, value and unit, ratio vs baseline."""
    out = []
    for r in rows:
        env = r.get("env") or {}
        device = env.get("gpu") or f"CPU ({env.get('cpu_count', '?')} cores)"
        t = (r.get("time") or {}).get("median_ms")
        ratio = r.get("ratio")
        out.append([device, r.get("suite"), r.get("case"), r.get("batch_size"), t,
                    f"{fmt(r.get('value'), 3)} {r.get('unit', '')}".strip(),
                    None if ratio is None else f"x{ratio:.3g} vs {r.get('baseline')}", str(r.get("date", ""))[:10]])
    return format_table(["device", "suite", "case", "B", "median ms", "value", "ratio", "date"], out, digits=2)


# ----------------------------------------------------------------------------------------------------
# README results table
# ----------------------------------------------------------------------------------------------------
def _profile_sort_key(name: str) -> tuple[int, str]:
    return (_PROFILE_ORDER.index(name) if name in _PROFILE_ORDER else len(_PROFILE_ORDER), name)


def _md_num(v: Any) -> str:
    """A markdown cell: numbers with two decimals, None/NaN as a dash."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt(float(v), 2)
    return fmt(v)


def _run_label(s: Mapping[str, Any]) -> str:
    """A summary's column/row name: its profile, and its seed when that is not the named profile's own."""
    from afs.config import PROFILES

    name, seed = s.get("profile", "?"), s.get("config", {}).get("seed")
    own = PROFILES.get(name)
    return f"`{name}`" + (f" (seed {seed})" if own is not None and seed is not None and seed != own.seed else "")


def _data_cell(s: Mapping[str, Any]) -> str:
    d = s.get("dataset", {})
    name = d.get("name", s.get("config", {}).get("data", {}).get("name", "?"))
    parts = [f"{d['train']:,} train" if "train" in d else None, f"{d['test']:,} test" if "test" in d else None,
             f"Table IV on the {d['aa']:,} AA images" if "aa" in d else None]
    inner = ", ".join(p for p in parts if p)
    return f"{name} ({inner})" if inner else name


def _comparison_row(s: Mapping[str, Any], which: str) -> Mapping[str, Any]:
    rows = s.get("comparison", {}).get("rows", [])
    for r in rows:
        if (which == "single" and str(r.get("method", "")).startswith("PGD-AT")) or r.get("method") == which:
            return r
    return {}


def _md_ci(row: Mapping[str, Any], metric: str) -> str:
    """A markdown cell ``27.60 (23.8–31.5)``: the value and its 95% interval, when the summary has one."""
    v, ci = row.get(metric), interval(row, metric)
    return _md_num(v) + ("" if ci is None else f" ({ci[0]:.1f}–{ci[1]:.1f})")


def readme_results_table(results_dir: str | Path = "results") -> str:
    """The README's results table (markdown) from ``<results_dir>/<profile>/summary.json`` files, with the
    paper's row last. Columns: profile, data, the single 8/255 network (PGD-AT) clean / PGD-20 / AA, the
    default AFS stack clean / PGD-20 / AA, and the trade-off mean(clean, AA) of both: Table IV's rows, every
    column on the same (AutoAttack) images, each with its 95% interval. A value a summary lacks prints as a
    dash."""
    summaries = _load_summaries(results_dir)
    head = ("| profile | data (Table IV images) | PGD-AT 8/255 clean | PGD-20 | AA | AFS clean | PGD-20 | AA | "
            "trade-off PGD-AT → AFS |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for s in summaries:
        one, afs = _comparison_row(s, "single"), _comparison_row(s, "AFS")
        trade = f"{_md_ci(one, 'tradeoff')} → {_md_ci(afs, 'tradeoff')}"
        lines.append(f"| {_run_label(s)} | {_data_cell(s)} | {_md_ci(one, 'clean')} | "
                     f"{_md_ci(one, 'pgd')} | {_md_ci(one, 'aa')} | {_md_ci(afs, 'clean')} | "
                     f"{_md_ci(afs, 'pgd')} | {_md_ci(afs, 'aa')} | {trade} |")
    t4 = {r["method"]: r for r in paper_table("table_IV_cifar10")}
    p1, pa = t4["PGD-AT"], t4["AFS"]
    lines.append(f"| paper (Table IV) | CIFAR-10 (50,000 train, 10,000 test) | {_md_num(p1['clean'])} | "
                 f"{_md_num(p1['pgd'])} | {_md_num(p1['aa'])} | {_md_num(pa['clean'])} | {_md_num(pa['pgd'])} | "
                 f"{_md_num(pa['aa'])} | {_md_num(p1['tradeoff'])} → {_md_num(pa['tradeoff'])} |")
    if not summaries:
        lines.append(f"\n_No results yet: `{results_dir}/<profile>/summary.json` is written by `afs reproduce` and "
                     f"copied there when committed._")
    return "\n".join(lines)


def _load_summaries(results_dir: str | Path) -> list[dict[str, Any]]:
    root = Path(results_dir)
    found = sorted(root.glob("*/summary.json")) if root.is_dir() else []
    out = []
    for path in found:
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    return sorted(out, key=lambda s: _profile_sort_key(str(s.get("profile", ""))))


def readme_claims_table(results_dir: str | Path = "results") -> str:
    """The README's claims table (markdown): one row per paper claim and audit check, the claim's statistic
    on the paper's own numbers, and for each committed summary its estimate, 95% interval and verdict. Only
    summaries that carry verdicts (schema 2) get a column."""
    summaries = [s for s in _load_summaries(results_dir) if "claims" in s]
    if not summaries:
        return f"_No verdicts yet: `{results_dir}/<profile>/summary.json` files with `claims` are written by `afs reproduce`._"
    cols = " | ".join(f"{_run_label(s)}: estimate [95% CI] → verdict" for s in summaries)
    lines = [f"| source | claim | test | paper | {cols} |", "|---|---|---|---:|" + "---|" * len(summaries)]
    first = summaries[0]
    for c in [*first["claims"], *first.get("audit", {}).get("checks", [])]:
        cells = []
        for s in summaries:
            match = next((d for d in [*s["claims"], *s.get("audit", {}).get("checks", [])] if d["id"] == c["id"]), None)
            if match is None or match.get("verdict") == "not run":
                cells.append("not run")
                continue
            lo, hi = match["ci95"]
            v = match["verdict"]
            cells.append(f"{match['estimate']:+.2f} [{lo:+.2f}, {hi:+.2f}] → **{v}**" if v != "inconclusive"
                         else f"{match['estimate']:+.2f} [{lo:+.2f}, {hi:+.2f}] → {v}")
        paper = c.get("paper")
        lines.append(f"| {c['source']} | {c['claim']} | {_threshold_text(c)} | "
                     f"{_MISSING if paper is None else f'{paper:+.2f}'} | " + " | ".join(cells) + " |")
    n = "; ".join(f"{_run_label(s)}: {s['dataset'].get('test')} test images, AA and Table IV on {s['dataset'].get('aa')}, "
                  f"audit on {s['dataset'].get('audit')}" for s in summaries)
    return "\n".join(lines) + f"\n\nImages: {n}. Estimates are the claim's statistic in points (slopes: points per unit)."


def _replace_block(text: str, begin: str, end: str, body: str, path: Path) -> str:
    b, e = text.count(begin), text.count(end)
    if b != 1 or e != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path} needs exactly one {begin!r} followed by one {end!r} (found {b} begin, {e} end)")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text, count=1)


def update_readme(readme_path: str | Path = "README.md", results_dir: str | Path = "results") -> bool:
    """Replace the text between the README's ``<!-- results:begin/end -->`` markers with
    `readme_results_table` and between ``<!-- claims:begin/end -->`` with `readme_claims_table`; the markers
    stay. Returns True if the file changed. Missing or misordered markers are an error (the README is never
    rewritten blindly)."""
    path = Path(readme_path)
    if not path.is_file():
        raise FileNotFoundError(f"no README at {path.resolve()}")
    text = path.read_text(encoding="utf-8")
    new = _replace_block(text, README_BEGIN, README_END, readme_results_table(results_dir), path)
    new = _replace_block(new, CLAIMS_BEGIN, CLAIMS_END, readme_claims_table(results_dir), path)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m afs.report [--readme [README.md]] [--results results]``: print the README results table,
    or with ``--readme`` rewrite the README's marked block in place."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m afs.report", description=main.__doc__)
    parser.add_argument("--readme", nargs="?", const="README.md", default=None,
                        help="rewrite the block between the results markers of this README (default README.md)")
    parser.add_argument("--results", default="results", help="folder holding <profile>/summary.json (default results)")
    args = parser.parse_args(argv)
    try:
        if args.readme is None:
            print(readme_results_table(args.results))
        else:
            changed = update_readme(args.readme, args.results)
            print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
    except (ValueError, FileNotFoundError) as e:  # our own clear errors: no traceback
        print(f"afs.report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover -- the command-line entry point
    raise SystemExit(main())
