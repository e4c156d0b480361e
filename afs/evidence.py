"""Evidence: a 95% interval for every accuracy, and the paper's claims as verdicts (holds / fails / inconclusive).

From the per-sample correctness every evaluation saves (``summary["samples"]``, bit-packed) come a 95%
interval for each accuracy (percentile bootstrap over images) and a verdict for each claim of
``afs/claims.json``: the claim's statistic (a difference of two rows, a trend across rows, the worst
difference along a curve) is recomputed on every resample, **the same resample for every row** (a paired
bootstrap: models scored on the same images share their easy and hard images, so the interval of a difference
is much narrower than two separate intervals suggest). With ``[lo, hi]`` that interval and ``t`` the threshold:

      op ">"       holds if lo > t,              fails if hi < t,               else inconclusive
      op "<"       holds if hi < t,              fails if lo > t,               else inconclusive
      op "within"  holds if -t < lo and hi < t,  fails if lo > t or hi < -t,    else inconclusive

A resample is a vector of counts ``w`` (multinomial, n draws over n images), so a row's resampled accuracy
is ``w @ correct / n``: one count matrix (B x n) per subset, from a fixed seed, serves every row.
"""

from __future__ import annotations

import base64
import copy
import functools
import math
from collections import namedtuple
from typing import Any, Mapping, Sequence

import numpy as np

from afs.io import derive_seed
from afs.tables import default_stack_record, package_data, paper_table, paper_tables, stacks_tagged

N_BOOT = 4000  # bootstrap resamples: the 2.5% / 97.5% percentiles move by < 0.1 point between seeds at n = 500
VERDICTS = ("holds", "fails", "inconclusive")
_ABLATION = {"ablation:baseline": 0, "ablation:random": 1, "ablation:large": 2, "ablation:afs": 3}  # Table VI rows


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


class Bootstrap:
    """``n_boot`` resamples with replacement of ``n`` images, shared by every row measured on those images:
    ``means(C)`` maps a (n,) or (n, k) 0/1 matrix to its resampled means in percent, (n_boot,) or (n_boot, k).
    The counts are drawn once, in chunks of resamples so memory stays under ~64 MB."""

    def __init__(self, n: int, n_boot: int = N_BOOT, seed: int = 0) -> None:
        if n < 1:
            raise ValueError(f"a bootstrap needs at least one image, got n={n}")
        self.n, self.n_boot, self.seed = int(n), int(n_boot), int(seed)
        rng = np.random.default_rng(derive_seed("bootstrap", self.seed, self.n))
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


def percentile_interval(boot: np.ndarray) -> list[float]:
    """The 2.5% and 97.5% percentiles of bootstrap values: ``[lo, hi]``, the 95% interval."""
    lo, hi = np.quantile(np.asarray(boot, dtype=np.float64), [(1 - 0.95) / 2, (1 + 0.95) / 2])
    return [float(lo), float(hi)]


def verdict(interval: Sequence[float], op: str, threshold: float) -> str:
    """holds / fails / inconclusive of a claim ``estimate <op> threshold`` from its 95% interval."""
    lo, hi, t = float(interval[0]), float(interval[1]), float(threshold)
    if op == ">":
        return "holds" if lo > t else "fails" if hi < t else "inconclusive"
    if op == "<":
        return "holds" if hi < t else "fails" if lo > t else "inconclusive"
    if op == "within":
        return "holds" if (-t < lo and hi < t) else "fails" if (lo > t or hi < -t) else "inconclusive"
    raise ValueError(f"unknown claim op {op!r}; valid: '>', '<', 'within'")


# --- The registry -------------------------------------------------------------------------------------------
_STATS = ("value", "difference", "slope", "min_difference")
_METRICS = ("clean", "pgd10", "pgd20", "aa", "tradeoff", "tradeoff_pgd20")


@functools.cache
def _registry() -> dict[str, Any]:
    reg = package_data("claims.json")
    _check_registry(reg)
    return reg


def claims_registry() -> dict[str, Any]:
    """``afs/claims.json``: the paper's claims as data (a fresh copy). See that file's ``_about``."""
    return copy.deepcopy(_registry())


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


