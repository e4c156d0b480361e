"""The paper's tables as data, and plain-text tables of a ``summary.json`` next to them.

The paper's numbers come from ``afs/paper_tables.json`` (package data, transcribed from the paper); this
run's from the summary `afs.pipeline.Pipeline.reproduce` writes. Nothing is typed by hand. Tables are
aligned plain text (no pandas): the notebooks print them and nbval compares them. Pure functions of their
inputs: where files live is `afs.report`'s concern.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any, Mapping, Sequence

__all__ = [
    "MISSING", "fmt", "format_table", "compare_table", "paper_tables", "paper_table", "threshold_text",
    "claims_table", "print_claims", "stacks_tagged", "default_stack_record", "mask_role", "extractor_table",
    "alpha_table", "mask_table", "comparison_table", "ablation_table", "bench_table",
]

MISSING = "—"  # printed for a value a table does not have (not measured, or not in the paper)


# ----------------------------------------------------------------------------------------------------
# Plain-text tables
# ----------------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, None/NaN as a dash, anything else as ``str``."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
                 digits: int = 2) -> str:
    """Rows as aligned text: first column left-aligned, the others right-aligned, a rule under the header."""
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
    """"paper | run | Δ" for each metric in ``columns``; rows ``{label: values in column order}`` joined by
    label, paper order first, then run-only rows. A missing row or value prints as a dash. Δ is run minus
    paper in the metric's units (points for accuracies); ``key`` heads the label column, ``note`` follows."""
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
# The paper's tables
# ----------------------------------------------------------------------------------------------------
_PAPER_CACHE: dict[str, Any] | None = None


def paper_tables() -> dict[str, Any]:
    """Tables I-VI of the paper (``afs/paper_tables.json``), a fresh copy on every call: ``table_I_extractors``
    ... ``table_VI_ablation``, each with ``columns``, ``rows`` (paper order) and ``title``; ``_source``."""
    global _PAPER_CACHE
    if _PAPER_CACHE is None:
        from importlib import resources  # works installed or from a checkout, also zipped

        try:
            text = resources.files("afs").joinpath("paper_tables.json").read_text(encoding="utf-8")
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise FileNotFoundError(f"package data 'paper_tables.json' not found next to afs/__init__.py ({e})") from None
        _PAPER_CACHE = json.loads(text)
    return copy.deepcopy(_PAPER_CACHE)  # callers may edit their copy without touching the cache


def paper_table(key: str) -> list[dict[str, Any]]:
    """One paper table as ``{column: value}`` dicts, e.g. ``paper_table("table_I_extractors")``."""
    tables = paper_tables()
    if key not in tables or key.startswith("_"):
        valid = [k for k in tables if not k.startswith("_")]
        raise ValueError(f"no paper table {key!r}; valid: {valid}")
    t = tables[key]
    return [dict(zip(t["columns"], row)) for row in t["rows"]]


# ----------------------------------------------------------------------------------------------------
# Claims and audit checks (verdicts from afs.evidence; reported, never asserted)
# ----------------------------------------------------------------------------------------------------
def _num(v: Any, digits: int = 2) -> str:
    return MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.{digits}f}"


def threshold_text(c: Mapping[str, Any]) -> str:
    """A claim's test as words: ``"> 0"``, ``"within ±2"``."""
    op, t = c.get("op"), c.get("threshold")
    return f"within ±{t:g}" if op == "within" else f"{op} {t:g}"


def _from_source(claim: Mapping[str, Any], source: str | None) -> bool:
    """Whether ``claim["source"]`` starts with the word(s) ``source``: "Table I" picks "Table I (III-A)" but
    not "Table II ..." (the prefix must end where a word ends)."""
    src = str(claim.get("source", ""))
    return source is None or (src.startswith(source) and (len(src) == len(source) or not src[len(source)].isalnum()))


def claims_table(summary: Mapping[str, Any], source: str | None = None, *, which: str = "claims") -> str:
    """The paper's claims (``which="claims"``) or the audit's checks (``"audit"``) from ``source`` as a verdict
    table: the statistic on the paper's numbers, this run's estimate with its paired-bootstrap 95% interval,
    the threshold from the paper's words, and holds / fails / inconclusive."""
    claims = summary.get("claims", []) if which == "claims" else summary.get("audit", {}).get("checks", [])
    rows = []
    for c in claims:
        if not _from_source(c, source):
            continue
        ci = c.get("ci95")
        ci_text = MISSING if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
        ours = _num(c.get("estimate")) if c.get("verdict") != "not run" else f"not run ({c.get('reason', '')})"
        rows.append([f"{c.get('source')}: {c.get('claim')}", _num(c.get("paper")), ours, ci_text,
                     threshold_text(c), str(c.get("verdict")).upper() if c.get("verdict") == "fails" else c.get("verdict")])
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
    """What a stacking mask selects, whatever its length (a small profile's 4 digits beside the paper's 9):
    "ends" (first and last), "ends+middle", "alternate", "all", else the mask itself."""
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
    masks: dict[str, tuple[str, Any]] = {}
    for s in stacks_tagged(summary, "mask:"):
        for t in s["tags"]:
            if t.startswith("mask:"):
                mask = t[len("mask:"):]
                role = mask_role(mask)
                label = next((k for k in paper if k.startswith(f"{role} (")), f"{role} ({mask})")
                run[label] = _acc(s, cols)
                masks[label] = (mask, s["members"])
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


def bench_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Benchmark rows (`afs.report.bench_results`) as text: device, suite, case, batch, median time, value,
    ratio vs baseline, date."""
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
