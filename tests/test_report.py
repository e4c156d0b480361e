"""afs.tables (the paper's tables as data, comparison and claims tables), afs.report (paths, header,
figures, intervals: what the notebooks call) and scripts/update_readme.py (the README's tables).

The summaries here are synthetic but follow the schema `Pipeline.reproduce` writes (checked against
`afs.summary.validate_summary` where that exists), so the table builders are exercised on real keys.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from afs import report, tables

ROOT = Path(__file__).resolve().parents[1]
PAPER_JSON = ROOT.parent / "shared" / "paper" / "tables.json"
_spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
update_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update_readme)


# --- a synthetic summary in the schema of Pipeline.reproduce (tests/synthetic.py) ------------------------
def fake_summary(profile: str = "cpu", aa: bool = True) -> dict:
    from synthetic import synthetic_summary

    return synthetic_summary(profile, aa=aa)


def test_fake_summary_follows_the_pipeline_schema():
    from afs.summary import validate_summary

    validate_summary(fake_summary())


# --- the paper's tables --------------------------------------------------------------------------------
def test_paper_tables_match_the_shared_transcription():
    if not PAPER_JSON.is_file():
        pytest.skip(f"{PAPER_JSON} not present")
    ref = json.loads(PAPER_JSON.read_text())
    ours = tables.paper_tables()
    for key, table in ref.items():
        if key.startswith("_"):
            continue
        assert ours[key]["columns"] == table["columns"], key
        assert ours[key]["rows"] == table["rows"], key


def test_paper_tables_internal_consistency():
    t = tables.paper_tables()
    # Table IV/V trade-off is mean(clean, AA), rounded to 2 decimals in the paper.
    for key in ("table_IV_cifar10", "table_V_cifar100"):
        for row in tables.paper_table(key):
            assert abs((row["clean"] + row["aa"]) / 2 - row["tradeoff"]) <= 0.006, row
    # Table IV's PGD column is PGD-20: PGD-AT equals Table I #8, AFS equals Table VI AFS.
    t1 = {r["budget_255"]: r for r in tables.paper_table("table_I_extractors")}
    t4 = {r["method"]: r for r in tables.paper_table("table_IV_cifar10")}
    assert t4["PGD-AT"]["pgd"] == t1[8]["pgd20"] and t4["PGD-AT"]["clean"] == t1[8]["clean"]
    assert t4["AFS"]["pgd"] == tables.paper_table("table_VI_ablation")[3]["pgd20"]
    # The printed 8-digit mask is kept; its 9-digit spelling selects #0 and #8.
    t3 = t["table_III_stacks"]
    assert t3["rows"][0][0] == "10000001" and t3["masks_9digit"][0] == "100000001"
    assert "8 digits" in t["_source"]
    assert [tables.mask_role(m) for m in t3["masks_9digit"]] == t3["roles"]


def test_paper_tables_returns_independent_copies():
    a = tables.paper_tables()
    a["table_I_extractors"]["rows"][0][1] = -1.0
    assert tables.paper_tables()["table_I_extractors"]["rows"][0][1] == 94.62
    with pytest.raises(ValueError, match="no paper table"):
        tables.paper_table("table_VII")


# --- plain-text tables ---------------------------------------------------------------------------------
def test_format_table_aligns_columns_and_formats_cells():
    text = tables.format_table(["name", "acc"], [["a", 1.0], ["longer", 12.345], ["none", None], ["nan", math.nan]])
    lines = text.splitlines()
    assert lines[0].startswith("name") and set(lines[1]) <= {"-", " "}
    assert lines[2].endswith("1.00") and lines[3].endswith("12.35")
    assert lines[4].endswith("—") and lines[5].endswith("—")
    # Right-aligned numbers end in the same column.
    assert len({len(ln) for ln in lines[2:4]}) == 1
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        tables.format_table(["a", "b"], [["x"]])


def test_compare_table_deltas_and_missing_rows():
    text = tables.compare_table("T", ["clean"], {"x": [90.0], "y": [80.0]}, {"x": [85.5], "z": [70.0]}, key="k")
    lines = {ln.split()[0]: ln for ln in text.splitlines()[3:]}
    assert lines["x"].split()[1:] == ["90.00", "85.50", "-4.50"]
    assert lines["y"].split()[1:] == ["80.00", "—", "—"]  # not in this run
    assert lines["z"].split()[1:] == ["—", "70.00", "—"]  # not in the paper
    assert text.splitlines()[0] == "T"
    with pytest.raises(ValueError, match="expected 2 values"):
        tables.compare_table("T", ["a", "b"], {"x": [1.0]}, {})


@pytest.mark.parametrize("mask,role", [("1001", "ends"), ("100000001", "ends"), ("1111", "all"), ("101", "ends"), ("1010101", "alternate"),
                                       ("100010001", "ends+middle"), ("101010101", "alternate"), ("0110", "0110")])
def test_mask_role(mask, role):
    assert tables.mask_role(mask) == role


def test_table_builders_on_a_summary():
    s = fake_summary("cpu")
    t1 = tables.extractor_table(s)
    c8 = s["extractors"]["8"]["clean"]
    assert "#8 (8/255)" in t1 and "85.15" in t1 and f"{c8:.2f}" in t1 and f"{c8 - 85.15:+.2f}" in t1
    t2 = tables.alpha_table(s)
    assert "alpha=0.5" in t2 and "alpha=0.2" in t2  # run-only row and paper-only row both shown
    t3 = tables.mask_table(s)
    assert "ends (100000001)" in t3 and "mask 10001" in t3 and "ends+middle (100010001)" in t3 and "mask 10101" in t3
    t4 = tables.comparison_table(s)
    assert "PGD-AT" in t4 and "AFS" in t4 and "64" in t4
    t6 = tables.ablation_table(s)
    assert "GMAC" in t6 and "6.000" in t6  # paper AFS/baseline params ratio 218.82/36.47
    assert tables.default_stack_record(s)["mode"] == "paired"
    assert len(tables.stacks_tagged(s, "alpha-sweep")) == len(s["config"]["experiments"]["alphas"])


# --- scripts/update_readme.py ------------------------------------------------------------------------------
def _write(results: Path, s: dict) -> None:
    (results / s["profile"]).mkdir(parents=True, exist_ok=True)
    (results / s["profile"] / "summary.json").write_text(json.dumps(s))


def test_readme_table_orders_profiles_and_handles_missing_aa(tmp_path):
    _write(tmp_path, fake_summary("cpu", aa=True))
    _write(tmp_path, fake_summary("smoke", aa=False))
    table = update_readme.results_table(tmp_path)
    rows = [ln for ln in table.splitlines() if ln.startswith("| `") or ln.startswith("| paper")]
    assert [r.split("|")[1].strip() for r in rows] == ["`smoke`", "`cpu`", "paper (Table IV)"]
    smoke_cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert smoke_cells[4] == "—" and smoke_cells[7] == "—"  # no AA
    cpu_cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    cpu = fake_summary("cpu")
    one, afs = cpu["comparison"]["rows"]
    # Every Table IV cell is the value on the AA images with its 95% interval.
    lo, hi = one["ci95"]["clean"]
    assert cpu_cells[2] == f"{one['clean']:.2f} ({lo:.1f}–{hi:.1f})"
    assert cpu_cells[5].startswith(f"{afs['clean']:.2f} (") and cpu_cells[7].startswith(f"{afs['aa']:.2f} (")
    assert cpu_cells[8].startswith(f"{one['tradeoff']:.2f} (") and f"→ {afs['tradeoff']:.2f} (" in cpu_cells[8]
    assert rows[2].split("|")[-2].strip() == "68.08 → 71.78"


def test_readme_table_without_results(tmp_path):
    table = update_readme.results_table(tmp_path / "nothing")
    assert "paper (Table IV)" in table and "No results yet" in table


def test_update_readme_replaces_between_markers_only(tmp_path):
    results = tmp_path / "results"
    _write(results, fake_summary("cpu"))
    readme = tmp_path / "README.md"
    readme.write_text(f"# afs\nintro\n{update_readme.README_BEGIN}\nold table\n{update_readme.README_END}\nmid\n"
                      f"{update_readme.CLAIMS_BEGIN}\nold claims\n{update_readme.CLAIMS_END}\ntail\n")
    assert update_readme.update_readme(readme, results) is True
    text = readme.read_text()
    assert text.startswith("# afs\nintro\n") and text.endswith(f"{update_readme.CLAIMS_END}\ntail\n")
    assert "old table" not in text and "old claims" not in text and "`cpu`" in text
    assert "Table IV (III-D)" in text and "holds" in text  # the claims table, one row per claim
    assert update_readme.update_readme(readme, results) is False  # idempotent
    assert readme.read_text() == text


def test_update_readme_needs_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# afs\nno markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        update_readme.update_readme(readme, tmp_path)
    readme.write_text(f"{update_readme.README_END}\n{update_readme.README_BEGIN}\n")
    with pytest.raises(ValueError):
        update_readme.update_readme(readme, tmp_path)
    with pytest.raises(FileNotFoundError):
        update_readme.update_readme(tmp_path / "missing.md", tmp_path)


# --- paths, header, figures ----------------------------------------------------------------------------
def test_runs_root_and_figures_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(report.RUNS_ENV, raising=False)
    monkeypatch.delenv(report.FIGURES_ENV, raising=False)
    root = report.repo_root()
    assert root is not None and (root / "afs" / "report.py").is_file()  # tests run from a checkout
    monkeypatch.chdir(tmp_path)  # the checkout is found from the package, not the working directory
    assert report.runs_root() == root / "runs"
    monkeypatch.setenv(report.RUNS_ENV, str(tmp_path / "r"))
    assert report.runs_root() == (tmp_path / "r").resolve()
    assert report.figures_dir() == (tmp_path / "r" / "figures").resolve()
    monkeypatch.setenv(report.FIGURES_ENV, str(tmp_path / "figs"))
    assert report.figures_dir() == (tmp_path / "figs").resolve() and (tmp_path / "figs").is_dir()


def test_header_names_profile_data_and_hardware(capsys):
    timer = report.header("smoke", "Table I")
    out = capsys.readouterr().out
    assert "Reproduces: Table I" in out and "smoke" in out and "cifar10-jpeg" in out and "JPEG" in out
    assert "torch" in out and "CPU cores" in out
    assert timer.elapsed >= 0
    timer.done()
    assert "wall time" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown profile"):
        report.header("nope", "x")


def test_savefig_writes_png(monkeypatch, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv(report.FIGURES_ENV, str(tmp_path))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = report.savefig(fig, "smoke_test_fig")
    plt.close(fig)
    assert path == tmp_path.resolve() / "smoke_test_fig.png" and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="plain file stem"):
        report.savefig(fig, "../escape")


def test_pipeline_uses_runs_root(monkeypatch, tmp_path):
    monkeypatch.setenv(report.RUNS_ENV, str(tmp_path))
    pipe = report.pipeline("smoke")
    assert pipe.root == tmp_path.resolve() / "smoke" and pipe.progress is False
    assert copy.deepcopy(pipe.profile) == pipe.profile


# --- claims, benchmark rows, cached summaries ----------------------------------------------------------
def test_invariants_are_asserted_claims_only_printed(capsys):
    with pytest.raises(AssertionError, match="two breaks"):
        report.check_invariants([("one holds", True), ("two breaks", False)])
    assert "[BROKEN] two breaks" in capsys.readouterr().out
    # A summary in which every claim goes against the paper prints its verdicts and raises nothing.
    from synthetic import synthetic_summary

    bad = synthetic_summary("cpu", invert=True)
    assert {c["verdict"] for c in bad["claims"]} <= {"fails", "inconclusive", "not run"}
    assert any(c["verdict"] == "fails" for c in bad["claims"])
    tables.print_claims(bad)
    tables.print_claims(bad, "Table IV")
    tables.print_claims(bad, which="audit")
    out = capsys.readouterr().out
    assert "FAILS" in out and "Table IV (III-D)" in out and "audit (a)" in out


def test_claims_table_names_interval_threshold_and_verdict():
    s = fake_summary("cpu")
    text = tables.claims_table(s, "Table IV")
    rec = next(c for c in s["claims"] if c["id"] == "IV-clean")
    assert f"[{rec['ci95'][0]:+.2f}, {rec['ci95'][1]:+.2f}]" in text and f"{rec['paper']:+.2f}" in text
    assert "> 0" in text and rec["verdict"] in text and "Table I " not in text
    assert "no claims" in tables.claims_table(s, "Table IX")


def test_bench_results_and_table(tmp_path):
    assert report.bench_results(tmp_path / "none") == []
    gpu = {"suite": "pgd", "case": "compiled", "baseline": "eager", "ratio": 3.5, "value": 1200.0, "unit": "img/s",
           "time": {"median_ms": 12.5}, "batch_size": 128, "date": "2026-01-02T00:00:00", "env": {"gpu": "NVIDIA H100"}}
    cpu = {**gpu, "case": "eager", "ratio": 1.0, "env": {"cpu_count": 2}}
    (tmp_path / "pgd.json").write_text(json.dumps([gpu]))
    (tmp_path / "stack.json").write_text(json.dumps([cpu]))
    rows = report.bench_results(tmp_path)
    assert [r["case"] for r in rows] == ["compiled", "eager"]
    table = tables.bench_table(rows)
    assert "NVIDIA H100" in table and "x3.5 vs eager" in table and "CPU (2 cores)" in table and "12.50" in table
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        report.bench_results(tmp_path)


class _StubPipe:
    """What `report.summary` needs of a Pipeline; `reproduce` records that it ran."""

    def __init__(self, root: Path, profile) -> None:
        self.root, self.profile, self.calls = root, profile, 0

    def reproduce(self) -> dict:
        self.calls += 1
        return {"fresh": True}


def test_summary_reuses_a_matching_file_else_reproduces(tmp_path):
    from afs.config import get_profile

    s = fake_summary("cpu")
    _write(tmp_path, s)
    pipe = _StubPipe(tmp_path / "cpu", get_profile("cpu"))
    assert report.summary(pipe)["profile"] == "cpu" and pipe.calls == 0
    other = _StubPipe(tmp_path / "cpu", get_profile("cpu").replace(seed=1))  # another config: stale file
    assert report.summary(other) == {"fresh": True} and other.calls == 1
    missing = _StubPipe(tmp_path / "smoke", get_profile("smoke"))
    assert report.summary(missing) == {"fresh": True}


def test_rel_path_inside_and_outside_the_checkout(tmp_path):
    root = report.repo_root()
    assert report.rel_path(root / "runs" / "cpu" / "summary.json") == str(Path("runs") / "cpu" / "summary.json")
    assert report.rel_path(tmp_path / "x.json") == str(tmp_path / "x.json")


def test_command_line_updates_and_names_a_missing_readme(tmp_path, capsys):
    results = tmp_path / "results"
    _write(results, fake_summary("cpu"))
    readme = tmp_path / "README.md"
    M = update_readme
    readme.write_text(f"x\n{M.README_BEGIN}\n{M.README_END}\n{M.CLAIMS_BEGIN}\n{M.CLAIMS_END}\n")
    assert M.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert "updated" in capsys.readouterr().out and "`cpu`" in readme.read_text()
    assert M.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert "already up to date" in capsys.readouterr().out
    assert M.main(["--readme", str(tmp_path / "nope.md"), "--results", str(results)]) == 2
    assert "no README" in capsys.readouterr().err


def test_every_name_the_notebooks_call_is_in_report():
    called = {m for nb in (ROOT / "notebooks").glob("*.ipynb") for m in re.findall(r"report\.([A-Za-z_]\w*)", nb.read_text())}
    assert called, "no notebook calls report.X"
    assert sorted(n for n in called if not hasattr(report, n)) == []


def test_notebook_runner_resolves_relative_paths_where_the_command_was_typed(monkeypatch, tmp_path):
    from afs.notebooks import absolute_path_vars

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AFS_DATA", "../shared/data")
    monkeypatch.delenv("AFS_RUNS", raising=False)
    absolute_path_vars()
    import os

    assert os.environ["AFS_DATA"] == str((tmp_path / ".." / "shared" / "data").resolve())
    assert "AFS_RUNS" not in os.environ