# --- Rows: what a claim compares, resolved in a summary (ours) or the paper's tables ------------------------
# One row of a claim: its label, x (for trends), point value and bootstrap values ((n_boot,); None for the paper).
Operand = namedtuple("Operand", "label x point boot")


class Rows:
    """Resolves a claim's symbolic rows ("extractor:robust", "stacks:alpha", ...) in one summary: per-sample
    rows are ``summary["samples"][subset]["rows"][key][metric]``, the records' ``key`` says which plays which role."""

    def __init__(self, summary: Mapping[str, Any], n_boot: int = N_BOOT) -> None:
        self.s, self.n_boot = summary, n_boot
        self.seed = int(summary.get("config", {}).get("seed", 0))  # the profile's seed draws the resamples
        self._boot: dict[str, Bootstrap] = {}
        self._flags: dict[tuple[str, str, str], np.ndarray] = {}

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

    def interval(self, subset: str, key: str, metric: str) -> list[float]:
        """The 95% interval of row ``key``'s accuracy under ``metric``, from the subset's shared resamples."""
        return percentile_interval(self.bootstrap(subset).means(self.flags(subset, key, metric)))

    def operand(self, label: str, x: float | None, subset: str, key: str, metric: str) -> Operand:
        f = self.flags(subset, key, metric)
        return Operand(label, x, float(100.0 * f.mean()), self.bootstrap(subset).means(f))

    def robust_budget(self) -> int:
        budgets = [int(b) for b in self.s["extractors"]]
        return 8 if 8 in budgets else max(budgets)

    def _net_label(self, who: str) -> str:
        """"robust" as the most robust network's label (``#8 (8/255)``), any other name as itself."""
        b = self.robust_budget() if who == "robust" else None
        return who if b is None else f"#{b} ({b}/255)"

    def resolve(self, role: str, metric: str, subset: str) -> list[Operand]:
        """The operand rows of ``role`` under ``metric`` on ``subset`` (a list; one entry for a single row)."""
        s = self.s

        def op(label: str, x: float | None, key: str, m: str = metric) -> Operand:
            return self.operand(label, x, subset, key, m)

        if role == "extractors":
            nets = sorted(s["extractors"].items(), key=lambda kv: int(kv[0]))
            return [op(f"#{b}", float(b), r["key"]) for b, r in nets]
        if role == "extractor:robust":
            b = self.robust_budget()
            return [op(self._net_label("robust"), float(b), s["extractors"][str(b)]["key"])]
        if role.startswith("extractor:nearest-clean:"):
            target = self.resolve(role[len("extractor:nearest-clean:"):], "clean", subset)[0].point
            b, r = min(s["extractors"].items(),
                       key=lambda kv: (abs(op("", None, kv[1]["key"], "clean").point - target), int(kv[0])))
            return [op(f"#{b} ({b}/255), nearest in clean accuracy", float(b), r["key"])]
        if role.startswith("stack"):
            sweep = sorted(stacks_tagged(s, "alpha-sweep"), key=lambda r: r["alpha"])
            if role == "stacks:alpha":
                return [op(f"alpha={r['alpha']:g}", float(r["alpha"]), r["key"]) for r in sweep]
            if role in ("stack:alpha-min", "stack:alpha-max"):
                if not sweep:
                    raise KeyError("summary has no alpha-sweep stacks")
                r = sweep[0] if role.endswith("min") else sweep[-1]
                return [op(f"AFS alpha={r['alpha']:g}", float(r["alpha"]), r["key"])]
            if role == "stack:default":
                return [op("AFS", None, default_stack_record(s)["key"])]
            if role == "stacks:masks":
                recs = sorted(stacks_tagged(s, "mask:"), key=lambda r: len(r["members"]))
                return [op(f"{len(r['members'])} nets {r['members']}", float(len(r["members"])), r["key"])
                        for r in recs]
        if role == "ensemble":
            return [op("mean-of-logits ensemble", None, s["ensemble"]["key"])]
        if role in _ABLATION:
            r = s["ablation"][_ABLATION[role]]
            return [op(r["setting"], None, r["key"])]
        if role.startswith("audit:"):
            # The robustness audit (`afs.audit.run_audit`): rows keyed "stack", "member", "transfer:<source>".
            who = role[len("audit:"):]
            if who == "transfer":
                return [op(f"transfer from {k[len('transfer:'):]}", None, k)
                        for k in self.subset("audit")["rows"] if k.startswith("transfer:")]
            return [op("AFS" if who == "stack" else self._net_label("robust" if who == "member" else who), None, who)]
        if role.startswith("curve:"):
            label = self._net_label(role[len("curve:"):])
            key = s["curves"]["keys"][label]
            return [op(f"{label} at {b}/255", float(b), key, f"eps{b}") for b in s["curves"]["budgets_255"]]
        raise KeyError(f"unknown claim row {role!r}")


