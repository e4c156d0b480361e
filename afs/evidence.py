"""Evidence: 95% intervals for every accuracy, and the paper's claims as verdicts (holds / fails / inconclusive).

An accuracy measured on n test images is an estimate; one image of 64 is 1.6 points. This module turns the
per-sample correctness that every evaluation saves into

* a 95% interval for each accuracy (percentile bootstrap over images), and
* a verdict for each claim of the paper's registry (``afs/claims.json``): the claim's statistic (a
  difference between two rows, a trend across rows, the worst difference along a curve) is recomputed on
  every bootstrap resample of the images, **the same resample for every row** (a paired bootstrap: two
  models scored on the same images share their easy and hard images, so the interval of their difference
  is much narrower than two separate intervals suggest), and the verdict follows from where its 95%
  interval lies relative to the claim's threshold:

      op ">"       holds if lo > t,              fails if hi < t,               else inconclusive
      op "<"       holds if hi < t,              fails if lo > t,               else inconclusive
      op "within"  holds if -t < lo and hi < t,  fails if lo > t or hi < -t,    else inconclusive

The bootstrap is exact to compute in one matrix product: a resample is a vector of counts ``w`` (how often
each image was drawn, multinomial with n draws), and every row's resampled accuracy is ``w @ correct / n``.
All rows of one subset share one count matrix ``W`` (B x n), so the statistics of all claims are functions of
the resampled row means ``W @ C / n`` (B x rows). ``W`` is drawn from a fixed seed: a summary's intervals
are reproducible to the last digit.

Per-sample correctness travels inside ``summary.json`` (``samples``: bit-packed, base64; ~1.7 kB per row
of 10,000 images), so a verdict can be recomputed, or a new claim checked, from the committed file alone.
"""

from __future__ import annotations

import base64
import copy
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "N_BOOT",
    "pack_bits",
    "unpack_bits",
    "Bootstrap",
    "percentile_interval",
    "verdict",
    "claims_registry",
    "Rows",
    "attach_intervals",
    "evaluate_claims",
    "VERDICTS",
]

N_BOOT = 4000  # bootstrap resamples: the 2.5% / 97.5% percentiles move by < 0.1 point between seeds at n = 500
VERDICTS = ("holds", "fails", "inconclusive")
_CLAIMS_FILE = "claims.json"


# ----------------------------------------------------------------------------------------------------
# Per-sample correctness, packed for summary.json
# ----------------------------------------------------------------------------------------------------
def pack_bits(flags: Any) -> str:
    """A bool vector (tensor, array or list) as base64 of its packed bits (first sample = highest bit)."""
    a = np.asarray(flags.cpu() if hasattr(flags, "cpu") else flags, dtype=bool).ravel()
    return base64.b64encode(np.packbits(a).tobytes()).decode("ascii")


def unpack_bits(text: str, n: int) -> np.ndarray:
    """Inverse of `pack_bits`: a bool array of length ``n``."""
    raw = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8)
    if raw.size != (n + 7) // 8:
        raise ValueError(f"packed flags hold {raw.size * 8} bits, expected {n} (a row of another subset?)")
    return np.unpackbits(raw)[:n].astype(bool)


