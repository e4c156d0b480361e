"""The terminal's stage lines and ETA (`afs.progress`): the arithmetic on fake stages with a fake clock, the
lines a run prints, the pre-check of a run directory, and the hooks staying silent when nothing listens."""

from __future__ import annotations

import io
import json

import pytest

from afs import progress
from afs.cost import Stage, Work
from afs.progress import StageProgress, completed_units, format_clock, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def plan() -> list[Stage]:
    # Predicted FLOPs: train a = 100 (2 items), eval a [test] = 50 (clean 10 + pgd20 40), train b = 200.
    return [
        Stage("extractor", "extractors/a", (Work("train", 1, 1, 80.0), Work("val", 1, 1, 20.0))),
        Stage("evaluation", "extractors/a [test]", (Work("clean", 1, 1, 10.0), Work("pgd20", 1, 1, 40.0))),
        Stage("extractor", "extractors/b", (Work("train", 1, 1, 200.0),)),
    ]


def make(done=()) -> tuple[StageProgress, Clock, io.StringIO]:
    clock, out = Clock(), io.StringIO()
    return StageProgress(plan(), done, stream=out, clock=clock), clock, out


def test_eta_is_remaining_predicted_cost_times_measured_rate() -> None:
    p, clock, out = make()
    assert p.total == 3 and p.remaining_flops() == 350
    assert p.eta() == "ETA unknown"  # nothing measured yet
    p.begin("train", "extractors/a")
    assert p.eta() == "ETA unknown"
    clock.t = 50.0
    p.end()  # 100 FLOPs in 50 s: 0.5 s per FLOP, 250 FLOPs left
    assert p.eta_seconds() == pytest.approx(125.0)
    p.begin("eval", "extractors/a [test]", ["clean", "pgd20"])
    clock.t = 60.0
    p.end()  # 150 FLOPs in 60 s: 0.4 s per FLOP, 200 left
    assert p.eta_seconds() == pytest.approx(80.0)
    assert p.eta() == "ETA ~80 s"


def test_finished_epochs_of_the_current_stage_count_as_done_work() -> None:
    p, clock, out = make()
    p.begin("train", "extractors/b")
    clock.t = 30.0
    p.epoch(1, 4)  # a quarter of 200 FLOPs in 30 s: 0.6 s/FLOP; left 350 - 50 = 300 FLOPs
    assert p.remaining_flops() == pytest.approx(300.0)
    assert p.eta_seconds() == pytest.approx(180.0)
    assert "epoch 1/4" in out.getvalue().splitlines()[-1]


def test_lines_number_the_stages_and_say_epoch_and_eta() -> None:
    p, clock, out = make()
    p.header()
    p.begin("train", "extractors/a")
    clock.t = 10.0
    p.epoch(1, 2, {"clean": 41.25, "pgd": 27.9})
    clock.t = 20.0
    p.end()
    p.begin("eval", "extractors/a [test]", ["clean", "pgd20"])
    clock.t = 250.0
    p.end()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[afs] 3 stages to run (0 done before), 3.5e-10 TFLOP predicted")
    assert lines[1] == "[afs 1/3] train extractors/a ..."
    assert lines[2] == ("[afs 1/3] train extractors/a · epoch 1/2 · val clean 41.2, pgd 27.9 · 10 s in stage · "
                        "elapsed 0:10 · ETA ~60 s")  # half of 100 FLOPs in 10 s, 300 left
    assert lines[3] == "[afs 1/3] train extractors/a done in 20 s · elapsed 0:20 · ETA ~50 s"
    assert lines[4] == "[afs 2/3] eval extractors/a [test] clean, pgd20 ..."
    assert lines[5] == "[afs 2/3] eval extractors/a [test] clean, pgd20 done in 3.8 min · elapsed 4:10 · ETA ~5.6 min"  # 150 in 250 s, 200 left
    assert "\r" not in out.getvalue()  # readable in a CI log


def test_complete_stages_are_neither_counted_nor_announced() -> None:
    p, clock, out = make(done={("extractors/a", "train"), ("extractors/a", "val")})
    assert (p.total, p.skipped) == (2, 1) and p.remaining_flops() == 250
    p.begin("train", "extractors/a")  # loaded from its run directory
    p.end()
    assert out.getvalue() == "" and p.spent_flops == 0
    p.begin("eval", "extractors/a [test]", ["pgd20"])
    assert out.getvalue().startswith("[afs 1/2] eval extractors/a [test] pgd20 ...")


