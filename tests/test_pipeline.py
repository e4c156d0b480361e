"""`afs reproduce --profile smoke` end to end on real data, the summary schema, and the CLI surface."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from afs.cli import build_parser, main
from afs.pipeline import validate_summary


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
