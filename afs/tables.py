"""The paper's tables as data (``afs/paper_tables.json``, transcribed from the paper), and a ``summary.json``'s
tables next to them, as aligned plain text (no pandas) that the notebooks print and nbval compares."""

from __future__ import annotations

import copy
import functools
import json
import math
from importlib import resources
from typing import Any, Mapping, Sequence

__all__ = [
    "MISSING", "fmt", "format_table", "compare_table", "package_data", "paper_tables", "paper_table",
    "threshold_text", "claims_table", "print_claims", "stacks_tagged", "default_stack_record", "mask_role",
    "comparison_rows", "extractor_table", "alpha_table", "mask_table", "comparison_table", "ablation_table",
    "bench_table",
]

MISSING = "—"  # printed for a value a table does not have (not measured, or not in the paper)
_ACC = ("clean", "pgd10", "pgd20")


# --- Plain-text tables --------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, None/NaN as a dash, anything else as ``str``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


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
        return "  ".join([parts[0].ljust(widths[0])] + [p.rjust(w) for p, w in zip(parts[1:], widths[1:])]).rstrip()

    body = [line(cols), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
    return "\n".join(([title] if title else []) + body)


def compare_table(title: str, columns: Sequence[str], paper_rows: Mapping[str, Sequence[Any] | None],
                  run_rows: Mapping[str, Sequence[Any] | None], *, key: str = "", note: str | None = None) -> str:
    """"paper | run | Δ" for each metric in ``columns``; rows ``{label: values in column order}`` joined by label,
    paper order first, a missing row or value as a dash; Δ = run - paper; ``key`` heads the label column."""
    rows = []
    for lab in list(paper_rows) + [k for k in run_rows if k not in paper_rows]:
        p = paper_rows.get(lab) or [None] * len(columns)
        r = run_rows.get(lab) or [None] * len(columns)
        if len(p) != len(columns) or len(r) != len(columns):
            raise ValueError(f"row {lab!r}: expected {len(columns)} values per side, got paper {list(p)!r}, "
                             f"run {list(r)!r}")
        cells: list[Any] = [lab]
        for pv, rv in zip(p, r):
            d = float(rv) - float(pv) if isinstance(rv, (int, float)) and isinstance(pv, (int, float)) else math.nan
            cells += [pv, rv, None if math.isnan(d) else f"{d:+.2f}"]  # NaN: not measured
        rows.append(cells)
    header = [key] + [f"{c} {side}" for c in columns for side in ("paper", "run", "Δ")]
    return format_table(header, rows, title=title) + (f"\n{note}" if note else "")


# --- The paper's tables -------------------------------------------------------------------------------------
@functools.cache
def _read_package_json(name: str) -> Any:
    return json.loads(resources.files("afs").joinpath(name).read_text(encoding="utf-8"))


def package_data(name: str) -> Any:
    """``afs/<name>`` (JSON package data, read once), a fresh copy that callers may edit."""
    return copy.deepcopy(_read_package_json(name))


def paper_tables() -> dict[str, Any]:
    """Tables I-VI of the paper, a fresh copy: ``table_I_extractors`` ... ``table_VI_ablation``, each with
    ``columns``, ``rows`` (paper order) and ``title``; ``_source``."""
    return package_data("paper_tables.json")


def paper_table(key: str) -> list[dict[str, Any]]:
    """One paper table as ``{column: value}`` dicts, e.g. ``paper_table("table_I_extractors")``."""
    tables = paper_tables()
    if key not in tables or key.startswith("_"):
        raise ValueError(f"no paper table {key!r}; valid: {[k for k in tables if not k.startswith('_')]}")
    return [dict(zip(tables[key]["columns"], row)) for row in tables[key]["rows"]]


# --- Claims and audit checks (verdicts from afs.evidence; reported, never asserted) -------------------------
def threshold_text(c: Mapping[str, Any]) -> str:
    """A claim's test as words: ``"> 0"``, ``"within ±2"``."""
    return f"within ±{c['threshold']:g}" if c.get("op") == "within" else f"{c.get('op')} {c.get('threshold'):g}"


def _from_source(claim: Mapping[str, Any], source: str | None) -> bool:
    """Whether ``claim["source"]`` starts with the word(s) ``source`` ("Table I" picks "Table I (III-A)", not
    "Table II ...")."""
    src = str(claim.get("source", ""))
    return source is None or (src.startswith(source) and (len(src) == len(source) or not src[len(source)].isalnum()))


def claims_table(summary: Mapping[str, Any], source: str | None = None, *, which: str = "claims") -> str:
    """The paper's claims (or with ``which="audit"`` the audit's checks) from ``source`` as a verdict table: the
    statistic on the paper's numbers, this run's estimate and 95% interval, the threshold, the verdict."""
    every = summary.get("claims", []) if which == "claims" else summary.get("audit", {}).get("checks", [])
    claims = [c for c in every if _from_source(c, source)]
    if not claims:
        return f"(no {which} from {source!r} in this summary)"
    num = lambda v: MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.2f}"  # noqa: E731
    rows = []
    for c in claims:
        ci, v = c.get("ci95"), c.get("verdict")
        ours = num(c.get("estimate")) if v != "not run" else f"not run ({c.get('reason', '')})"
        rows.append([f"{c.get('source')}: {c.get('claim')}", num(c.get("paper")), ours,
                     MISSING if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]", threshold_text(c),
                     v.upper() if v == "fails" else v])
    n = {c.get("subset"): c.get("n") for c in claims if c.get("n")}
    note = ("estimate and paper value are the claim's statistic (a difference in points, or a slope); "
            "95% CI: paired bootstrap over the same test images"
            + (" (" + ", ".join(f"{k}: {v} images" for k, v in n.items()) + ")" if n else ""))
    title = f"{'Paper claims' if which == 'claims' else 'Robustness audit'}{f' ({source})' if source else ''}"
    return format_table(["claim", "paper", "ours", "95% CI", "test", "verdict"], rows,
                        title=f"{title}: verdicts at this scale") + "\n" + note