class PaperRows(Rows):
    """The same roles on the paper's own tables (``afs/paper_tables.json``), laid out as a summary whose
    operands are the tables' point values (no bootstrap); a value the paper lacks is a KeyError."""

    def __init__(self) -> None:
        self.records: dict[str, Mapping[str, Any]] = {}

        def rec(key: str, row: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
            self.records[key] = row
            return {"key": key, **fields}

        masks = paper_tables()["table_III_stacks"]["masks_9digit"]
        t6 = [rec(f"VI/{i}", r, setting=r["setting"]) for i, r in enumerate(paper_table("table_VI_ablation"))]
        for r in paper_table("table_IV_cifar10"):
            rec(f"IV/{r['method']}", r)
        super().__init__({
            "config": {"merger": {"mode": "paired"}},
            "extractors": {str(r["budget_255"]): rec(f"I/{r['budget_255']}", r)
                           for r in paper_table("table_I_extractors")},
            "stacks": [rec(f"II/{r['alpha']}", r, alpha=r["alpha"], tags=["alpha-sweep"])
                       for r in paper_table("table_II_alpha")]
            + [rec(f"III/{m}", r, members=[i for i, c in enumerate(m) if c == "1"], tags=[f"mask:{m}"])
               for r, m in zip(paper_table("table_III_stacks"), masks)]
            + [{"key": t6[3]["key"], "tags": ["default-paired"]}],  # Table VI's AFS row
            "ablation": t6})

    def operand(self, label: str, x: float | None, subset: str, key: str, metric: str) -> Operand:
        r = self.records[key]
        if metric == "tradeoff_pgd20":
            v = (r["clean"] + r["pgd20"]) / 2 if "pgd20" in r else None
        elif metric == "pgd20" and "pgd20" not in r and "pgd" in r:
            v = r["pgd"]  # Table IV's "PGD" is PGD-20
        else:
            v = None if r.get(metric) is None else float(r[metric])
        if v is None:
            raise KeyError(f"the paper has no {metric!r} for {key}")
        return Operand(label, x, v, None)

    def value(self, claim: Mapping[str, Any]) -> float | None:
        """The claim's statistic on the paper's numbers; None where the paper has none (the ensemble, the curves).
        On the AutoAttack subset, Table IV's rows stand in for #8 and AFS."""
        if claim["stat"] == "min_difference":
            return None
        metric, subset = claim.get("metric", ""), claim["subset"]

        def rows(role: str) -> list[Operand]:
            if subset == "aa" and role in ("extractor:robust", "stack:default"):
                return [self.operand("", None, subset, "IV/PGD-AT" if role == "extractor:robust" else "IV/AFS", metric)]
            return self.resolve(role, metric, subset)

        try:
            a, b = rows(claim["a"]), rows(claim["b"]) if "b" in claim else None
        except KeyError:
            return None
        return float(_statistic(claim["stat"], a, b, use_boot=False))


# --- Statistics ---------------------------------------------------------------------------------------------
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


def _describe(claim: Mapping[str, Any], a: list[Operand], b: list[Operand] | None) -> str:
    m = claim.get("metric", "accuracy")
    ma, mb = claim.get("metric_a", m), claim.get("metric_b", m)
    if ma != mb:
        return f"{a[0].label}: {ma} - {mb}"
    if claim["stat"] == "slope":
        return f"slope of {m} over {', '.join(o.label for o in a)}"
    if claim["stat"] == "value":
        return f"{m} of {a[0].label}"
    assert b is not None
    if claim["stat"] == "min_difference" and len(b) == 1:
        return f"min over {', '.join(o.label for o in a)} of {m} minus {b[0].label}"
    if claim["stat"] == "min_difference":
        return f"min over eps > 0 of {a[0].label.split(' at ')[0]} - {b[0].label.split(' at ')[0]}"
    return f"{m}: {a[0].label} - {b[0].label}"


def evaluate_claims(summary: Mapping[str, Any], registry: Mapping[str, Any] | None = None, *,
                    which: str = "claims", n_boot: int = N_BOOT) -> list[dict[str, Any]]:
    """The registry's claims ``which`` ("claims": the paper's; "audit": the robustness audit's) on ``summary``:
    records ``{"id", "source", "claim", "compares", "op", "threshold", "unit", "paper", "estimate", "ci95",
    "verdict", "subset", "n"}``. A claim whose rows the summary lacks gets ``verdict: "not run"`` and its
    ``reason``; nothing raises on a scientific outcome."""
    reg = claims_registry() if registry is None else registry
    rows = Rows(summary, n_boot=n_boot)
    paper_value = PaperRows().value if which == "claims" else (lambda c: None)  # the audit has no paper values
    out = []
    for c in reg[which]:
        rec: dict[str, Any] = {k: c.get(k) for k in ("id", "source", "claim", "op", "threshold", "unit", "subset")}
        out.append(rec)
        metric = c.get("metric", "")
        try:
            a = rows.resolve(c["a"], c.get("metric_a", metric), c["subset"])
            b = rows.resolve(c["b"], c.get("metric_b", metric), c["subset"]) if "b" in c else None
            if c["stat"] == "slope" and len(a) < 2:
                raise KeyError(f"a trend needs at least two rows, {c['a']!r} has {len(a)}")
        except KeyError as e:
            rec.update(verdict="not run", reason=str(e).strip("'\""), paper=paper_value(c))
            continue
        ci = percentile_interval(_statistic(c["stat"], a, b, use_boot=True))
        rec.update(compares=_describe(c, a, b), paper=paper_value(c),
                   estimate=float(_statistic(c["stat"], a, b, use_boot=False)), ci95=ci,
                   verdict=verdict(ci, c["op"], c["threshold"]), n=int(rows.subset(c["subset"])["n"]))
    return out


def attach_intervals(summary: dict[str, Any], n_boot: int = N_BOOT) -> dict[str, Any]:
    """In place, add ``ci95: {metric: [lo, hi]}`` beside the accuracies of every record with a per-sample
    ``key`` (extractors, stacks, ensemble, comparison, ablation), and ``ci95`` lists to the curves."""
    rows = Rows(summary, n_boot=n_boot)

    def fill(rec: dict[str, Any], subset: str, metrics: Mapping[str, str]) -> None:
        # Only measured accuracies: a row without AutoAttack has aa None (or NaN).
        rec["ci95"] = {name: rows.interval(subset, rec["key"], metric) for name, metric in metrics.items()
                       if isinstance(rec.get(name), (int, float)) and not math.isnan(rec[name])}

    acc = {m: m for m in ("clean", "pgd10", "pgd20")}
    for rec in [*summary["extractors"].values(), *summary["stacks"], summary["ensemble"]]:
        fill(rec, "test", acc)
    for rec in summary["ablation"]:
        fill(rec, "test", {"clean": "clean", "pgd20": "pgd20"})
    for rec in summary["comparison"]["rows"]:
        fill(rec, "aa", {"clean": "clean", "pgd": "pgd20", "aa": "aa", "tradeoff": "tradeoff"})
        rec["ci95"].update({f"{m}_test": rows.interval("test", rec["key"], src)
                            for m, src in (("clean", "clean"), ("pgd", "pgd20")) if f"{m}_test" in rec})
    curves = summary["curves"]
    curves["ci95"] = {label: [rows.interval("curve", key, f"eps{b}") for b in curves["budgets_255"]]
                      for label, key in curves["keys"].items()}
    return summary