def test_a_stage_outside_the_plan_or_recomputed_adds_to_the_count() -> None:
    p, clock, out = make(done={("extractors/a [test]", "clean"), ("extractors/a [test]", "pgd20")})
    assert p.total == 2
    p.begin("eval", "extractors/a [test]", ["clean"])  # its cache did not match after all
    assert p.total == 3
    p.end()
    p.begin("eval", "somewhere/new [test]", ["clean"])  # the cost model does not know it: no price
    clock.t = 5.0
    p.end()
    assert p.total == 4 and p.spent_flops == 10
    assert "[afs 2/4] eval somewhere/new [test] clean done in 5.0 s" in out.getvalue()


def test_hooks_are_silent_without_a_reporter(capsys: pytest.CaptureFixture[str]) -> None:
    progress.begin("train", "extractors/a")
    progress.epoch(1, 1)
    progress.end()
    assert capsys.readouterr().err == ""
    p, clock, out = make()
    with progress.reporting(p):
        progress.begin("train", "extractors/a")
        progress.end()
    progress.begin("train", "extractors/b")  # the block has ended
    text = out.getvalue()
    assert "[afs 1/3] train extractors/a done" in text and "extractors/b" not in text
    assert text.splitlines()[-1].startswith("[afs] 1 stage(s) run in")


def test_completed_units_reads_the_pipelines_cache_files(tmp_path) -> None:
    stages = [*plan(), Stage("audit", "extractors/a [audit]", (Work("cw20", 1, 1, 1.0), Work("pgd20 @ 16/255", 1, 1, 1.0))),
              Stage("curves", "extractors/a [curve]", (Work("clean @ 0/255", 1, 1, 1.0),)),
              Stage("audit", "audit/transfer/4 [audit]", (Work("pgd20 on #4", 1, 1, 1.0),))]
    a = tmp_path / "extractors" / "a"
    a.mkdir(parents=True)
    (a / "metrics.json").write_text("{}")
    (a / "eval_test.json").write_text(json.dumps({"accuracy": {"clean": 50.0}}))
    (a / "eval_audit_eps.json").write_text(json.dumps({"accuracy": {"eps16": 1.0}}))
    (a / "eval_curve.json").write_text(json.dumps({"accuracy": [1.0]}))
    (tmp_path / "audit" / "transfer").mkdir(parents=True)
    (tmp_path / "audit" / "transfer" / "eval_4.json").write_text("{}")
    assert completed_units(tmp_path, stages) == {
        ("extractors/a", "train"), ("extractors/a", "val"), ("extractors/a [test]", "clean"),
        ("extractors/a [audit]", "pgd20 @ 16/255"), ("extractors/a [curve]", "clean @ 0/255"),
        ("audit/transfer/4 [audit]", "pgd20 on #4")}


def test_the_audits_eps_items_match_the_cost_models_names() -> None:
    p = StageProgress([Stage("audit", "s [audit]", (Work("pgd20 @ 16/255", 1, 1, 8.0),))], stream=io.StringIO())
    p.begin("eval", "s [audit]", ["eps16"])
    assert p.current is not None and p.current.units == [("s [audit]", "pgd20 @ 16/255")]


def test_formats() -> None:
    assert [format_duration(s) for s in (0.42, 41, 190, 1500, 5000, 9000)] == \
        ["0.4 s", "41 s", "3.2 min", "25 min", "83 min", "2.5 h"]
    assert format_clock(250) == "4:10" and format_clock(3723) == "1:02:03"


def test_bars_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress.bars_enabled(Tty()) and not progress.bars_enabled(io.StringIO())


def test_the_plan_of_a_profile_covers_every_stage_a_smoke_run_announces(tmp_path) -> None:
    """`for_pipeline` over an empty run directory plans every stage; the names the pipeline announces are the
    cost model's (checked by the smoke run's 32/32 in the report, here only that the plan is complete)."""
    from afs.config import get_profile
    from afs.pipeline import Pipeline

    pipe = Pipeline(get_profile("smoke"), tmp_path, progress=False)
    r = progress.for_pipeline(pipe, stream=io.StringIO())
    names = set(r.stage_units)
    assert r.skipped == 0 and r.total == len(names)
    assert {"extractors/eps8", "stacks/4-8_a0.5_paired", "extractors/eps8 [aa]", "ensembles/4-8 [test]",
            "stacks/4-8_a0.5_paired [curve]", "audit/transfer/ensemble [audit]"} <= names
