"""How much the headline numbers of a profile move with the seed: two (or more) summary.json files of the
same profile, differing only in ``seed``, side by side.

    python scripts/seed_spread.py results/cpu/summary.json results/cpu-seed1/summary.json \
        --out results/cpu/seeds.json

For each headline number (the 8/255 network and the default stack on the test subset, Table IV's rows on
the AutoAttack subset, and the estimate of every paper claim) it prints the value per seed, the spread
(max - min) and the half-width of the first seed's 95% interval. The recipe is stable enough when the
spread is well inside the intervals: then a verdict reflects the method, not the draw of one seed.
Also writes the table as JSON (``--out``), with the summaries' git commits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def headline(s: dict[str, Any]) -> dict[str, tuple[float, list[float] | None]]:
    """name -> (value, its 95% interval or None) for the numbers README leads with."""
    out: dict[str, tuple[float, list[float] | None]] = {}
    b8 = "8" if "8" in s["extractors"] else max(s["extractors"], key=int)
    e8 = s["extractors"][b8]
    default = next(r for r in s["stacks"] if f"default-{s['config']['merger']['mode']}" in r["tags"])
    for who, rec in ((f"#{b8} net", e8), ("default stack", default)):
        for m in ("clean", "pgd20"):
            out[f"{who} {m} (test)"] = (rec[m], rec.get("ci95", {}).get(m))
    for row in s["comparison"]["rows"]:
        who = "AFS" if row["method"] == "AFS" else "PGD-AT"
        for m in ("clean", "aa", "tradeoff"):
            out[f"Table IV {who} {m} (AA subset)"] = (row[m], row.get("ci95", {}).get(m))
    for c in s.get("claims", []):
        if c.get("estimate") is not None:
            out[f"claim {c['id']}"] = (c["estimate"], c.get("ci95"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summaries", nargs="+", type=Path, help="summary.json files of one profile, one per seed")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    if len(args.summaries) < 2:
        ap.error("give at least two summaries (one per seed)")
    sums = []
    for path in args.summaries:
        try:
            sums.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            ap.error(f"cannot read {path}: {e}")
    names = {s["profile"] for s in sums}
    if len(names) != 1:
        ap.error(f"the summaries are of different profiles: {sorted(names)}")
    seeds = [s["config"]["seed"] for s in sums]
    if len(set(seeds)) != len(seeds):
        ap.error(f"the summaries share a seed: {seeds}")
    rest = [{k: v for k, v in s["config"].items() if k != "seed"} for s in sums]
    if any(r != rest[0] for r in rest):
        ap.error("the summaries differ in more than the seed (config.json apart from 'seed')")
    tables = [headline(s) for s in sums]
    rows = []
    for name in tables[0]:
        if not all(name in t for t in tables):
            continue
        values = [t[name][0] for t in tables]
        ci = tables[0][name][1]
        half = None if not ci else (ci[1] - ci[0]) / 2
        spread = max(values) - min(values)
        row = {"number": name, "values": values, "spread": spread, "ci95_half_width_seed0": half,
               "spread_over_half_width": None if not half else spread / half}
        if name.startswith("claim "):
            row["verdicts"] = [next(c["verdict"] for c in s["claims"] if c["id"] == name[6:]) for s in sums]
        rows.append(row)
    print(f"profile {sums[0]['profile']}, seeds {seeds}")
    print(f"{'number':46s} " + " ".join(f"{'seed ' + str(s):>9s}" for s in seeds) + "   spread  CI half-width")
    for r in rows:
        half = "" if r["ci95_half_width_seed0"] is None else f"{r['ci95_half_width_seed0']:.1f}"
        verdicts = "  " + " / ".join(r["verdicts"]) if "verdicts" in r else ""
        print(f"{r['number']:46s} " + " ".join(f"{v:9.2f}" for v in r["values"]) + f"  {r['spread']:7.2f}  {half:>6s}"
              + verdicts)
    if args.out is not None:
        payload = {"profile": sums[0]["profile"], "seeds": seeds,
                   "git_sha": [s["provenance"].get("git_sha") for s in sums],
                   "summaries": [str(p) for p in args.summaries], "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
