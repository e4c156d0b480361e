"""The run store never serves a stale result: a finished stage is reused only for the identity that made it
(settings it reads, data by content, members by weights), evaluations are keyed by model, images and
protocol, one process holds a stage at a time, and bad input fails early with one line naming the problem."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from afs.attacks import PGD
from afs.cli import main
from afs.config import PROFILES
from afs.io import CorruptFileError, state_hash
from afs.merger import train_merger
from afs.runs import RunConfigMismatchError, RunDir, StageBusyError
from afs.training import train_extractor
from test_training import _profile, _random_data, _stack

# --- stale results -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished one-epoch extractor run, and what made it."""
    d = tmp_path_factory.mktemp("store") / "eps4"
    prof, data = _profile(epochs=1), _random_data()
    train_extractor(prof, data, 4 / 255, run_dir=d, progress=False)
    return d, prof, data


@pytest.mark.parametrize("change,named", [
    (lambda p: dataclasses.replace(p, seed=1), "seed"),
    (lambda p: dataclasses.replace(p, extractor=dataclasses.replace(p.extractor, lr=0.01)), "extractor.lr"),
    (lambda p: dataclasses.replace(p, extractor=dataclasses.replace(p.extractor, epochs=2)), "extractor.epochs"),
])
def test_a_finished_extractor_is_not_reused_after_its_recipe_changes(trained, change, named):
    d, prof, data = trained
    before = (d / "best.pt").read_bytes()
    with pytest.raises(RunConfigMismatchError, match=rf"{named}: .* -> .*delete {d}"):
        train_extractor(change(prof), data, 4 / 255, run_dir=d, progress=False)
    assert (d / "best.pt").read_bytes() == before and json.loads((d / "config.json").read_text())["seed"] == prof.seed


def test_a_finished_extractor_is_not_reused_on_other_data(trained):
    d, prof, data = trained
    with pytest.raises(RunConfigMismatchError, match=r"data\.train"):
        train_extractor(prof, _random_data(seed=1), 4 / 255, run_dir=d, progress=False)


def test_settings_a_stage_does_not_read_leave_it_reusable(trained):
    d, prof, data = trained
    stamp = (d / "best.pt").stat().st_mtime_ns
    other_grid = dataclasses.replace(prof, extractor=dataclasses.replace(prof.extractor, budgets=(0, 2, 4, 6, 8)),
                                     evaluation=dataclasses.replace(prof.evaluation, aa_size=4),
                                     experiments=dataclasses.replace(prof.experiments, masks=("10001",)))
    train_extractor(other_grid, data, 4 / 255, run_dir=d, progress=False)
    assert (d / "best.pt").stat().st_mtime_ns == stamp  # loaded, not retrained


def test_a_merger_is_not_reused_after_a_member_was_retrained(tmp_path):
    prof, data = _profile(), _random_data()
    train_merger(_stack(), prof, data, 0.5, "paired", run_dir=tmp_path / "m", progress=False)
    retrained = _stack()
    with torch.no_grad():
        retrained.extractors[1].head.weight.add_(0.01)  # the same architecture, other weights
    with pytest.raises(RunConfigMismatchError, match="members"):
        train_merger(retrained, prof, data, 0.5, "paired", run_dir=tmp_path / "m", progress=False)
    train_merger(_stack(), prof, data, 0.5, "paired", run_dir=tmp_path / "m", progress=False)  # same members: reused


def test_state_hash_sees_weights_not_memory_layout():
    a = _stack().extractors[0]
    b = _stack().extractors[0].to(memory_format=torch.channels_last)
    assert state_hash(a) == state_hash(b)
    with torch.no_grad():
        b.head.bias.add_(1e-6)
    assert state_hash(a) != state_hash(b)


# --- one process per stage ----------------------------------------------------------------------------


def test_a_second_process_is_told_who_holds_the_stage(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from afs.runs import RunDir
            with RunDir({str(tmp_path / 'stage')!r}).lock():
                print("held", flush=True)
                sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageBusyError, match=rf"held by pid {holder.pid} on host "):
            with RunDir(tmp_path / "stage").lock(wait=False):
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with RunDir(tmp_path / "stage").lock(wait=False):  # released with its holder
        assert json.loads((tmp_path / "stage" / "lock.json").read_text())["pid"] > 0