# ----------------------------------------------------------------------------------------------------
# The bootstrap
# ----------------------------------------------------------------------------------------------------
class Bootstrap:
    """``n_boot`` resamples with replacement of ``n`` images, shared by every row measured on those images.

    ``means(C)`` maps a (n,) or (n, k) 0/1 matrix to its resampled means in percent, (n_boot,) or
    (n_boot, k). The counts matrix is drawn once per (n, n_boot, seed) and reused (chunked over resamples
    for large n so memory stays under ~64 MB).
    """

    def __init__(self, n: int, n_boot: int = N_BOOT, seed: int = 0) -> None:
        if n < 1:
            raise ValueError(f"a bootstrap needs at least one image, got n={n}")
        self.n, self.n_boot, self.seed = int(n), int(n_boot), int(seed)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.n]))
        # (n_boot, n) counts: row b says how often each image is drawn in resample b (sums to n).
        chunk = max(1, min(self.n_boot, (8 << 20) // self.n))
        self._weights = [rng.multinomial(self.n, np.full(self.n, 1.0 / self.n), size=min(chunk, self.n_boot - s))
                         .astype(np.float32) for s in range(0, self.n_boot, chunk)]

    def means(self, correct: Any) -> np.ndarray:
        c = np.asarray(correct, dtype=np.float32)
        if c.shape[0] != self.n:
            raise ValueError(f"this bootstrap resamples {self.n} images, got a row of {c.shape[0]}: rows compared "
                             f"by a paired bootstrap must be measured on the same images")
        return np.concatenate([w @ c for w in self._weights], axis=0) * (100.0 / self.n)


def percentile_interval(boot: np.ndarray, level: float = 0.95) -> list[float]:
    """The (1 - level)/2 and (1 + level)/2 percentiles of bootstrap values: ``[lo, hi]``."""
    lo, hi = np.quantile(np.asarray(boot, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def verdict(interval: Sequence[float], op: str, threshold: float) -> str:
    """holds / fails / inconclusive of a claim ``estimate <op> threshold`` from its 95% interval."""
    lo, hi = float(interval[0]), float(interval[1])
    t = float(threshold)
    if op == ">":
        return "holds" if lo > t else "fails" if hi < t else "inconclusive"
    if op == "<":
        return "holds" if hi < t else "fails" if lo > t else "inconclusive"
    if op == "within":
        return "holds" if (-t < lo and hi < t) else "fails" if (lo > t or hi < -t) else "inconclusive"
    raise ValueError(f"unknown claim op {op!r}; valid: '>', '<', 'within'")


# ----------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, Any] | None = None


def claims_registry() -> dict[str, Any]:
    """``afs/claims.json``: the paper's claims as data (a fresh copy). See that file's ``_about``."""
    global _REGISTRY
    if _REGISTRY is None:
        from importlib import resources

        _REGISTRY = json.loads(resources.files("afs").joinpath(_CLAIMS_FILE).read_text(encoding="utf-8"))
        _check_registry(_REGISTRY)
    return copy.deepcopy(_REGISTRY)


_STATS = ("value", "difference", "slope", "min_difference")
_METRICS = ("clean", "pgd10", "pgd20", "aa", "tradeoff", "tradeoff_pgd20")


def _check_registry(reg: Mapping[str, Any]) -> None:
    ids = set()
    for c in [*reg.get("claims", []), *reg.get("audit", [])]:
        where = f"claims.json claim {c.get('id')!r}"
        for key in ("id", "source", "claim", "stat", "op", "threshold", "subset"):
            if key not in c:
                raise ValueError(f"{where}: missing {key!r}")
        if c["id"] in ids:
            raise ValueError(f"{where}: duplicate id")
        ids.add(c["id"])
        if c["stat"] not in _STATS:
            raise ValueError(f"{where}: stat must be one of {_STATS}, got {c['stat']!r}")
        if c["op"] not in (">", "<", "within"):
            raise ValueError(f"{where}: op must be '>', '<' or 'within', got {c['op']!r}")
        if c["subset"] != "audit" and c["stat"] != "min_difference" and c.get("metric") not in _METRICS:
            raise ValueError(f"{where}: metric must be one of {_METRICS}, got {c.get('metric')!r}")


# ----------------------------------------------------------------------------------------------------
# Rows: what a claim compares, resolved against a summary (ours) or the paper's tables
# ----------------------------------------------------------------------------------------------------
@dataclass
class Operand:
    """One row of a claim: a label, an x value (for trends), its point value and bootstrap values."""

    label: str
    x: float | None
    point: float
    boot: np.ndarray | None  # (n_boot,) or None for the paper


class Rows:
    """Resolves a claim's symbolic rows ("extractor:robust", "stacks:alpha", ...) in one summary.

    Per-sample rows live in ``summary["samples"][subset]["rows"][key][metric]`` (packed bits); the records
    that name them (``extractors.<b>.key``, ``stacks[i].key``, ...) say which key plays which role.
    """

    def __init__(self, summary: Mapping[str, Any], n_boot: int = N_BOOT, seed: int | None = None) -> None:
        self.s = summary
        self.n_boot = n_boot
        self.seed = int(summary.get("config", {}).get("seed", 0) if seed is None else seed)
        self._boot: dict[str, Bootstrap] = {}
        self._flags: dict[tuple[str, str, str], np.ndarray] = {}

    # --- per-sample access -------------------------------------------------------------------------
    def subset(self, subset: str) -> Mapping[str, Any]:
        samples = self.s.get("samples", {})
        if subset not in samples:
            raise KeyError(f"summary has no per-sample results for subset {subset!r} (has {sorted(samples)})")
        return samples[subset]

    def bootstrap(self, subset: str) -> Bootstrap:
        if subset not in self._boot:
            self._boot[subset] = Bootstrap(int(self.subset(subset)["n"]), self.n_boot, self.seed)
        return self._boot[subset]

    def flags(self, subset: str, key: str, metric: str) -> np.ndarray:
        """Per-sample correctness (float 0/1, or 0/0.5/1 for a trade-off) of row ``key`` under ``metric``."""
        k = (subset, key, metric)
        if k not in self._flags:
            sub = self.subset(subset)
            if metric in ("tradeoff", "tradeoff_pgd20"):
                other = "aa" if metric == "tradeoff" else "pgd20"
                # mean over images of (clean_i + adv_i)/2 = mean(clean, adv): Table IV's trade-off, per image.
                self._flags[k] = (self.flags(subset, key, "clean") + self.flags(subset, key, other)) / 2
            else:
                rows = sub["rows"]
                if key not in rows or metric not in rows[key]:
                    raise KeyError(f"summary samples[{subset!r}] have no {metric!r} for {key!r}")
                self._flags[k] = unpack_bits(rows[key][metric], int(sub["n"])).astype(np.float32)
        return self._flags[k]

    def operand(self, label: str, x: float | None, subset: str, key: str, metric: str) -> Operand:
        f = self.flags(subset, key, metric)
        return Operand(label, x, float(100.0 * f.mean()), self.bootstrap(subset).means(f))

    # --- roles -------------------------------------------------------------------------------------
    def robust_budget(self) -> int:
        budgets = [int(b) for b in self.s["extractors"]]
        return 8 if 8 in budgets else max(budgets)

    def _stack(self, pred: Callable[[Mapping[str, Any]], bool]) -> list[Mapping[str, Any]]:
        return [r for r in self.s.get("stacks", []) if pred(r)]

    def alpha_sweep(self) -> list[Mapping[str, Any]]:
        return sorted(self._stack(lambda r: "alpha-sweep" in r.get("tags", [])), key=lambda r: r["alpha"])

    def resolve(self, role: str, metric: str, subset: str) -> list[Operand]:
        """The operand rows of ``role`` under ``metric`` on ``subset`` (a list; one entry for a single row)."""
        s = self.s
        if role == "extractors":
            return [self.operand(f"#{b}", float(b), subset, r["key"], metric)
                    for b, r in sorted(s["extractors"].items(), key=lambda kv: int(kv[0]))]
        if role == "extractor:robust":
            b = self.robust_budget()
            return [self.operand(f"#{b} ({b}/255)", float(b), subset, s["extractors"][str(b)]["key"], metric)]
        if role.startswith("extractor:nearest-clean:"):
            target = self.resolve(role[len("extractor:nearest-clean:"):], "clean", subset)[0].point
            exts = [(abs(self.operand("", None, subset, r["key"], "clean").point - target), int(b), r)
                    for b, r in s["extractors"].items()]
            _, b, r = min(exts, key=lambda t: (t[0], t[1]))
            return [self.operand(f"#{b} ({b}/255), nearest in clean accuracy", float(b), subset, r["key"], metric)]
        if role == "stacks:alpha":
            return [self.operand(f"alpha={r['alpha']:g}", float(r["alpha"]), subset, r["key"], metric)
                    for r in self.alpha_sweep()]
        if role in ("stack:alpha-min", "stack:alpha-max"):
            sweep = self.alpha_sweep()
            if not sweep:
                raise KeyError("summary has no alpha-sweep stacks")
            r = sweep[0] if role.endswith("min") else sweep[-1]
            return [self.operand(f"AFS alpha={r['alpha']:g}", float(r["alpha"]), subset, r["key"], metric)]
        if role == "stack:default":
            mode = s["config"]["merger"]["mode"]
            r = self._stack(lambda r: f"default-{mode}" in r.get("tags", []))[0]
            return [self.operand("AFS", None, subset, r["key"], metric)]
        if role == "stacks:masks":
            recs = self._stack(lambda r: any(t.startswith("mask:") for t in r.get("tags", [])))
            return [self.operand(f"{len(r['members'])} nets {r['members']}", float(len(r["members"])), subset,
                                 r["key"], metric) for r in sorted(recs, key=lambda r: len(r["members"]))]
        if role == "ensemble":
            return [self.operand("mean-of-logits ensemble", None, subset, s["ensemble"]["key"], metric)]
        if role.startswith("ablation:"):
            which = {"ablation:baseline": 0, "ablation:random": 1, "ablation:large": 2, "ablation:afs": 3}[role]
            r = s["ablation"][which]
            return [self.operand(r["setting"], None, subset, r["key"], metric)]
        if role.startswith("audit:"):
            # The robustness audit (`afs.audit.run_audit`): rows keyed "stack", "member", "transfer:<source>".
            who = role[len("audit:"):]
            rows = self.subset("audit")["rows"]
            if who == "transfer":
                return [self.operand(f"transfer from {k[len('transfer:'):]}", None, subset, k, metric)
                        for k in rows if k.startswith("transfer:")]
            label = {"stack": "AFS", "member": f"#{self.robust_budget()} ({self.robust_budget()}/255)"}.get(who, who)
            return [self.operand(label, None, subset, who, metric)]
        if role.startswith("curve:"):
            who = role[len("curve:"):]
            key = s["curves"]["keys"][self._curve_label(who)]
            return [self.operand(f"{self._curve_label(who)} at {b}/255", float(b), subset, key, f"eps{b}")
                    for b in s["curves"]["budgets_255"]]
        raise KeyError(f"unknown claim row {role!r}")

    def _curve_label(self, who: str) -> str:
        if who == "AFS":
            return "AFS"
        if who == "robust":
            b = self.robust_budget()
            return f"#{b} ({b}/255)"
        return who


class PaperRows:
    """The same roles on the paper's own tables (``afs/paper_tables.json``): point values, no bootstrap."""

    def __init__(self) -> None:
        from afs.tables import paper_table

        self.t1 = {r["budget_255"]: r for r in paper_table("table_I_extractors")}
        self.t2 = sorted(paper_table("table_II_alpha"), key=lambda r: r["alpha"])
        self.t3 = paper_table("table_III_stacks")
        self.t4 = {r["method"]: r for r in paper_table("table_IV_cifar10")}
        self.t6 = paper_table("table_VI_ablation")

    @staticmethod
    def _val(r: Mapping[str, Any], metric: str) -> float | None:
        if metric == "tradeoff_pgd20":
            return (r["clean"] + r["pgd20"]) / 2 if "pgd20" in r else None
        if metric == "pgd20" and "pgd20" not in r and "pgd" in r:
            return r["pgd"]  # Table IV's "PGD" is PGD-20
        v = r.get(metric)
        return None if v is None else float(v)

    def resolve(self, role: str, metric: str, subset: str) -> list[Operand] | None:
        def op(label: str, x: float | None, r: Mapping[str, Any]) -> Operand | None:
            v = self._val(r, metric)
            return None if v is None else Operand(label, x, v, None)

        def many(items: Iterable[Operand | None]) -> list[Operand] | None:
            got = list(items)
            return None if any(o is None for o in got) else got  # type: ignore[return-value]

        if subset == "aa" and role in ("extractor:robust", "stack:default"):
            return many([op(role, None, self.t4["PGD-AT" if role == "extractor:robust" else "AFS"])])
        if role == "extractors":
            return many(op(f"#{b}", float(b), r) for b, r in sorted(self.t1.items()))
        if role == "extractor:robust":
            return many([op("#8", 8.0, self.t1[8])])
        if role == "extractor:nearest-clean:stack:alpha-max":
            target = self.t2[-1]["clean"]
            b = min(self.t1, key=lambda b: (abs(self.t1[b]["clean"] - target), b))
            return many([op(f"#{b}", float(b), self.t1[b])])
        if role == "stacks:alpha":
            return many(op(f"alpha={r['alpha']:g}", float(r["alpha"]), r) for r in self.t2)
        if role in ("stack:alpha-min", "stack:alpha-max"):
            return many([op(role, None, self.t2[0] if role.endswith("min") else self.t2[-1])])
        if role == "stack:default":
            return many([op("AFS", None, self.t6[3])])
        if role == "stacks:masks":
            return many(op(r["mask"], float(str(m).count("1")), r)
                        for r, m in zip(self.t3, paper_tables_masks()))
        if role.startswith("ablation:"):
            which = {"ablation:baseline": 0, "ablation:random": 1, "ablation:large": 2, "ablation:afs": 3}[role]
            return many([op(self.t6[which]["setting"], None, self.t6[which])])
        return None  # ensemble, curves: the paper gives no numbers


def paper_tables_masks() -> list[str]:
    from afs.tables import paper_tables

    return list(paper_tables()["table_III_stacks"]["masks_9digit"])


# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------
def _slope(xs: Sequence[float], ys: Sequence[Any]) -> Any:
    """Least-squares slope of ys against xs; ys may be scalars or (B,) arrays (one slope per resample)."""
    x = np.asarray(xs, dtype=np.float64)
    xc = x - x.mean()
    den = float((xc**2).sum())
    if den == 0:
        raise ValueError("a trend needs at least two distinct x values")
    y = np.stack([np.asarray(v, dtype=np.float64) for v in ys])  # (rows,) or (rows, B)
    return np.tensordot(xc, y - y.mean(axis=0), axes=(0, 0)) / den


def _statistic(stat: str, a: list[Operand], b: list[Operand] | None, use_boot: bool) -> Any:
    val = (lambda o: o.boot) if use_boot else (lambda o: o.point)
    if stat == "value":
        return val(a[0])
    if stat == "difference":
        assert b is not None
        return val(a[0]) - val(b[0])
    if stat == "slope":
        return _slope([o.x for o in a], [val(o) for o in a])  # type: ignore[misc]
    if stat == "min_difference":
        assert b is not None
        # The worst case, recomputed per resample: min over a's rows of (a_i - b), against b's single row
        # (e.g. transfer attacks from every source vs the white-box attack), or along a curve, min over
        # x > 0 of (a(x) - b(x)) (x = 0, the clean point, is not a robustness point).
        if len(b) == 1:
            diffs = [val(o) - val(b[0]) for o in a]
        else:
            bx = {o.x: o for o in b}
            diffs = [val(o) - val(bx[o.x]) for o in a if o.x in bx and o.x]
        return np.min(np.stack([np.asarray(d, dtype=np.float64) for d in diffs]), axis=0)
    raise ValueError(f"unknown statistic {stat!r}")


def _paper_value(claim: Mapping[str, Any], paper: PaperRows | None) -> float | None:
    if paper is None or claim["stat"] == "min_difference":
        return None
    try:
        a = paper.resolve(claim["a"], claim["metric"], claim["subset"])
        b = paper.resolve(claim["b"], claim["metric"], claim["subset"]) if "b" in claim else None
    except KeyError:
        return None
    if a is None or ("b" in claim and b is None):
        return None
    return float(_statistic(claim["stat"], a, b, use_boot=False))


def _describe(claim: Mapping[str, Any], a: list[Operand], b: list[Operand] | None) -> str:
    m = claim.get("metric", "accuracy")
    ma, mb = claim.get("metric_a", m), claim.get("metric_b", m)
    if ma != mb:
        return f"{a[0].label}: {ma} - {mb}"
    if claim["stat"] == "slope":
        return f"slope of {m} over {', '.join(o.label for o in a)}"
    if claim["stat"] == "value":
        return f"{m} of {a[0].label}"
    if claim["stat"] == "min_difference" and len(b or []) == 1:
        return f"min over {', '.join(o.label for o in a)} of {m} minus {b[0].label}"  # type: ignore[index]
    if claim["stat"] == "min_difference":
        return f"min over eps > 0 of {a[0].label.split(' at ')[0]} - {b[0].label.split(' at ')[0]}"  # type: ignore[index]
    return f"{m}: {a[0].label} - {b[0].label}"  # type: ignore[index]


def evaluate_claims(summary: Mapping[str, Any], registry: Mapping[str, Any] | None = None, *,
                    which: str = "claims", n_boot: int = N_BOOT, with_paper: bool = True) -> list[dict[str, Any]]:
    """Every claim of the registry's list ``which`` ("claims": the paper's; "audit": the robustness audit)
    evaluated on ``summary``: a list of records

    ``{"id", "source", "claim", "compares", "op", "threshold", "unit", "paper", "estimate", "ci95",
    "verdict", "subset", "n"}``. A claim whose rows the summary lacks (e.g. a profile without an alpha
    sweep) gets ``verdict: "not run"`` and says why in ``reason``; nothing raises on a scientific outcome.
    """
    reg = claims_registry() if registry is None else registry
    rows = Rows(summary, n_boot=n_boot)
    paper = PaperRows() if with_paper and which == "claims" else None
    out = []
    for c in reg[which]:
        rec: dict[str, Any] = {k: c.get(k) for k in ("id", "source", "claim", "op", "threshold", "unit", "subset")}
        metric = c.get("metric", "")
        try:
            a = rows.resolve(c["a"], c.get("metric_a", metric), c["subset"])
            b = rows.resolve(c["b"], c.get("metric_b", metric), c["subset"]) if "b" in c else None
            if c["stat"] == "slope" and len(a) < 2:
                raise KeyError(f"a trend needs at least two rows, {c['a']!r} has {len(a)}")
        except KeyError as e:
            rec.update(verdict="not run", reason=str(e).strip("'\""), paper=_paper_value(c, paper))
            out.append(rec)
            continue
        boot = _statistic(c["stat"], a, b, use_boot=True)
        ci = percentile_interval(boot)
        rec.update(
            compares=_describe(c, a, b),
            paper=_paper_value(c, paper),
            estimate=float(_statistic(c["stat"], a, b, use_boot=False)),
            ci95=ci,
            verdict=verdict(ci, c["op"], c["threshold"]),
            n=int(rows.subset(c["subset"])["n"]),
        )
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------
# ci95 on every accuracy of a summary
# ----------------------------------------------------------------------------------------------------
def _interval_of(rows: Rows, subset: str, key: str, metric: str) -> list[float]:
    return percentile_interval(rows.bootstrap(subset).means(rows.flags(subset, key, metric)))


def attach_intervals(summary: dict[str, Any], n_boot: int = N_BOOT) -> dict[str, Any]:
    """Add ``ci95: {metric: [lo, hi]}`` beside the accuracies of every record that names its per-sample
    ``key`` (extractors, stacks, ensemble, comparison, ablation) and ``ci95`` lists to the curves. In place;
    returns ``summary``."""
    rows = Rows(summary, n_boot=n_boot)

    def fill(rec: dict[str, Any], subset: str, metrics: Mapping[str, str]) -> None:
        ci = {}
        for name, metric in metrics.items():
            if name in rec and isinstance(rec[name], (int, float)) and not (isinstance(rec[name], float) and math.isnan(rec[name])):
                ci[name] = _interval_of(rows, subset, rec["key"], metric)
        rec["ci95"] = ci

    acc = {m: m for m in ("clean", "pgd10", "pgd20")}
    for rec in summary["extractors"].values():
        fill(rec, "test", acc)
    for rec in summary["stacks"]:
        fill(rec, "test", acc)
    fill(summary["ensemble"], "test", acc)
    for rec in summary["ablation"]:
        fill(rec, "test", {"clean": "clean", "pgd20": "pgd20"})
    for rec in summary["comparison"]["rows"]:
        fill(rec, "aa", {"clean": "clean", "pgd": "pgd20", "aa": "aa", "tradeoff": "tradeoff"})
        rec["ci95"].update({f"{m}_test": _interval_of(rows, "test", rec["key"], src)
                            for m, src in (("clean", "clean"), ("pgd", "pgd20")) if f"{m}_test" in rec})
    curves = summary["curves"]
    curves["ci95"] = {label: [_interval_of(rows, "curve", key, f"eps{b}") for b in curves["budgets_255"]]
                      for label, key in curves["keys"].items()}
    return summary
