"""Profiles: the paper's exact settings, JSON round trips, selection by name or environment."""

import dataclasses
import json

import pytest

from afs.config import PROFILES, Profile, get_profile, mask_to_budgets, eps_from_budget


def test_paper_profile_holds_the_papers_settings():
    p = get_profile("paper")
    e, m, v = p.extractor, p.merger, p.evaluation
    assert (p.model.arch, p.model.depth, p.model.widen_factor) == ("wrn", 28, 10)
    assert e.budgets == tuple(range(10))
    assert (e.attack_steps, e.attack_step_size) == (10, 2 / 255)
    assert (e.momentum, e.lr, e.lr_milestones, e.lr_gamma, e.epochs) == (0.9, 0.1, (60,), 0.1, 70)
    assert (e.weight_decay, e.batch_size, e.early_stopping) == (5e-4, 128, True)
    assert (m.epochs, m.lr, m.lr_milestones, m.batch_size, m.eps) == (5, 0.1, (3,), 100, 8 / 255)
    assert (m.stack, m.alpha, m.mode) == ((3, 4, 5, 6, 7, 8), 0.5, "paired")
    assert (v.eps, v.step_size, v.pgd_steps, v.aa_version) == (8 / 255, 2 / 255, (10, 20), "standard")
    assert v.aa_size is None and p.data.test_size is None  # the whole test set
    assert p.data.name == "cifar10"


@pytest.mark.parametrize("name", list(PROFILES))
def test_json_round_trip(name, tmp_path):
    p = PROFILES[name]
    assert Profile.from_json(p.to_json()) == p
    p.to_json(tmp_path / "config.json")
    assert Profile.from_json(tmp_path / "config.json") == p
    assert json.loads((tmp_path / "config.json").read_text())["name"] == name


def test_profiles_are_frozen():
    with pytest.raises(Exception):
        PROFILES["paper"].seed = 3


def test_selection_by_name_and_environment(monkeypatch):
    monkeypatch.setenv("AFS_PROFILE", "smoke")
    assert get_profile().name == "smoke"
    assert get_profile("cpu").name == "cpu"
    monkeypatch.setenv("AFS_PROFILE", "nope")
    with pytest.raises(ValueError, match=r"unknown profile 'nope'.*smoke.*cpu.*quick.*paper"):
        get_profile()
    with pytest.raises(ValueError, match="valid profiles"):
        get_profile("Paper")


def test_bad_configs_are_refused():
    p = PROFILES["smoke"]
    with pytest.raises(ValueError, match="alpha"):
        p.replace(merger=type(p.merger)(alpha=1.5, stack=p.merger.stack))
    with pytest.raises(ValueError, match="not among the trained budgets"):
        p.replace(merger=type(p.merger)(stack=(3, 5)))
    with pytest.raises(ValueError, match="unknown data set 'mnist' for DataConfig.name"):
        p.replace(data=type(p.data)(name="mnist"))
    with pytest.raises(ValueError, match="unknown Profile field"):
        Profile.from_dict({**p.to_dict(), "typo": 1})


def test_masks_select_networks_left_to_right():
    assert mask_to_budgets("000111111") == (3, 4, 5, 6, 7, 8)  # the paper's default stack
    assert mask_to_budgets("100000001") == (0, 8)
    with pytest.raises(ValueError, match="8 digits"):
        mask_to_budgets("10000001")  # as printed in Table III: one digit short
    with pytest.raises(ValueError, match="selects no network"):
        mask_to_budgets("000000000")
    assert PROFILES["paper"].stack_for_mask("111111111") == tuple(range(9))
    assert eps_from_budget(8) == 8 / 255


def test_choice_fields_are_enums_checked_once_and_serialised_as_their_strings():
    from afs.config import Arch, MergerMode, Precision
    from afs.merger import MergerMode as TrainingMode

    p = PROFILES["cpu"]
    assert p.precision is Precision.AUTO and p.model.arch is Arch.CNN and p.merger.mode is MergerMode.PAIRED
    assert p.experiments.merger_modes == (MergerMode.PAIRED,) and p.merger.mode == "paired"
    assert TrainingMode(p.merger.mode) is TrainingMode.PAIRED  # the merger's own enum takes it as it is
    # Either form, any case; the JSON holds the plain value strings, and reads back to the same profile.
    q = p.replace(precision="FP32", merger=type(p.merger)(stack=(4, 6, 8), mode=MergerMode.PAIRED))
    assert q.precision is Precision.FP32 and json.loads(q.to_json())["precision"] == "fp32"
    assert json.loads(q.to_json())["experiments"]["merger_modes"] == ["paired"]
    assert Profile.from_json(q.to_json()) == q
    s = PROFILES["smoke"].with_overrides(["merger.mode=SPLIT", "extractor.lr_schedule=onecycle"])
    assert s.merger.mode is MergerMode.SPLIT and s.extractor.lr_schedule == "onecycle"
    valid = r"valid: \['auto', 'fp32', 'bf16'\]"
    with pytest.raises(ValueError, match=r"unknown precision 'fp16' for Profile.precision; " + valid):
        p.replace(precision="fp16")
    with pytest.raises(ValueError, match="unknown merger mode 'joint' for merger.mode"):
        p.with_overrides(["merger.mode=joint"])
    with pytest.raises(ValueError, match="unknown architecture 'vit' for ModelConfig.arch"):
        type(p.model)(arch="vit")
    with pytest.raises(ValueError, match="merger_modes must list distinct"):
        p.replace(experiments=dataclasses.replace(p.experiments, merger_modes=("split",)))