def test_two_runs_on_one_out_train_a_stage_once(real_data_root, tmp_path):
    cmd = [sys.executable, "-m", "afs.cli", "train-extractor", "--profile", "smoke", "--budget", "4", "--out",
           str(tmp_path), "--data-root", str(real_data_root), "--no-progress"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [r.communicate(timeout=600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "smoke" / "extractors" / "eps4" / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(PROFILES["smoke"].extractor.epochs))  # each epoch once: one trainer


# --- evaluations keyed by model, images and protocol (a real-data pipeline) ------------------------------


@pytest.fixture(scope="module")
def smoke_pipe(real_data_root, tmp_path_factory):
    from afs.pipeline import Pipeline

    prof = dataclasses.replace(PROFILES["smoke"], extractor=dataclasses.replace(PROFILES["smoke"].extractor, budgets=(0, 4)),
                               merger=dataclasses.replace(PROFILES["smoke"].merger, stack=(0, 4)),
                               experiments=dataclasses.replace(PROFILES["smoke"].experiments, masks=()))
    out = tmp_path_factory.mktemp("runs")
    return Pipeline(prof, out, real_data_root, "cpu", progress=False), prof, out, real_data_root


def test_an_evaluation_is_redone_for_a_retrained_model(smoke_pipe):
    pipe, _, _, _ = smoke_pipe
    model, d = pipe.extractor(4), pipe.extractor_dir(4 / 255)
    first = pipe.evaluate(model, d, ("clean",))
    twin = copy.deepcopy(model)  # "retrained": the same network at the same place, other weights
    with torch.no_grad():
        next(twin.parameters()).add_(0.5)
    pipe.evaluate(twin, d, ("clean",))
    setting = json.loads((d / "eval_test.json").read_text())["setting"]
    assert setting["model"] == state_hash(twin) != state_hash(model)
    assert pipe.evaluate(model, d, ("clean",)) == first  # recomputed for the original: the same number


def test_an_evaluation_never_mixes_image_counts(smoke_pipe):
    from afs.pipeline import Pipeline

    pipe, prof, out, root = smoke_pipe
    d = pipe.extractor_dir(4 / 255)
    pipe.evaluate(pipe.extractor(4), d, ("clean",))
    fewer = dataclasses.replace(prof, data=dataclasses.replace(prof.data, test_size=32))
    small = Pipeline(fewer, out, root, "cpu", progress=False)
    small.evaluate(small.extractor(4), d, ("pgd2",))  # same extractor (test_size is not read by training)
    stored = json.loads((d / "eval_test.json").read_text())
    assert stored["n"] == 32 and list(stored["accuracy"]) == ["pgd2"]  # the 64-image clean number is gone
    assert {k: v.shape for k, v in torch.load(d / "eval_test.pt").items()} == {"pgd2": (32,)}


# --- the error net ----------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,says", [
    (["evaluate", "--budget", "4", "--attacks", "bogus"], "unknown attack 'bogus'"),
    (["evaluate", "--budget", "4", "--attacks", ""], "--attacks is empty"),
    (["evaluate", "--budget", "4", "--alpha", "2"], "--alpha"),
    (["reproduce", "--set", "merger.epochz=3"], "has no field 'epochz'"),
    (["reproduce", "--set", "merger.epochs=three"], "merger.epochs=three: expected int"),
    (["reproduce", "--set", "nosuch.x=1"], "unknown section 'nosuch'"),
    (["reproduce", "--set", "epochs"], "expected section.field=value"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, argv, says):
    out = tmp_path / "runs"
    rc, err = _cli(capsys, *argv, "--profile", "smoke", "--out", str(out), "--data-root", str(tmp_path / "no-data"))
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1
    assert not (out / "smoke").exists()  # nothing trained, nothing written


def test_budgets_must_be_distinct_and_present(capsys):
    for text in ("4,4", ""):
        with pytest.raises(SystemExit):
            main(["evaluate", "--budgets", text, "--profile", "smoke"])
        assert "--budgets" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    rc, err = _cli(capsys, "evaluate", "--budget", "4", "--device", "cuda", "--profile", "smoke", "--out", str(tmp_path))
    assert rc == 2 and "no usable CUDA device" in err


def test_out_that_is_a_file_or_cannot_be_made(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, err = _cli(capsys, "reproduce", "--profile", "smoke", "--out", str(f))
    assert rc == 2 and "is a file" in err
    # A folder that cannot be created (here under a file; read-only disks fail the same way, as OSError).
    rc, err = _cli(capsys, "reproduce", "--profile", "smoke", "--out", str(f / "sub"))
    assert rc == 2 and f"cannot use {f / 'sub'}" in err and "Traceback" not in err


def test_a_truncated_checkpoint_or_json_names_the_file(trained, tmp_path):
    from afs.io import read_json
    from afs.models import load_model

    d, _, _ = trained
    cut = tmp_path / "best.pt"
    cut.write_bytes((d / "best.pt").read_bytes()[:200])
    with pytest.raises(CorruptFileError, match=rf"{cut} cannot be read .* Delete the stage folder"):
        load_model(cut)
    bad = tmp_path / "metrics.json"
    bad.write_text('{"best_epoch": 1,')
    with pytest.raises(CorruptFileError, match=rf"{bad} cannot be read \(not valid JSON"):
        read_json(bad)


def test_a_truncated_data_archive_names_the_file(tmp_path):
    from afs.data import load_dataset
    from test_data import make_archive, write_jpeg_tree

    write_jpeg_tree(tmp_path / "src" / "cifar10-jpeg")
    archive = tmp_path / "root" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    make_archive(tmp_path / "src", archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match=rf"{archive} cannot be read \(a damaged or truncated archive"):
        load_dataset("cifar10-jpeg", archive.parent, "train", cache_dir=tmp_path / "cache")


def test_a_mismatch_is_one_line_from_the_cli(trained, tmp_path, capsys, monkeypatch):
    import afs.cli

    def refuse(*a, **k):
        raise RunConfigMismatchError("runs/x holds a stage made with other settings (seed: 0 -> 1)")

    monkeypatch.setattr(afs.cli, "_command", refuse)
    rc, err = _cli(capsys, "reproduce", "--profile", "smoke", "--out", str(tmp_path))
    assert rc == 2 and err.startswith("afs reproduce: error: runs/x holds a stage") and "Traceback" not in err
    with pytest.raises(RunConfigMismatchError):
        main(["reproduce", "--profile", "smoke", "--out", str(tmp_path), "--debug"])


def test_api_errors_for_float64_an_unknown_start_and_a_swapped_model():
    from test_training import TINY
    from afs.models import build_model

    net = build_model(TINY, 4).eval()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="float64"):
        PGD(net)(x.double(), y)
    with pytest.raises(ValueError, match="unknown start 'no'"):
        PGD(net, start="no")
    attack = PGD(net, steps=1)
    attack(x, y)
    attack.model = build_model(TINY, 2).eval()  # two classes now: label 1 is the largest valid one
    with pytest.raises(ValueError, match="2 classes"):
        attack(x, torch.tensor([0, 3]))


# --- --set ------------------------------------------------------------------------------------------------


def test_set_overrides_typed_fields_and_is_recorded():
    from afs.pipeline import run_name

    # The stack alone would name an untrained budget: the changes count together, validated once.
    p = PROFILES["smoke"].with_overrides(["merger.stack=2,8", "extractor.budgets=0,2,8", "evaluation.eps=4/255",
                                          "evaluation.aa_size=none", "deterministic=true", "merger.epochs=3"])
    assert (p.merger.stack, p.extractor.budgets, p.evaluation.eps, p.evaluation.aa_size, p.deterministic,
            p.merger.epochs) == ((2, 8), (0, 2, 8), 4 / 255, None, True, 3)
    assert p.overrides[0] == "merger.stack=2,8" and len(p.overrides) == 6 and p.to_dict()["overrides"] == p.overrides
    assert run_name(p).startswith("smoke-set") and run_name(PROFILES["smoke"]) == "smoke"
    with pytest.raises(ValueError, match="stack budgets"):  # validated as a whole
        PROFILES["smoke"].with_overrides(["extractor.budgets=0,8"])
