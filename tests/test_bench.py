"""The benchmark harness and a CPU dry run of every suite (tiny WRN-10-1, batch 4, 8x8 images; the cpu
suite: its SmallCNN at batch 4), and our PGD against torchattacks' on the same inputs.

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
from benchmarks.__main__ import build_parser, config_from_args
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
    "stack": {"loop"},
    "pgd_step": {"copy", "eager_torch_Linf"} | ({"fused_triton_Linf"} if INTERPRET else set()),
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


# The cpu suite has its own tests below: its network is fixed (SmallCNN), and its strength rows are untimed.
@pytest.mark.parametrize("suite", [s for s in SUITES if s != "cpu"])
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


# --------------------------------------------------------------------------------------------------------
# The cpu suite, and our PGD against torchattacks'
# --------------------------------------------------------------------------------------------------------
# Batch 4, PGD-2, 2 training steps, 2 evaluation and 2 epoch batches, nothing compiled: a few seconds.
CPU_DRY = replace(DRY, steps=2, cpu_batch_size=4, cpu_train_steps=2, cpu_eval_batches=2, cpu_epoch_batches=2,
                  cpu_compile=False)
CPU_CASES = {f"{part}_ours_{v}" for part in ("pgd", "strength") for v in ("eager_fp32", "bf16_channels_last")} | {
    "at_eager_fp32", "at_bf16_channels_last"}


def _run_cpu_suite(tmp_path: Path) -> list[dict]:
    torch.set_num_threads(1)
    rec = Recorder("cpu", tmp_path, torch.device("cpu"), config_dict(replace(CPU_DRY, results_dir=str(tmp_path))))
    SUITES["cpu"](CPU_DRY, rec)
    rows = json.loads((tmp_path / "cpu.json").read_text())
    assert rows == json.loads(json.dumps(rec.rows)) and not rec.failures
    return rows


def _check_cpu_rows(rows: list[dict]) -> None:
    cases = {r["case"] for r in rows}
    assert CPU_CASES <= cases, f"missing cases {CPU_CASES - cases}"
    assert not any("compiled" in c for c in cases), "cpu_compile=False must not compile"
    for r in rows:
        assert ROW_FIELDS <= r.keys() and r["suite"] == "cpu" and r["model"] == "smallcnn-2"
        assert r["env"]["device_type"] == "cpu" and r["batch_size"] == 4 and r["shapes"]["x"] == [4, 3, 32, 32]
        # The baseline was measured in this run, in the same part of the suite (pgd / strength / at).
        assert r["baseline"] in cases and r["baseline"].split("_")[0] == r["case"].split("_")[0]
        assert isinstance(r["ratio"], float) and math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert isinstance(r["value"], float) and math.isfinite(r["value"])
        if r["baseline"] == r["case"]:
            assert r["ratio"] == 1.0
        if r["case"].startswith("strength_"):
            e = r["extra"]
            assert r["time"] is None and 0.0 <= r["value"] <= 100.0 and e["images"] == 8
            # Inside the ball (up to fp32 rounding of x +- eps: ~1 ulp of a pixel, 2e-6 of eps) and the box.
            assert e["max_linf_over_eps"] <= 1 + 1e-5 and e["in_box"] is True
            lo, hi = e["diff_interval_95_pp"]
            assert lo <= e["diff_vs_baseline_pp"] <= hi
        else:
            assert r["value"] > 0 and r["time"]["median_ms"] > 0 and r["time"]["clock"] == "perf_counter"


@pytest.fixture(scope="module")
def cpu_rows(tmp_path_factory):
    threads = torch.get_num_threads()
    torch._dynamo.reset()
    try:
        yield _run_cpu_suite(tmp_path_factory.mktemp("cpu-bench"))
    finally:
        torch.set_num_threads(threads)


def test_cpu_suite_writes_finite_rows(cpu_rows):
    _check_cpu_rows(cpu_rows)


def test_cpu_suite_baseline_is_torchattacks(cpu_rows):
    pytest.importorskip("torchattacks")
    by_case = {r["case"]: r for r in cpu_rows}
    for part in ("pgd", "strength"):
        base = f"{part}_torchattacks_fp32"
        assert by_case[base]["baseline"] == base and by_case[base]["ratio"] == 1.0
        assert all(r["baseline"] == base for r in cpu_rows if r["case"].startswith(part + "_"))
    assert by_case["at_bf16_channels_last"]["baseline"] == "at_eager_fp32"  # no torchattacks training loop


def test_cpu_suite_without_torchattacks_says_so_and_uses_ours(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # `import torchattacks` now raises ImportError
    threads = torch.get_num_threads()
    try:
        rows = _run_cpu_suite(tmp_path)
    finally:
        torch.set_num_threads(threads)
    _check_cpu_rows(rows)
    assert not any("torchattacks" in r["case"] for r in rows)
    assert {r["baseline"] for r in rows if not r["case"].startswith("at_")} == {
        "pgd_ours_eager_fp32", "strength_ours_eager_fp32"}
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "torchattacks unavailable" in line]) == 1
    assert "pip install --no-deps torchattacks==3.5.1" in out and "Traceback" not in out


def test_cpu_suite_skips_off_cpu_and_defaults_to_cpu(tmp_path, capsys):
    rec = Recorder("cpu", tmp_path, torch.device("cpu"), {})
    SUITES["cpu"](replace(CPU_DRY, device="cuda"), rec)
    assert not rec.rows and "run it with --device cpu" in capsys.readouterr().out
    assert config_from_args(build_parser().parse_args(["cpu"])).device == "cpu"
    assert config_from_args(build_parser().parse_args(["pgd"])).device == BenchConfig().device
    with pytest.raises(ValueError, match="cpu_train_steps"):
        BenchConfig(cpu_train_steps=-1)


@pytest.mark.parametrize("random_start", [False, True])
def test_our_pgd_equals_torchattacks_pgd(random_start, one_thread):
    """afs.attacks.PGD and torchattacks.PGD on the same inputs give the same adversarial examples.

    Without a random start both are deterministic. With one both draw it from torch's global
    RNG (ours: ``seed=None``), the same uniforms after the same ``torch.manual_seed``. The budget 1.5/255
    leaves the standardly trained toy ~45% accurate, so a difference in strength would show. The batch is
    64, a power of two: torchattacks' mean cross-entropy then has exactly 1/64 of our summed one's gradient
    (scaling by 2^-k is exact in floating point), so every sign -- and every step -- is the same; only
    ties at a zero gradient could differ, which the 1e-6 agreement below leaves room for.
    """
    torchattacks = pytest.importorskip("torchattacks")
    import toys
    from afs.attacks import PGD

    net = toys.trained_tiny_net()
    x, y = toys.make_data(64)
    eps, alpha = 1.5 / 255, 1.5 / 255 / 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        theirs = torchattacks.PGD(net, eps=eps, alpha=alpha, steps=10, random_start=random_start)(x, y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        ours = PGD(net, eps=eps, step_size=alpha, steps=10, start="uniform" if random_start else "none")(x, y)
    for x_adv in (theirs, ours):
        assert (x_adv - x).abs().max().item() <= eps + 1e-6  # inside the ball
        assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0  # inside the box
    diff = (theirs - ours).abs()
    assert (diff > 1e-6).float().mean().item() <= 1e-3, f"max |difference| {diff.max().item():.3g}"
    clean = toys.accuracy(net, x, y)
    robust_theirs, robust_ours = toys.accuracy(net, theirs, y), toys.accuracy(net, ours, y)
    assert robust_ours == robust_theirs  # equal strength: the same robust accuracy on the same images
    assert robust_ours < clean - 20  # and the attack did something (a no-op pair would agree too)
