"""A synthetic ``summary.json`` in the exact schema `Pipeline.reproduce` writes (version 2: per-sample rows,
intervals, verdicts, audit), built from chosen accuracies instead of trained networks.

Per-sample rows come from one shared image difficulty (row r is correct on the round(p_r * n) easiest
images), so rows are positively correlated as real models are, and every accuracy equals its target to 1/n.
Used by the report tests and by the notebook test that runs on a summary in which every claim fails.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from afs import evidence
from afs.config import get_profile
from afs.audit import aa_flag_check
from afs.pipeline import stack_name
from afs.summary import SUMMARY_VERSION


def flags_for(n: int, p: float, seed: int = 0) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    f = np.zeros(n, dtype=bool)
    f[order[: int(round(p / 100 * n))]] = True
    return f


def synthetic_summary(profile: str = "cpu", *, aa: bool = True, invert: bool = False, sizes: tuple[int, int, int, int] = (500, 64, 200, 200)) -> dict[str, Any]:
    """A valid summary for ``profile``. ``invert=True`` reverses every trend the paper claims (robustness
    falling with the budget, the stack worse than its members, ...), so that every claim fails or is
    inconclusive. ``aa=False`` leaves AutoAttack out of the comparison rows (as a profile without it)."""
    p = get_profile(profile)
    n_test, n_aa, n_curve, n_audit = sizes
    sign = -1.0 if invert else 1.0
    default = list(p.merger.stack)
    rows: dict[str, dict[str, dict[str, str]]] = {"test": {}, "aa": {}, "curve": {}, "audit": {}}

    def put(subset: str, key: str, n: int, accs: dict[str, float]) -> dict[str, float]:
        for metric, acc in accs.items():
            rows[subset].setdefault(key, {})[metric] = evidence.pack_bits(flags_for(n, acc))
        return {m: 100.0 * round(a / 100 * n) / n for m, a in accs.items()}

    def clip(v: float) -> float:
        return min(95.0, max(2.0, v))

    ext = {}
    for b in p.extractor.budgets:
        key = f"extractors/eps{b}"
        clean, pgd = (60 - 2 * b, 19 + 3 * b) if not invert else (40 + 2 * b, 40 - 3 * b)
        acc = put("test", key, n_test, {"clean": clip(clean), "pgd10": clip(pgd + 1), "pgd20": clip(pgd)})
        ext[str(b)] = {"key": key, **acc, "best_epoch": 1}
    robust = 8 if 8 in p.extractor.budgets else max(p.extractor.budgets)

    stacks = []

    def stack(members: list[int], alpha: float, mode: str, tags: list[str], with_aa: bool = False) -> None:
        key = f"stacks/{stack_name(members, alpha, mode)}"
        r = ext[str(robust)]
        gain = (2 - 4 * alpha + 0.5 * len(members)) if not invert else (-8 + 4 * alpha - 0.5 * len(members))
        acc = put("test", key, n_test, {"clean": clip(r["clean"] + sign * (5 + 5 * alpha + len(members))),
                                        "pgd10": clip(r["pgd10"] + gain), "pgd20": clip(r["pgd20"] + gain)})
        rec = {"name": key.split("/")[1], "key": key, "members": members, "alpha": alpha, "mode": mode, **acc,
               "importance_ratio": [1.0 / len(members)] * len(members), "tags": tags}
        if with_aa:
            on = put("aa", key, n_aa, {"clean": acc["clean"], "pgd20": acc["pgd20"], "aa": clip(acc["pgd20"] - 2)})
            rec.update(aa=on["aa"], aa_clean=on["clean"], aa_pgd20=on["pgd20"])
        stacks.append(rec)

    in_sweep = p.merger.alpha in p.experiments.alphas
    stack(default, p.merger.alpha, "paired", ["default-paired"] + (["alpha-sweep"] if in_sweep else []), True)
    if "split" in p.experiments.merger_modes:
        stack(default, p.merger.alpha, "split", ["default-split"], True)
    for a in p.experiments.alphas:
        if a != p.merger.alpha:
            stack(default, a, "paired", ["alpha-sweep"])
    for m in p.experiments.masks:
        members = list(p.stack_for_mask(m))
        if members != default:
            stack(members, p.merger.alpha, "paired", [f"mask:{m}"])
        else:
            next(s for s in stacks if s["key"].endswith(stack_name(default, p.merger.alpha, "paired")))["tags"].append(f"mask:{m}")

    ens_key = f"ensembles/{'-'.join(map(str, default))}"
    ensemble = {"members": default, "key": ens_key,
                **put("test", ens_key, n_test, {"clean": clip(ext[str(robust)]["clean"] + sign * 2), "pgd10": 20.0, "pgd20": 19.0})}

    st = stacks[0]
    e8 = ext[str(robust)]
    single_aa = put("aa", e8["key"], n_aa, {"clean": e8["clean"], "pgd20": e8["pgd20"], "aa": clip(e8["pgd20"] - 1)})
    comparison_rows = [
        {"method": f"PGD-AT ({robust}/255)", "key": e8["key"], "clean": single_aa["clean"], "pgd": single_aa["pgd20"],
         "aa": single_aa["aa"], "tradeoff": (single_aa["clean"] + single_aa["aa"]) / 2, "clean_test": e8["clean"], "pgd_test": e8["pgd20"]},
        {"method": "AFS", "key": st["key"], "clean": st["aa_clean"], "pgd": st["aa_pgd20"], "aa": st["aa"],
         "tradeoff": (st["aa_clean"] + st["aa"]) / 2, "clean_test": st["clean"], "pgd_test": st["pgd20"]},
    ]
    if not aa:
        for r in comparison_rows:
            r["aa"], r["tradeoff"] = float("nan"), float("nan")

    lo, hi = p.experiments.random_budget_range
    abl = []
    for setting, key, params, clean, pgd in (
        (f"Baseline ({robust}/255)", e8["key"], 0.078, e8["clean"], e8["pgd20"]),
        (f"Rand. pert. ({lo}-{hi}/255)", f"extractors/eps{lo}-{hi}", 0.078, clip(e8["clean"] + (4 if not invert else -3)),
         clip(e8["pgd20"] + (-4 if not invert else 8))),
        (f"Large model (WRN-10-{p.experiments.wide_widen_factor}, {robust}/255)", f"extractors/wide-eps{robust}", 0.304,
         clip(e8["clean"] + sign * 2), e8["pgd20"] - (0 if not invert else 5)),
        ("AFS", st["key"], 0.078 * len(default), st["clean"], st["pgd20"]),
    ):
        acc = put("test", key, n_test, {"clean": clean, "pgd20": pgd}) if key not in rows["test"] else {"clean": clean, "pgd20": pgd}
        abl.append({"setting": setting, "key": key, "params_M": params, "flops_G": 0.025 * params / 0.078,
                    "macs_G": 0.0125 * params / 0.078, **acc})

    budgets = list(p.evaluation.curve_budgets)
    curve_keys = {"AFS": st["key"], **{f"#{b} ({b}/255)": f"extractors/eps{b}" for b in default}}
    curves = {"budgets_255": budgets, "images": n_curve, "subset": "curve", "keys": curve_keys, "accuracy": {}}
    for label, key in curve_keys.items():
        if label == "AFS":
            accs = {f"eps{b}": clip(70.0 - 3 * b if not invert else 50.0 - 5 * b) for b in budgets}
        else:
            accs = {f"eps{b}": clip(60.0 - 3 * b) for b in budgets}
        got = put("curve", key, n_curve, accs)
        curves["accuracy"][label] = [got[f"eps{b}"] for b in budgets]

    ev = p.evaluation
    audit_models = {}
    for who, key, base in (("stack", st["key"], 30.0), ("member", e8["key"], 25.0)):
        accs = {"clean": base + 30, "pgd20": base, "strong": base - (0.2 if not invert else 10), "cw20": base - (0.3 if not invert else 10)}
        accs.update({f"eps{b}": max(0.0, base - b) if not invert else base for b in ev.audit_budgets})
        audit_models[who] = {"key": key, **put("audit", who, n_audit, accs)}
    transfer = {}
    for name in [f"#{b}" for b in default] + ["ensemble"]:
        transfer[name] = put("audit", f"transfer:{name}", n_audit, {"pgd20": 40.0 if not invert else 10.0})["pgd20"]
    audit = {"subset": "audit", "images": n_audit, "attacks": {"pgd20": "pgd20", "strong": f"pgd{ev.audit_steps}x{ev.audit_restarts}", "cw20": "cw20"},
             "eps_sweep_255": [8, *ev.audit_budgets], "models": audit_models, "transfer": transfer,
             "autoattack_flags": {"stack": ["AutoAttack: synthetic flag"] if invert else [], "member": []}}

    s: dict[str, Any] = {
        "version": SUMMARY_VERSION, "profile": profile, "config": p.to_dict(),
        "dataset": {"name": p.data.name, "train": 4000, "val": 400, "test": n_test, "aa": n_aa, "curve": n_curve,
                    "audit": n_audit, "classes": [str(i) for i in range(10)], "subset_sha": {}},
        "provenance": {"git_sha": None}, "extractors": ext, "stacks": stacks, "ensemble": ensemble,
        "comparison": {"aa_images": n_aa, "subset": "aa", "rows": comparison_rows}, "ablation": abl,
        "curves": curves, "audit": audit,
        "samples": {k: {"n": n, "rows": v} for (k, v), n in zip(rows.items(), (n_test, n_aa, n_curve, n_audit))},
        "timings": {},
    }
    evidence.attach_intervals(s, n_boot=500)
    s["claims"] = evidence.evaluate_claims(s, n_boot=500)
    from afs.pipeline import Pipeline

    s["audit"]["checks"] = evidence.evaluate_claims(s, which="audit", n_boot=500) + [aa_flag_check(s)]
    return s
