"""The cost model (afs/cost.py): its arithmetic, its agreement with the pipeline's grid, and the CLI."""

import dataclasses

import pytest

from afs import cost
from afs.cli import main
from afs.config import PROFILES, get_profile
from afs.pipeline import Pipeline


def _by_name(stages):
    return {s.name: s for s in stages}


@pytest.mark.parametrize("name", list(PROFILES))
def test_stages_match_the_pipeline_grid(name):
    p = get_profile(name)
    extractors, mergers = Pipeline(p, progress=False).grid()
    found = cost.stages(p)
    assert sum(s.group == "extractor" for s in found) == len(extractors)
    assert sum(s.group == "merger" for s in found) == len(mergers)
    # AutoAttack on the default stack (in both merger modes, or the profile's) and the 8/255 network.
    aa = [w for s in found if s.group == "autoattack" for w in s.work if w.what == "aa"]
    assert len(aa) == len(p.experiments.merger_modes) + 1
    assert all(w.images == min(p.evaluation.aa_size or 10_000, p.data.test_size or 10_000) for w in aa)
    assert all(s.flops > 0 for s in found)


def test_total_is_the_sum_of_stages(capsys):
    found = cost.stages(get_profile("quick"))
    total = sum(w.images * w.passes * w.fwd_flops for s in found for w in s.work)
    assert sum(s.flops for s in found) == pytest.approx(total)
    text = cost.format_estimate(get_profile("quick"), found, cost.H200)
    total_line = [line for line in text.splitlines() if line.startswith("total")]
    assert len(total_line) == 1 and f"{total / 1e12:.1f}" in total_line[0]
    # 100-180 TFLOP/s: the printed range is total/180e12 .. total/100e12 (minutes for quick).
    assert f"{total / 180e12 / 60:.1f}-{total / 100e12 / 60:.1f} min" in total_line[0]


def test_flops_scale_linearly_with_images_and_steps():
    p = get_profile("smoke")
    base = _by_name(cost.stages(p))
    # Twice the training images (val fixed): the training term of every extractor doubles.
    more = p.replace(data=dataclasses.replace(p.data, train_size=2 * p.data.train_size))
    doubled = _by_name(cost.stages(more))
    for key in ("extractors/eps4", "stacks/4-8_a0.5_paired"):
        a, b = base[key].work[0], doubled[key].work[0]
        assert b.flops == pytest.approx(2 * a.flops)
        assert base[key].work[1].flops == doubled[key].work[1].flops  # validation unchanged
    # PGD-K adversarial training costs (K + 1) forward+backward passes: K -> 2K + 1 doubles it.
    k = p.extractor.attack_steps
    steps = p.replace(extractor=dataclasses.replace(p.extractor, attack_steps=2 * k + 1))
    a, b = base["extractors/eps4"].work[0], _by_name(cost.stages(steps))["extractors/eps4"].work[0]
    assert b.flops == pytest.approx(2 * a.flops)
    # Budget 0 is standard training: one forward+backward per image, no attack.
    assert base["extractors/eps0"].work[0].passes == cost.FWD_BWD
    # An evaluation attack: PGD-K is 3K + 1 passes (linear in K); restarts multiply it.
    assert cost.attack_passes("pgd20") - cost.attack_passes("pgd10") == pytest.approx(10 * cost.FWD_BWD)
    assert cost.attack_passes("pgd10x3") == pytest.approx(3 * (10 * cost.FWD_BWD + 1) + 1)
    assert cost.attack_passes("aa") > 50 * cost.attack_passes("pgd20")  # AutoAttack dominates per image


def test_cli_prints_an_estimate_with_a_total(capsys):
    assert main(["profiles", "--estimate", "--profile", "smoke", "--device-kind", "h200"]) == 0
    out = capsys.readouterr().out
    assert "ASSUMPTION" in out and out.count("\ntotal ") == 1
    assert "extractors/wrn-10-2-eps8" in out and "AutoAttack" in out


def test_cpu_throughput_is_measured(capsys):
    t = cost.measure_cpu(get_profile("smoke"), target_s=0.2)
    assert t.low == t.high > 1e8  # any CPU sustains more than 0.1 GFLOP/s
    assert "measured now" in t.source
    assert main(["profiles", "--estimate", "--profile", "smoke", "--device-kind", "cpu"]) == 0
    assert "measured now" in capsys.readouterr().out


def test_profiles_without_estimate_rejects_its_options(capsys):
    assert main(["profiles", "--device-kind", "cpu"]) == 2
    assert "--estimate" in capsys.readouterr().err


def test_network_cost_is_one_count_for_models_configs_and_stacks():
    from afs.config import ModelConfig
    from afs.models import build_model, model_cost
    from afs.stacking import StackedModel

    mc = ModelConfig("wrn", 10, 1)
    net = build_model(mc, 10)
    on_meta, here = cost.network_cost(mc), cost.network_cost(net)
    assert on_meta == here and here["params"] == model_cost(net)["params"]
    assert here["macs_G"] == here["flops_G"] / 2 == here["flops"] / 2e9
    # A stack: the members without their heads and one merger over all their features (Table VI's count).
    stack = StackedModel([net, build_model(mc, 10)], 10)
    two = cost.network_cost(mc, members=2)
    heads = sum(p.numel() for m in stack.extractors for p in m.head.parameters())  # kept by StackedModel, unused
    assert two["params"] == model_cost(stack)["params"] - heads
    assert two["flops"] == pytest.approx(model_cost(stack)["flops"], rel=1e-3)
    with pytest.raises(ValueError, match="members must be >= 1"):
        cost.network_cost(mc, members=0)
