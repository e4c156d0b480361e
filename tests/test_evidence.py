"""afs.evidence: bootstrap intervals against analytic ones, verdicts on each side of a threshold, the registry,
and claims evaluated on synthetic summaries whose per-sample rows are built to hold, fail or straddle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from afs import evidence
from afs.evidence import Bootstrap, evaluate_claims, pack_bits, percentile_interval, unpack_bits, verdict


def rows_with(n: int, accuracies: dict[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """Per-sample correctness with exactly round(p * n) correct images per row, correlated across rows the
    way real models are (an image's difficulty u_i is shared: row r is correct on the images with the
    smallest u, so a more accurate row is correct on a superset of a less accurate one's images)."""
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    for key, p in accuracies.items():
        flags = np.zeros(n, dtype=bool)
        flags[order[: int(round(p / 100 * n))]] = True
        out[key] = flags
    return out


def test_pack_bits_round_trips_odd_lengths():
    rng = np.random.default_rng(1)
    for n in (1, 7, 8, 9, 500, 10_001):
        a = rng.random(n) < 0.3
        assert np.array_equal(unpack_bits(pack_bits(a), n), a)
    with pytest.raises(ValueError, match="expected 17"):
        unpack_bits(pack_bits(np.ones(9, bool)), 17)  # 2 bytes cannot hold 17 flags


def test_bootstrap_interval_matches_the_normal_approximation():
    # n = 4000 images, 30% correct: the 95% interval is p +- 1.96 sqrt(p(1-p)/n) = 30 +- 1.42 points.
    n, p = 4000, 30.0
    flags = rows_with(n, {"a": p})["a"]
    lo, hi = percentile_interval(Bootstrap(n).means(flags))
    half = 1.96 * math.sqrt(0.3 * 0.7 / n) * 100
    assert lo == pytest.approx(p - half, abs=0.25) and hi == pytest.approx(p + half, abs=0.25)


def test_paired_difference_interval_matches_its_analytic_variance():
    # Two rows that disagree on 10% of the images (a right, b wrong on 7%; the reverse on 3%): the paired
    # difference has variance (p10 + p01 - (p10 - p01)^2) / n, far below that of two independent rows.
    n = 5000
    rng = np.random.default_rng(2)
    base = rng.random(n) < 0.5
    a, b = base.copy(), base.copy()
    idx = rng.permutation(n)
    a[idx[:350]], b[idx[:350]] = True, False  # p10 = 7%
    a[idx[350:500]], b[idx[350:500]] = False, True  # p01 = 3%
    boot = Bootstrap(n)
    diff = boot.means(a) - boot.means(b)
    lo, hi = percentile_interval(diff)
    est = 100 * (a.mean() - b.mean())
    sd = math.sqrt((0.07 + 0.03 - 0.04**2) / n) * 100
    assert est == pytest.approx(4.0)
    assert lo == pytest.approx(est - 1.96 * sd, abs=0.15) and hi == pytest.approx(est + 1.96 * sd, abs=0.15)
    # Pairing matters: the unpaired interval would be ~2.5x wider.
    assert hi - lo < 0.5 * 2 * 1.96 * math.sqrt(2 * 0.25 / n) * 100


def test_bootstrap_refuses_rows_of_other_images():
    with pytest.raises(ValueError, match="same images"):
        Bootstrap(10).means(np.ones(11))


@pytest.mark.parametrize("op, interval, expected", [
    (">", (0.5, 2.0), "holds"), (">", (-2.0, -0.5), "fails"), (">", (-0.5, 0.5), "inconclusive"),
    ("<", (-2.0, -0.5), "holds"), ("<", (0.5, 2.0), "fails"), ("<", (-0.5, 0.5), "inconclusive"),
    ("within", (-0.5, 0.5), "holds"), ("within", (1.5, 3.0), "fails"), ("within", (-3.0, -1.5), "fails"),
    ("within", (0.5, 1.5), "inconclusive"),
])
def test_verdict_from_the_interval(op, interval, expected):
    assert verdict(interval, op, 0.0 if op != "within" else 1.0) == expected


def test_verdict_threshold_is_not_zero_only():
    assert verdict((5.0, 7.0), ">", 6.0) == "inconclusive"  # "more than 6%": the interval must clear 6
    assert verdict((6.1, 7.0), ">", 6.0) == "holds"
    assert verdict((-1.4, 3.0), ">", -1.5) == "holds"  # "comparable": at most 1.5 points lower


def test_registry_is_complete_and_well_formed():
    reg = evidence.claims_registry()
    sources = {c["source"].split(" (")[0] for c in reg["claims"]}
    assert {"Table I", "Table II", "Table III", "Table IV", "Table VI", "Fig. 4a", "Section II-C"} <= sources
    assert all(c.get("quote") for c in reg["claims"] + reg["audit"])  # every claim cites the paper's words
    bad = {"claims": [{"id": "x", "source": "s", "claim": "c", "stat": "ratio", "op": ">", "threshold": 0, "subset": "test",
                       "metric": "clean"}]}
    with pytest.raises(ValueError, match="stat must be"):
        evidence._check_registry(bad)


# --- claims on synthetic summaries ---------------------------------------------------------------------
def tiny_summary(n: int, single: dict[str, float], stack: dict[str, float], subset: str = "aa") -> dict:
    """The smallest summary the Table IV claims resolve on: network #8 and the default stack."""
    flags = rows_with(n, {**{f"e8/{m}": v for m, v in single.items()}, **{f"st/{m}": v for m, v in stack.items()}})
    rows = {"extractors/eps8": {m: pack_bits(flags[f"e8/{m}"]) for m in single},
            "stacks/default": {m: pack_bits(flags[f"st/{m}"]) for m in stack}}
    return {"config": {"seed": 0, "merger": {"mode": "paired"}},
            "extractors": {"8": {"key": "extractors/eps8"}},
            "stacks": [{"key": "stacks/default", "tags": ["default-paired"], "alpha": 0.5, "members": [2, 8]}],
            "samples": {subset: {"n": n, "rows": rows}}}


def one_claim(claim_id: str) -> dict:
    reg = evidence.claims_registry()
    return {"claims": [c for c in reg["claims"] if c["id"] == claim_id]}


@pytest.mark.parametrize("stack_clean, n, expected", [(60.0, 1000, "holds"), (40.0, 1000, "fails"), (50.4, 250, "inconclusive")])
def test_claim_verdict_on_each_side_of_its_threshold(stack_clean, n, expected):
    s = tiny_summary(n, {"clean": 50.0}, {"clean": stack_clean})
    (rec,) = evaluate_claims(s, one_claim("IV-clean"))
    assert rec["verdict"] == expected
    assert rec["estimate"] == pytest.approx(stack_clean - 50.0, abs=100 / n)
    assert rec["ci95"][0] <= rec["estimate"] <= rec["ci95"][1]
    assert rec["paper"] == pytest.approx(91.01 - 85.15)  # the same statistic on the paper's Table IV
    assert rec["n"] == n and rec["subset"] == "aa"


def test_tradeoff_is_computed_per_image_on_one_subset():
    s = tiny_summary(400, {"clean": 50.0, "aa": 20.0}, {"clean": 60.0, "aa": 19.0})
    (rec,) = evaluate_claims(s, one_claim("IV-tradeoff"))
    assert rec["estimate"] == pytest.approx((60 + 19) / 2 - (50 + 20) / 2)
    assert rec["verdict"] == "holds"


def test_comparable_robustness_reads_as_at_most_one_and_a_half_points_lower():
    # AFS 1 point below PGD-AT on AA, with 4,000 images: comparable (holds); 4 points below: fails.
    holds = tiny_summary(4000, {"aa": 50.0}, {"aa": 49.0})
    fails = tiny_summary(4000, {"aa": 50.0}, {"aa": 46.0})
    assert evaluate_claims(holds, one_claim("IV-aa"))[0]["verdict"] == "holds"
    assert evaluate_claims(fails, one_claim("IV-aa"))[0]["verdict"] == "fails"


def test_trend_claims_use_the_slope_across_rows():
    n = 2000
    budgets = {0: (80.0, 0.0), 4: (70.0, 20.0), 8: (60.0, 30.0)}
    flags = rows_with(n, {f"{b}/{m}": v for b, (c, r) in budgets.items() for m, v in (("clean", c), ("pgd20", r))})
    s = {"config": {"seed": 0}, "samples": {"test": {"n": n, "rows": {
        f"extractors/eps{b}": {m: pack_bits(flags[f"{b}/{m}"]) for m in ("clean", "pgd20")} for b in budgets}}},
        "extractors": {str(b): {"key": f"extractors/eps{b}"} for b in budgets}}
    reg = evidence.claims_registry()
    recs = {r["id"]: r for r in evaluate_claims(s, {"claims": [c for c in reg["claims"] if c["source"].startswith("Table I ")]})}
    assert recs["I-clean-falls"]["estimate"] == pytest.approx(-2.5)  # 20 points over 8/255
    assert recs["I-clean-falls"]["verdict"] == "holds" and recs["I-robustness-grows"]["verdict"] == "holds"
    assert recs["I-clean-falls"]["paper"] < 0 and recs["I-robustness-grows"]["paper"] > 0


def test_a_claim_whose_rows_are_missing_is_not_run_not_an_error():
    s = tiny_summary(100, {"clean": 50.0}, {"clean": 60.0})
    (rec,) = evaluate_claims(s, one_claim("II-clean-rises-with-alpha"))
    assert rec["verdict"] == "not run" and "alpha" in rec["reason"]
