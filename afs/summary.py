"""What ``summary.json`` holds (written by `afs.pipeline.Pipeline.reproduce`; read by the notebooks, the README
tables and `afs.evidence`): its schema version and check, the per-sample rows, a merger's training curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from afs.evidence import pack_bits
from afs.io import read_json

if TYPE_CHECKING:
    from afs.pipeline import Pipeline

__all__ = ["SUMMARY_VERSION", "validate_summary", "collect_samples", "merger_training"]

SUMMARY_VERSION = 2


def collect_samples(pipe: Pipeline, summary: dict[str, Any]) -> dict[str, Any]:
    """Every row's per-sample correctness, bit-packed, by subset and stage key (`afs.evidence`): what
    the intervals and verdicts are computed from, and what lets anyone recompute them."""
    keys = {r["key"] for r in summary["extractors"].values()} | {r["key"] for r in summary["stacks"]}
    keys |= {summary["ensemble"]["key"]} | {r["key"] for r in summary["ablation"]}
    out: dict[str, Any] = {}

    def put(subset: str, key: str, flags: dict[str, torch.Tensor], rename: dict[str, str] | None = None) -> None:
        sub = out.setdefault(subset, {"n": len(pipe.data.subsets()[subset]), "rows": {}})
        row = sub["rows"].setdefault(key, {})
        for metric, f in flags.items():
            if f.numel() != sub["n"]:
                raise RuntimeError(f"{key}: {metric} has {f.numel()} samples on subset {subset!r}, "
                                   f"expected {sub['n']} (a stale cached evaluation?)")
            row[(rename or {}).get(metric, metric)] = pack_bits(f)

    for key in sorted(keys):
        put("test", key, pipe.samples(pipe.root / key, "test"))
    for r in summary["comparison"]["rows"]:
        put("aa", r["key"], pipe.samples(pipe.root / r["key"], "aa"))
    for key in summary["curves"]["keys"].values():
        put("curve", key, pipe.samples(pipe.root / key, "curve"))
    audit = summary["audit"]
    inverse = {name: role for role, name in audit["attacks"].items()}
    for who, rec in audit["models"].items():
        d = pipe.root / rec["key"]
        put("audit", who, {k: v for k, v in pipe.samples(d, "audit").items() if k in inverse or k == "clean"}, inverse)
        put("audit", who, pipe.samples(d, "audit_eps"))
    for name in audit["transfer"]:
        put("audit", f"transfer:{name}", pipe.samples(pipe.root / "audit" / "transfer", name.strip("#")))
    return out


def merger_training(d: Path) -> dict[str, Any]:
    """A merger's training curve from its run folder: the epoch kept, and per epoch the learning rate, the
    mean training loss (and its trace over tenths of the epoch) and the validation accuracies."""
    lines = (d / "log.jsonl").read_text().splitlines() if (d / "log.jsonl").is_file() else []
    keep = ("epoch", "lr", "train_loss", "train_loss_trace", "val_clean", "val_pgd")
    epochs = [{k: e[k] for k in keep if k in e} for e in map(json.loads, filter(None, lines))]
    return {"best_epoch": read_json(d / "metrics.json")["best_epoch"], "epochs": epochs}


_ACC = ("clean", "pgd10", "pgd20")


def validate_summary(summary: dict[str, Any]) -> None:
    """Raise ValueError naming the first missing or malformed field of a ``summary.json`` (schema in README)."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(f"summary.json: {what}")

    def pct(rec: dict[str, Any], keys: Any) -> bool:
        return all(isinstance(rec.get(k), (int, float)) and 0.0 <= rec[k] <= 100.0 for k in keys)

    need(summary.get("version") == SUMMARY_VERSION, f"version must be {SUMMARY_VERSION}")
    for key in ("profile", "config", "dataset", "provenance", "extractors", "stacks", "comparison", "ablation",
                "curves"):
        need(key in summary, f"missing '{key}'")
    need(isinstance(summary["provenance"].get("git_sha"), (str, type(None))), "provenance.git_sha")
    for b in summary["config"]["extractor"]["budgets"]:
        rec = summary["extractors"].get(str(b))
        need(rec is not None, f"extractors.{b} missing")
        need(pct(rec, _ACC), f"extractors.{b} needs clean/pgd10/pgd20 in percent")
    need(len(summary["stacks"]) > 0, "no stacks")
    for i, s in enumerate(summary["stacks"]):
        need(all(k in s for k in ("members", "alpha", "mode", "tags", "importance_ratio")), f"stacks[{i}] fields")
        need(pct(s, _ACC), f"stacks[{i}] needs clean/pgd10/pgd20 in percent")
        need(abs(sum(s["importance_ratio"]) - 1) < 1e-4, f"stacks[{i}].importance_ratio must sum to 1")
        need("aa" not in s or pct(s, ["aa"]), f"stacks[{i}].aa must be a percentage")
    defaults = [s for s in summary["stacks"] if any(t.startswith("default-") for t in s["tags"])]
    modes = summary["config"]["experiments"].get("merger_modes", ["paired", "split"])
    tags = sorted(t for s in defaults for t in s["tags"] if t.startswith("default-"))
    need(tags == sorted(f"default-{m}" for m in modes) and all("aa" in s for s in defaults),
         f"the default stack needs one record per merger mode {list(modes)}, each with AutoAttack")
    for row in summary["comparison"]["rows"]:
        need(pct(row, ("clean", "pgd", "aa", "tradeoff")), f"comparison row {row.get('method')}")
    need(len(summary["ablation"]) == 4, "ablation needs 4 rows (Table VI)")
    # Evidence (schema 2): intervals beside every accuracy, verdicts, the audit, the per-sample rows.
    for key in ("samples", "claims", "audit"):
        need(key in summary, f"missing '{key}'")
    named = [*(("extractors." + b, r) for b, r in summary["extractors"].items()),
             *((f"stacks[{i}]", r) for i, r in enumerate(summary["stacks"])),
             *((f"comparison {r.get('method')}", r) for r in summary["comparison"]["rows"])]
    for where, rec in named:
        need(isinstance(rec.get("ci95"), dict), f"{where}.ci95 missing")
        for m, (lo, hi) in rec["ci95"].items():
            # A percentile interval of a mean's bootstrap holds the mean itself (float32 slack).
            need(lo - 1e-4 <= rec[m] <= hi + 1e-4, f"{where}.ci95.{m} = [{lo}, {hi}] does not hold {rec[m]}")
    for c in [*summary["claims"], *summary["audit"].get("checks", [])]:
        need(c.get("verdict") in ("holds", "fails", "inconclusive", "not run"),
             f"claim {c.get('id')}: verdict {c.get('verdict')!r}")
        need(c["verdict"] == "not run" or len(c.get("ci95") or []) == 2, f"claim {c.get('id')}: ci95 missing")
