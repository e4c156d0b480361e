"""The grid on submitit (afs.grid): the smoke grid as separate local jobs, a killed job's stage resumed by
resubmitting it, a failed job reported by name. Real processes, real (offline) data."""

from __future__ import annotations

import json
import signal
import time

import pytest

from afs.cli import main
from afs.config import PROFILES
from afs.grid import GridJobError, stages, train_stage
from afs.summary import validate_summary

submitit = pytest.importorskip("submitit")


def _epochs(d):
    return [json.loads(line)["epoch"] for line in (d / "log.jsonl").read_text().splitlines()]


def test_the_smoke_grid_runs_as_local_jobs(real_data_root, tmp_path, capsys):
    assert main(["reproduce", "--profile", "smoke", "--executor", "local", "--out", str(tmp_path),
                 "--data-root", str(real_data_root), "--timeout-min", "20"]) == 0
    out = capsys.readouterr().out
    assert "extractors: 5 job(s)" in out and "mergers: 5 job(s)" in out
    root = tmp_path / "smoke"
    summary = json.loads((root / "summary.json").read_text())
    validate_summary(summary)
    extractors, mergers = stages(PROFILES["smoke"], str(tmp_path), str(real_data_root))
    # Every stage trained once, each by its own job (a process of its own, with its own log folder).
    for d in (root / "extractors").iterdir():
        assert _epochs(d) == list(range(PROFILES["smoke"].extractor.epochs))
    assert len(list((root / "stacks").iterdir())) == len(mergers)
    assert len([j for j in (root / "jobs").iterdir() if j.name.isdigit()]) == len(extractors) + len(mergers) + 1


def test_a_killed_job_resumes_its_stage_when_resubmitted(real_data_root, tmp_path):
    # Enough epochs that the cancel lands mid-stage: with 6, a fast machine finished the stage first.
    prof = PROFILES["smoke"].with_overrides(["extractor.epochs=20"])
    ex = submitit.AutoExecutor(folder=tmp_path / "jobs" / "%j", cluster="local")
    ex.update_parameters(timeout_min=10)
    stage = ("extractor", 4, None)
    # submitit's local cancel is a SIGINT. A test run started from a background shell has SIGINT ignored,
    # and an ignored signal stays ignored in every child: the job would never stop. With a handler set here
    # the children start with the default one (a handler is reset on exec, an ignore is not).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        job = ex.submit(train_stage, prof, str(tmp_path / "runs"), str(real_data_root), stage)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 300
    while True:  # kill it mid-stage: an epoch checkpointed, the stage not finished
        found = list((tmp_path / "runs").glob("*/extractors/eps4"))
        if found and (found[0] / "state.pt").exists() and not (found[0] / "metrics.json").exists():
            d = found[0]
            break
        assert time.time() < deadline and not job.done(), "never caught the job mid-stage"
        time.sleep(0.05)
    job.cancel()
    while not job.done():
        time.sleep(0.1)
    assert not (d / "metrics.json").exists()
    killed_at = len(_epochs(d))
    again = ex.submit(train_stage, prof, str(tmp_path / "runs"), str(real_data_root), stage)  # the same job again
    assert again.result() == "extractors/eps4"
    assert _epochs(d) == list(range(20)) and killed_at < 20  # resumed from state.pt: no epoch logged twice


def test_a_failed_job_is_named_with_its_log(real_data_root, tmp_path):
    from afs.grid import _wait

    ex = submitit.AutoExecutor(folder=tmp_path / "jobs" / "%j", cluster="local")
    ex.update_parameters(timeout_min=5)
    job = ex.submit(train_stage, PROFILES["smoke"], str(tmp_path), str(tmp_path / "no-data"), ("extractor", 4, None))
    with pytest.raises(GridJobError, match=rf"(?s)1 of 1 extractors job\(s\) failed.*job {job.job_id} .*cifar10-jpeg \(train split\) not found"):
        _wait([job], "extractors")


def test_a_multi_task_job_trains_its_extractor_data_parallel(real_data_root, tmp_path):
    # --gpus-per-job N: N tasks in one job join one process group (gloo here) and train as under torchrun.
    ex = submitit.AutoExecutor(folder=tmp_path / "jobs" / "%j", cluster="local")
    ex.update_parameters(timeout_min=5, tasks_per_node=2)
    job = ex.submit(train_stage, PROFILES["smoke"], str(tmp_path), str(real_data_root), ("extractor", 4, None))
    assert job.results() == ["extractors/eps4", "extractors/eps4"]
    log = [json.loads(line) for line in (tmp_path / "smoke" / "extractors" / "eps4" / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["world_size"], r["per_rank_batch"]) for r in log] == \
        [(e, 2, PROFILES["smoke"].extractor.batch_size // 2) for e in range(PROFILES["smoke"].extractor.epochs)]
