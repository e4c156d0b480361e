"""Rewrite the README's results and claims tables from the committed ``results/<profile>/summary.json``.

    .venv/bin/python scripts/update_readme.py [--readme README.md] [--results results]

Only the text between ``<!-- results:begin/end -->`` and ``<!-- claims:begin/end -->`` is replaced; the
markers stay. Missing or misordered markers are an error: the README is never rewritten blindly.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from afs.report import interval
from afs.tables import MISSING, comparison_rows, fmt, paper_table, threshold_text

README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"
CLAIMS_BEGIN, CLAIMS_END = "<!-- claims:begin -->", "<!-- claims:end -->"
# Order of the profiles in both tables; unknown names follow alphabetically.
PROFILE_ORDER = ("smoke", "cpu", "quick", "paper")


def _md_num(v: Any) -> str:
    """Numbers with two decimals (ints too), None/NaN as a dash."""
    return fmt(float(v), 2) if isinstance(v, (int, float)) and not isinstance(v, bool) else fmt(v)


def _md_ci(row: Mapping[str, Any], metric: str) -> str:
    """``27.60 (23.8–31.5)``: the value and its 95% interval, when the summary has one."""
    v, ci = row.get(metric), interval(row, metric)
    return _md_num(v) + ("" if ci is None else f" ({ci[0]:.1f}–{ci[1]:.1f})")


def _run_label(s: Mapping[str, Any]) -> str:
    """A summary's profile, and its seed when that is not the named profile's own."""
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


def load_summaries(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``<results_dir>/*/summary.json``, in `PROFILE_ORDER`."""
    root = Path(results_dir)
    out = []
    for path in sorted(root.glob("*/summary.json")) if root.is_dir() else []:
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    n = len(PROFILE_ORDER)
    return sorted(out, key=lambda s: (PROFILE_ORDER.index(s.get("profile")) if s.get("profile") in PROFILE_ORDER
                                      else n, str(s.get("profile", ""))))


def results_table(results_dir: str | Path = "results") -> str:
    """Table IV per profile, the paper's row last: PGD-AT 8/255 and the default AFS stack, clean / PGD-20 /
    AA and the trade-off mean(clean, AA), every column on the AutoAttack images, with 95% intervals."""
    summaries = load_summaries(results_dir)
    lines = ["| profile | data (Table IV images) | PGD-AT 8/255 clean | PGD-20 | AA | AFS clean | PGD-20 | AA | "
             "trade-off PGD-AT → AFS |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        rows = comparison_rows(s)
        one, afs = rows.get("PGD-AT", {}), rows.get("AFS", {})
        cells = [_md_ci(r, m) for r in (one, afs) for m in ("clean", "pgd", "aa")]
        lines.append(f"| {_run_label(s)} | {_data_cell(s)} | " + " | ".join(cells)
                     + f" | {_md_ci(one, 'tradeoff')} → {_md_ci(afs, 'tradeoff')} |")
    t4 = {r["method"]: r for r in paper_table("table_IV_cifar10")}
    p1, pa = t4["PGD-AT"], t4["AFS"]
    cells = [_md_num(r[m]) for r in (p1, pa) for m in ("clean", "pgd", "aa")]
    lines.append("| paper (Table IV) | CIFAR-10 (50,000 train, 10,000 test) | " + " | ".join(cells)
                 + f" | {_md_num(p1['tradeoff'])} → {_md_num(pa['tradeoff'])} |")
    if not summaries:
        lines.append(f"\n_No results yet: `{results_dir}/<profile>/summary.json` is written by `afs reproduce` and "
                     f"copied there when committed._")
    return "\n".join(lines)


def claims_table(results_dir: str | Path = "results") -> str:
    """One row per paper claim and audit check: its statistic on the paper's numbers, and for each summary
    with verdicts its estimate, 95% interval and verdict (bold unless inconclusive)."""
    summaries = [s for s in load_summaries(results_dir) if "claims" in s]
    if not summaries:
        return (f"_No verdicts yet: `{results_dir}/<profile>/summary.json` files with `claims` are written by "
                f"`afs reproduce`._")
    cols = " | ".join(f"{_run_label(s)}: estimate [95% CI] → verdict" for s in summaries)
    lines = [f"| source | claim | test | paper | {cols} |", "|---|---|---|---:|" + "---|" * len(summaries)]
    checks = lambda s: [*s["claims"], *s.get("audit", {}).get("checks", [])]  # noqa: E731
    for c in checks(summaries[0]):
        cells = []
        for s in summaries:
            match = next((d for d in checks(s) if d["id"] == c["id"]), None)
            if match is None or match.get("verdict") == "not run":
                cells.append("not run")
                continue
            (lo, hi), v = match["ci95"], match["verdict"]
            shown = v if v == "inconclusive" else f"**{v}**"
            cells.append(f"{match['estimate']:+.2f} [{lo:+.2f}, {hi:+.2f}] → {shown}")
        paper = c.get("paper")
        lines.append(f"| {c['source']} | {c['claim']} | {threshold_text(c)} | "
                     f"{MISSING if paper is None else f'{paper:+.2f}'} | " + " | ".join(cells) + " |")
    n = "; ".join(f"{_run_label(s)}: {s['dataset'].get('test')} test images, AA and Table IV on "
                  f"{s['dataset'].get('aa')}, audit on {s['dataset'].get('audit')}" for s in summaries)
    note = f"Images: {n}. Estimates are the claim's statistic in points (slopes: points per unit)."
    return "\n".join(lines) + "\n\n" + note


def _replace_block(text: str, begin: str, end: str, body: str, path: Path) -> str:
    b, e = text.count(begin), text.count(end)
    if b != 1 or e != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path} needs exactly one {begin!r} followed by one {end!r} (found {b} begin, {e} end)")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text, count=1)


def update_readme(readme_path: str | Path = "README.md", results_dir: str | Path = "results") -> bool:
    """Replace both marked blocks; True if the file changed."""
    path = Path(readme_path)
    if not path.is_file():
        raise FileNotFoundError(f"no README at {path.resolve()}")
    text = path.read_text(encoding="utf-8")
    new = _replace_block(text, README_BEGIN, README_END, results_table(results_dir), path)
    new = _replace_block(new, CLAIMS_BEGIN, CLAIMS_END, claims_table(results_dir), path)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/update_readme.py", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default="README.md", help="the README to rewrite (default README.md)")
    parser.add_argument("--results", default="results", help="folder holding <profile>/summary.json (default results)")
    args = parser.parse_args(argv)
    try:
        changed = update_readme(args.readme, args.results)
    except (ValueError, FileNotFoundError) as e:  # our own clear errors: no traceback
        print(f"update_readme: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
