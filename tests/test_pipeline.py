"""`afs reproduce --profile smoke` end to end on real data, the summary schema, and the CLI surface."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from afs.cli import build_parser, main
from afs.summary import validate_summary


@pytest.fixture(scope="module")
def smoke_summary(real_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["reproduce", "--profile", "smoke", "--out", str(out), "--no-progress",
                 "--data-root", str(real_data_root)]) == 0
    return out, json.loads((out / "smoke" / "summary.json").read_text())


def test_reproduce_smoke_writes_a_valid_summary(smoke_summary):
    out, s = smoke_summary
    validate_summary(s)
    assert s["profile"] == "smoke" and s["dataset"]["name"] == "cifar10-jpeg"
    assert set(s["extractors"]) == {"0", "4", "8"}
    tags = {t for st in s["stacks"] for t in st["tags"]}
    assert {"default-paired", "default-split", "alpha-sweep", "mask:101"} <= tags
    # Every stage left its provenance behind.
    for d in (out / "smoke" / "extractors").iterdir():
        assert {"config.json", "manifest.json", "log.jsonl", "metrics.json", "best.pt"} <= {p.name for p in d.iterdir()}


def test_reproduce_again_reuses_everything(smoke_summary, real_data_root, monkeypatch):
    out, first = smoke_summary
    import afs.training

    def boom(*a, **k):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(afs.training.PGD, "__call__", boom)  # any training or evaluation attack would call it
    assert main(["reproduce", "--profile", "smoke", "--out", str(out), "--no-progress",
                 "--data-root", str(real_data_root)]) == 0
    again = json.loads((out / "smoke" / "summary.json").read_text())
    assert again["extractors"] == first["extractors"] and again["comparison"] == first["comparison"]
    # The first call computed every stage, so it knows the profile's whole cost; this one reused them all.
    assert first["timings"]["total_s"] == first["timings"]["total_this_call_s"] and not first["timings"]["reused"]
    assert again["timings"]["total_s"] is None and "extractors/eps8" in again["timings"]["reused"]


def test_summary_validation_names_the_problem(smoke_summary):
    _, s = smoke_summary
    broken = json.loads(json.dumps(s))
    del broken["extractors"]["8"]
    with pytest.raises(ValueError, match="extractors.8 missing"):
        validate_summary(broken)


def test_every_command_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public accessor
    assert {"reproduce", "train-extractor", "train-merger", "evaluate", "notebooks", "profiles"} <= set(commands)
    for name in commands:
        out = subprocess.run([sys.executable, "-m", "afs.cli", name, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: afs" in out.stdout, name


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AFS_DATA", raising=False)
    assert main(["reproduce", "--profile", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    code = main(["train-extractor", "--profile", "smoke", "--budget", "8", "--out", str(tmp_path),
                 "--data-root", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and "empty" in err and "Traceback" not in err


# --- evidence: intervals, verdicts, one subset per table, the audit ------------------------------------
def test_summary_carries_intervals_and_verdicts(smoke_summary):
    _, s = smoke_summary
    from afs.evidence import VERDICTS

    for rec in [*s["extractors"].values(), *s["stacks"], s["ensemble"], *s["comparison"]["rows"]]:
        for m, (lo, hi) in rec["ci95"].items():
            assert lo <= rec[m] + 1e-6 and rec[m] - 1e-6 <= hi, (rec.get("key"), m)
    ids = {c["id"] for c in s["claims"]}
    assert {"I-clean-falls", "IV-tradeoff", "4a-no-robustness-lost", "IIC-merger-beats-logit-mean"} <= ids
    for c in s["claims"]:
        assert c["verdict"] in (*VERDICTS, "not run"), c
    assert set(s["dataset"]["subset_sha"]) == {"test", "aa", "curve", "audit"}


def test_table_iv_rows_are_on_one_subset(smoke_summary):
    # Every column of a Table IV row, the trade-off's two terms included, on the AutoAttack images.
    _, s = smoke_summary
    from afs.evidence import unpack_bits

    aa = s["samples"]["aa"]
    assert aa["n"] == s["comparison"]["aa_images"] == s["dataset"]["aa"]
    for row in s["comparison"]["rows"]:
        flags = {m: unpack_bits(aa["rows"][row["key"]][m], aa["n"]) for m in ("clean", "pgd20", "aa")}
        assert row["clean"] == pytest.approx(100 * flags["clean"].mean())
        assert row["pgd"] == pytest.approx(100 * flags["pgd20"].mean())
        assert row["aa"] == pytest.approx(100 * flags["aa"].mean())
        assert row["tradeoff"] == pytest.approx((row["clean"] + row["aa"]) / 2)
        assert not (flags["aa"] & ~flags["clean"]).any()  # AutoAttack-robust implies clean-correct
        assert "clean_test" in row and "pgd_test" in row  # the full test subset, labelled, beside them


def test_audit_runs_every_check(smoke_summary):
    _, s = smoke_summary
    a = s["audit"]
    p = s["config"]["evaluation"]
    assert a["images"] == s["dataset"]["audit"] == s["samples"]["audit"]["n"]
    assert set(a["models"]) == {"stack", "member"}
    for rec in a["models"].values():
        assert {"clean", "pgd20", "strong", "cw20", *(f"eps{b}" for b in p["audit_budgets"])} <= set(rec)
    members = s["config"]["merger"]["stack"]
    assert set(a["transfer"]) == {f"#{b}" for b in members} | {"ensemble"}
    checks = {c["id"]: c for c in a["checks"]}
    assert {"audit-transfer", "audit-large-eps-stack", "audit-steps-member", "audit-margin-stack",
            "audit-autoattack-flags"} <= set(checks)
    assert all(c["verdict"] in ("holds", "fails", "inconclusive") for c in checks.values())
    assert a["attacks"]["strong"] == f"pgd{p['audit_steps']}x{p['audit_restarts']}"


def test_notebook_reports_failing_claims_and_still_runs_to_the_end(smoke_summary, real_data_root, monkeypatch, tmp_path):
    """A summary in which every paper claim fails: the quickstart notebook prints the verdicts and ends."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    from pathlib import Path

    import sys as _sys
    _sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import synthetic_summary

    out, s = smoke_summary
    failing = json.loads(json.dumps(s))
    bad = synthetic_summary("smoke", invert=True)
    failing["claims"] = [{**c, "verdict": "fails"} if c["verdict"] != "not run" else c for c in bad["claims"]]
    failing["audit"]["checks"] = [{**c, "verdict": "fails"} for c in bad["audit"]["checks"]]
    path = out / "smoke" / "summary.json"
    original = path.read_text()
    path.write_text(json.dumps(failing))
    try:
        monkeypatch.setenv("AFS_RUNS", str(out))
        monkeypatch.setenv("AFS_PROFILE", "smoke")
        monkeypatch.setenv("AFS_DATA", str(real_data_root))
        monkeypatch.setenv("AFS_FIGURES", str(tmp_path))
        book = Path(__file__).resolve().parents[1] / "notebooks" / "00_quickstart.ipynb"
        nb = nbformat.read(book, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(book.parent)}}).execute()
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "FAILS" in text  # the verdicts were printed, and no cell raised
    finally:
        path.write_text(original)


def test_validation_rejects_an_interval_that_misses_its_value(smoke_summary):
    _, s = smoke_summary
    broken = json.loads(json.dumps(s))
    rec = broken["extractors"]["8"]
    rec["ci95"]["clean"] = [rec["clean"] + 5, rec["clean"] + 10]
    with pytest.raises(ValueError, match="does not hold"):
        validate_summary(broken)
