"""The benchmark harness and a CPU dry run of every suite (tiny WRN-10-1, batch 4, 8x8 images).

No timing is asserted (timings never decide a test): what is checked is that every suite runs end to end
and writes rows carrying the fields the issue requires -- a baseline measured in the same run and the
ratio to it, the environment (versions, date, device), shapes and dtype -- atomically, and hostname-free.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import SUITES, BenchConfig, Recorder, append_rows, measure
from benchmarks.harness import config_dict

REPO = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The smallest configuration that still runs every code path: WRN-10-1 on 8x8 images (2x2 final maps).
DRY = BenchConfig(
    device="cpu", batch_sizes=(4,), model="wrn-10-1", image_size=8, steps=1, members=2, warmup=0, reps=1,
    compile_backend="eager", bandwidth_batch=0, epoch_images=8, epoch_batch_size=4, epoch_baseline_batches=1,
)
ROW_FIELDS = {"suite", "case", "baseline", "ratio", "ratio_meaning", "metric", "value", "unit", "time", "compile_s",
              "batch_size", "model", "dtype", "shapes", "extra", "run_id", "date", "config", "env"}
ENV_FIELDS = {"date", "torch", "triton", "python", "device_type", "git_sha"}
# Cases each suite must produce on the CPU (CUDA-only ones -- CUDA graphs, streams -- are skipped there;
# the fused kernels run only under the Triton interpreter).
EXPECTED = {
    "pgd": {"authors_eager_fp32", "ours_eager_fp32", "compiled_bf16_channels_last"},
    "stack": {"loop", "vmap_batched"},
    "pgd_step": {"copy", "eager_torch_Linf", "eager_torch_L2"}
    | ({"fused_triton_Linf", "fused_triton_L2"} if INTERPRET else set()),
    "at_epoch": {"authors_eager_fp32", "compiled_bf16_channels_last"},
    "merger_head": {f"{c}_{m}" for c in ("unfused_eager", "unfused_compiled") + (("fused_triton",) if INTERPRET else ())
                    for m in ("forward", "forward_backward")},
}
CUDA_ONLY = {"compiled_bf16_channels_last_cudagraphs", "cuda_streams"}


@pytest.fixture()
def one_thread():
    """Tiny shapes gain nothing from threads, and a loaded 2-core machine makes 2 threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(before)


def _check_rows(rows: list[dict], suite: str) -> None:
    assert rows, f"{suite} wrote no rows"
    cases = {(r["run_id"], r["batch_size"], r["case"]) for r in rows}
    for r in rows:
        assert ROW_FIELDS <= r.keys(), f"{suite} row lacks {ROW_FIELDS - r.keys()}"
        assert r["suite"] == suite
        assert ENV_FIELDS <= r["env"].keys(), f"env lacks {ENV_FIELDS - r['env'].keys()}"
        assert r["env"]["device_type"] == "cpu" and r["env"]["torch"] == torch.__version__
        # The baseline is a case of the same run and batch size, and the ratio is a finite positive number.
        assert (r["run_id"], r["batch_size"], r["baseline"]) in cases, f"{r['case']}: baseline {r['baseline']} not measured"
        assert isinstance(r["ratio"], float) and math.isfinite(r["ratio"]) and r["ratio"] > 0
        if r["baseline"] == r["case"]:
            assert r["ratio"] == 1.0
        assert isinstance(r["value"], float) and r["value"] > 0 and r["unit"]
        assert r["time"]["reps"] >= 1 and r["time"]["clock"] == "perf_counter" and r["time"]["median_ms"] > 0
        assert r["dtype"] and r["shapes"]
        assert r["config"]["model"] == "wrn-10-1"


@pytest.mark.parametrize("suite", list(SUITES))
def test_suite_dry_run_writes_complete_rows(suite, tmp_path, one_thread):
    cfg = replace(DRY, results_dir=str(tmp_path))
    rec = Recorder(suite, tmp_path, torch.device("cpu"), config_dict(cfg))
    SUITES[suite](cfg, rec)
    path = tmp_path / f"{suite}.json"
    rows = json.loads(path.read_text())
    assert rows == json.loads(json.dumps(rec.rows))  # what was written is what was recorded
    _check_rows(rows, suite)
    cases = {r["case"] for r in rows}
    assert EXPECTED[suite] <= cases, f"missing cases {EXPECTED[suite] - cases}"
    assert not cases & CUDA_ONLY, "a CUDA-only case ran on the CPU"
    host = socket.gethostname()
    if len(host) >= 4:
        assert host not in path.read_text(), "the results file must not record the hostname"
    if suite == "pgd":
        flops = {r["extra"]["useful_flops_per_image_step"] for r in rows}
        assert len(flops) == 1 and flops.pop() > 0  # counted once with torch.utils.flop_counter
    if suite == "at_epoch":
        ours = next(r for r in rows if r["case"] == "compiled_bf16_channels_last")
        assert ours["compile_s"] is not None and ours["compile_s"] > 0  # compile time reported separately
        assert ours["extra"]["compute_bound_s"] > 0


def test_append_rows_accumulates_and_refuses_a_corrupt_file(tmp_path):
    path = tmp_path / "sub" / "x.json"
    append_rows(path, [{"a": 1}])
    append_rows(path, [{"a": 2}, {"a": 3}])
    assert [r["a"] for r in json.loads(path.read_text())] == [1, 2, 3]
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp file left behind
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        append_rows(path, [{"a": 4}])
    assert path.read_text() == "{not json"  # a failed append leaves the file as it was
    path.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        append_rows(path, [{"a": 4}])


def test_measure_counts_calls_and_validates():
    calls = []
    timing = measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=3)
    assert len(calls) == 5 and len(timing.times_ms) == 3 and timing.warmup == 2
    with pytest.raises(ValueError, match="reps >= 1"):
        measure(lambda: None, torch.device("cpu"), warmup=0, reps=0)


def test_config_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown model"):
        BenchConfig(model="resnet50")
    with pytest.raises(ValueError, match="batch_sizes"):
        BenchConfig(batch_sizes=())
    with pytest.raises(ValueError, match="multiple of 4"):
        BenchConfig(image_size=30)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            BenchConfig(device="cuda").torch_device()


def test_command_line_runs_a_suite(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "pgd_step", "--device", "cpu", "--batch-sizes", "2", "--image-size", "8",
           "--bandwidth-batch", "0", "--quick", "--warmup", "0", "--results-dir", str(tmp_path), "--note", "dry run"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "pgd_step.json").read_text())
    assert {r["case"] for r in rows} >= {"copy", "eager_torch_Linf"}
    assert all(r["config"]["notes"] == ["dry run"] and r["time"]["reps"] == 3 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "pgd", "--batch-sizes", "x"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "comma-separated integers" in bad.stderr


def test_guard_records_a_failing_case_and_goes_on(tmp_path, capsys):
    rec = Recorder("pgd", tmp_path, torch.device("cpu"), {"model": "wrn-10-1"})
    with rec.guard("B=4 broken"):
        raise RuntimeError("out of memory (simulated)")
    ran_after = []
    with rec.guard("B=8 fine"):
        ran_after.append(True)
    assert rec.failures == ["B=4 broken: RuntimeError: out of memory (simulated)"] and ran_after
    assert "FAILED B=4 broken" in capsys.readouterr().out  # never silent