def print_claims(summary: Mapping[str, Any], source: str | None = None, *, which: str = "claims") -> None:
    """Print `claims_table`; never raises on a verdict (a reduced-scale outcome is a finding, not a bug)."""
    print(claims_table(summary, source, which=which))


# --- The paper's tables next to a summary.json --------------------------------------------------------------
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
    """What a stacking mask selects, whatever its length (a small profile's 5 digits, the paper's 9): "ends",
    "ends+middle", "alternate", "all", else the mask itself."""
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


def comparison_rows(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Table IV's rows of a summary by the paper's method names ("PGD-AT" for the single 8/255 network)."""
    return {"PGD-AT" if r["method"].startswith("PGD-AT") else r["method"]: r
            for r in summary.get("comparison", {}).get("rows", [])}


def _acc(rec: Mapping[str, Any], cols: Sequence[str] = _ACC) -> list[Any]:
    return [rec.get(c) for c in cols]


def extractor_table(summary: Mapping[str, Any]) -> str:
    """Table I: clean / PGD-10 / PGD-20 of each budget's network, paper next to this run."""
    paper = {f"#{r['budget_255']} ({r['budget_255']}/255)": _acc(r) for r in paper_table("table_I_extractors")}
    run = {f"#{b} ({b}/255)": _acc(rec) for b, rec in sorted(summary["extractors"].items(), key=lambda kv: int(kv[0]))}
    return compare_table("Table I: single networks PGD-trained at each budget (accuracy %, eps 8/255)", _ACC,
                         paper, run, key="network")


def alpha_table(summary: Mapping[str, Any]) -> str:
    """Table II: the alpha sweep of the default stack (paper: networks #3..#8)."""
    paper = {f"alpha={r['alpha']:.1f}": _acc(r) for r in paper_table("table_II_alpha")}
    recs = sorted(stacks_tagged(summary, "alpha-sweep"), key=lambda s: s["alpha"])
    members = recs[0]["members"] if recs else summary["config"]["merger"]["stack"]
    return compare_table("Table II: merger trained at each alpha (accuracy %)", _ACC, paper,
                         {f"alpha={s['alpha']:.1f}": _acc(s) for s in recs}, key="alpha",
                         note=f"paper stack: networks #3..#8; this run's stack: budgets {members}/255, "
                              f"merger mode 'paired'")


def mask_table(summary: Mapping[str, Any]) -> str:
    """Table III: stacks chosen by binary masks, matched to the paper's rows by what the mask selects."""
    t3 = paper_tables()["table_III_stacks"]
    paper = {f"{role} ({m})": _acc(dict(zip(t3["columns"], row)))
             for role, m, row in zip(t3["roles"], t3["masks_9digit"], t3["rows"])}
    run: dict[str, Any] = {}
    masks: dict[str, tuple[str, Any]] = {}
    for s in stacks_tagged(summary, "mask:"):
        for mask in (t[len("mask:"):] for t in s["tags"] if t.startswith("mask:")):
            role = mask_role(mask)
            label = next((k for k in paper if k.startswith(f"{role} (")), f"{role} ({mask})")
            run[label], masks[label] = _acc(s), (mask, s["members"])
    note = "\n".join(f"this run's {lab.split(' (')[0]!r} = mask {m} over the candidates, budgets {b}/255"
                     for lab, (m, b) in masks.items())
    return compare_table("Table III: stacks chosen by masks, alpha = 0.5 (accuracy %)", _ACC, paper, run,
                         key="stack (paper mask)",
                         note="rows are matched by what the mask selects; the paper's first mask is printed "
                              "'10000001' (8 digits)\n" + note)


def comparison_table(summary: Mapping[str, Any]) -> str:
    """Table IV: PGD-AT (the single 8/255 network) and AFS with AutoAttack and the trade-off."""
    cols = ["clean", "pgd", "aa", "tradeoff"]
    paper = {r["method"]: _acc(r, cols) for r in paper_table("table_IV_cifar10")}
    run = {lab: _acc(r, cols) for lab, r in comparison_rows(summary).items()}
    return compare_table("Table IV: CIFAR-10 comparison (accuracy %; PGD = PGD-20; trade-off = mean(clean, AA))",
                         cols, paper, run, key="method",
                         note=f"this run: every column on the same {summary['comparison'].get('aa_images')} test "
                              f"images (the class-balanced AutoAttack subset), so the trade-off averages two numbers "
                              f"measured on the same images")


def ablation_table(summary: Mapping[str, Any]) -> str:
    """Table VI: accuracies of the ablation settings, and their cost relative to the baseline."""
    names = ["Baseline", "Rand. pert.", "Large model", "AFS"]
    paper, run = paper_table("table_VI_ablation"), summary["ablation"]
    acc = compare_table("Table VI: ablation (accuracy %)", ["clean", "pgd20"],
                        {n: _acc(r, ["clean", "pgd20"]) for n, r in zip(names, paper)},
                        {n: _acc(r, ["clean", "pgd20"]) for n, r in zip(names, run)}, key="setting")
    # Costs: the paper counts multiply-accumulates ("Flops (G)"); the run's macs_G is flop_counter / 2.
    p0, r0 = paper[0], run[0]
    cost_rows = [[n, p["params_M"], r["params_M"], p["params_M"] / p0["params_M"], r["params_M"] / r0["params_M"],
                  p["flops_G"], r["macs_G"], p["flops_G"] / p0["flops_G"], r["macs_G"] / r0["macs_G"]]
                 for n, p, r in zip(names, paper, run)]
    cost = format_table(["setting", "params M paper", "params M run", "× base paper", "× base run",
                         "GMAC paper", "GMAC run", "× base paper", "× base run"], cost_rows,
                        title="Table VI: cost per 1x3x32x32 image (GMAC = torch.utils.flop_counter FLOPs / 2, "
                              "the paper's 'Flops (G)')", digits=3)
    settings = "; ".join(f"{n} = {r['setting']}" for n, r in zip(names, run))
    return f"{acc}\nthis run: {settings}\n\n{cost}"


def bench_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Benchmark rows (`afs.report.bench_results`): device, suite, case, batch, median time, value, ratio, date."""
    out = []
    for r in rows:
        env, ratio = r.get("env") or {}, r.get("ratio")
        out.append([env.get("gpu") or f"CPU ({env.get('cpu_count', '?')} cores)", r.get("suite"), r.get("case"),
                    r.get("batch_size"), (r.get("time") or {}).get("median_ms"),
                    f"{fmt(r.get('value'), 3)} {r.get('unit', '')}".strip(),
                    None if ratio is None else f"x{ratio:.3g} vs {r.get('baseline')}", str(r.get("date", ""))[:10]])
    return format_table(["device", "suite", "case", "B", "median ms", "value", "ratio", "date"], out, digits=2)
