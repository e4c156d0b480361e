"""Extractor PGD-AT and merger training (Eq. 3-5): learning, budget order, exact resume, merger rules."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import afs.attacks
from afs.config import DataConfig, ExtractorConfig, MergerConfig, ModelConfig, PROFILES
from afs.data import ImageData
from afs.merger import split_count, train_merger
from afs.models import WideResNet
from afs.stacking import StackedModel
from afs.training import TrainData, train_extractor

TINY = ModelConfig("wrn", 10, 1)


def _profile(**extractor):
    base = PROFILES["smoke"]
    ec = dict(budgets=(0, 4, 8, 12), epochs=3, batch_size=32, lr=0.05, lr_milestones=(2,), attack_steps=1,
              attack_step_size=4 / 255, val_attack_steps=2)
    ec.update(extractor)
    return dataclasses.replace(
        base, model=TINY, data=DataConfig(name="cifar10-jpeg", augment=True),
        extractor=ExtractorConfig(**ec),
        experiments=dataclasses.replace(base.experiments, masks=("101",)),
        merger=MergerConfig(stack=(0, 4), epochs=2, batch_size=32, lr=0.05, lr_milestones=(1,), attack_steps=1,
                            attack_step_size=8 / 255),
    )


def _random_data(n=96, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % classes
    names = tuple(f"c{i}" for i in range(classes))
    return TrainData(ImageData(x, y, names, "rand", "train"), ImageData(x[:32], y[:32], names, "rand", "val"))


def _robust_vs_accurate_task(n, seed):
    """Two classes, each carried by two features (Tsipras et al.'s construction):
    a *robust* one, a 16x16 centre patch at +-32/255 that agrees with the label for 75% of the images, and
    a *non-robust* one, the whole image shifted by +-6/255, that always agrees. Standard training uses the
    shift (100% clean) and breaks at eps = 12/255; PGD-AT at 12/255 can only use the patch (~75%/75%)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    sign = (2 * y - 1).float()
    patch_sign = torch.where(torch.rand(n, generator=g) < 0.75, sign, -sign)
    img = 128 + 4 * torch.randn(n, 3, 32, 32, generator=g) + 6 * sign.view(-1, 1, 1, 1)
    img[:, :, 8:24, 8:24] += 32 * patch_sign.view(-1, 1, 1, 1)
    return ImageData(img.round().clamp(0, 255).to(torch.uint8), y, ("neg", "pos"), "toy", "train")


def _flat(model):
    return torch.cat([t.flatten().float() for t in model.state_dict().values()])


def test_pgd_at_on_real_cifar_lowers_the_loss_and_beats_chance(real_cifar10, tmp_path):
    train, test = real_cifar10
    data = TrainData(train.subset(range(0, 640)), train.subset(range(640, 800), split="val"))
    prof = _profile(epochs=2, batch_size=64, lr=0.1, lr_milestones=(3,), attack_steps=1, attack_step_size=2 / 255)
    train_extractor(prof, data, 2 / 255, run_dir=tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert max(r["val_clean"] for r in log) > 20  # 10 classes: chance is 10%
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "manifest.json", "log.jsonl", "state.pt", "best.pt", "metrics.json"} <= files


def test_larger_budget_trades_clean_accuracy_for_robustness(tmp_path):
    from afs.evaluation import evaluate

    train, val, test = (_robust_vs_accurate_task(n, s) for n, s in ((384, 0), (64, 1), (256, 2)))
    prof = _profile(epochs=4, batch_size=32, lr=0.1, lr_milestones=(3,), attack_steps=3, attack_step_size=6 / 255,
                    val_attack_steps=10)
    prof = dataclasses.replace(prof, data=DataConfig(name="cifar10-jpeg", augment=False))
    acc = {}
    for budget in (0, 12):
        model = train_extractor(prof, TrainData(train, val), budget / 255, run_dir=tmp_path / f"eps{budget}", progress=False)
        acc[budget] = evaluate(model, test.images, test.labels, ("clean", "pgd10"), eps=12 / 255, step_size=3 / 255,
                               progress=False).accuracy
    # Measured: eps 0 -> clean 100, PGD 50; eps 12/255 -> clean 80, PGD 80.
    assert acc[0]["clean"] > acc[12]["clean"] + 10  # standard training uses the accurate, non-robust shift
    assert acc[12]["pgd10"] > acc[0]["pgd10"] + 15  # only the patch survives the attack


@pytest.mark.parametrize("kill_after", [1, 2])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, kill_after):
    data, prof = _random_data(), _profile()
    full = train_extractor(prof, data, 4 / 255, run_dir=tmp_path / "full", progress=False)
    partial = train_extractor(prof, data, 4 / 255, run_dir=tmp_path / "killed", progress=False, stop_after=kill_after)
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = train_extractor(prof, data, 4 / 255, run_dir=tmp_path / "killed", progress=False)
    assert torch.equal(_flat(full), _flat(resumed))
    log = lambda d: [json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["epoch"] for r in log("killed")] == [0, 1, 2]
    assert [r["train_loss"] for r in log("killed")] == [r["train_loss"] for r in log("full")]
    del partial


def test_finished_run_is_reused_and_a_different_config_is_refused(tmp_path):
    data, prof = _random_data(), _profile(epochs=1)
    train_extractor(prof, data, 4 / 255, run_dir=tmp_path / "r", progress=False)
    stamp = (tmp_path / "r" / "best.pt").stat().st_mtime_ns
    train_extractor(prof, data, 4 / 255, run_dir=tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "best.pt").stat().st_mtime_ns == stamp  # loaded, not retrained
    with pytest.raises(RuntimeError, match="made with other settings"):  # finished, but by another recipe
        train_extractor(_profile(epochs=2), data, 4 / 255, run_dir=tmp_path / "r", progress=False)
    (tmp_path / "r" / "metrics.json").unlink()  # interrupted, then the recipe changed: refused as well
    with pytest.raises(RuntimeError, match="made with other settings"):
        train_extractor(_profile(epochs=2), data, 4 / 255, run_dir=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="eps is an L-inf radius"):
        train_extractor(prof, data, 8, run_dir=tmp_path / "bad", progress=False)


def _stack(n=2, classes=4):
    torch.manual_seed(0)
    return StackedModel([WideResNet(10, 1, classes) for _ in range(n)], classes, budgets=tuple(range(n)))


def _record_attack_sizes(monkeypatch):
    sizes = []
    original = afs.attacks.PGD.__call__

    def spy(self, x, y, **kw):
        sizes.append(len(x))
        return original(self, x, y, **kw)

    monkeypatch.setattr(afs.attacks.PGD, "__call__", spy)
    return sizes


def test_merger_trains_only_the_merger_with_extractors_in_eval_mode(tmp_path):
    stack, data = _stack(), _random_data()
    before = [_flat(m) for m in stack.extractors]
    modes = []
    for m in stack.extractors:
        m.conv1.register_forward_hook(lambda mod, i, o: modes.append(mod.training))  # features() skips m.forward
    w0 = stack.merger.weight.detach().clone()
    train_merger(stack, _profile(), data, 0.5, "paired", run_dir=tmp_path / "m", progress=False)
    assert modes and not any(modes)
    assert all(torch.equal(b, _flat(m)) for b, m in zip(before, stack.extractors))
    assert all(p.grad is None for m in stack.extractors for p in m.parameters())
    assert not torch.equal(w0, stack.merger.weight)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert math.isclose(sum(metrics["importance_ratio"]), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5])
def test_split_mode_keeps_floor_alpha_b_clean_samples(tmp_path, monkeypatch, alpha):
    sizes = _record_attack_sizes(monkeypatch)
    data = _random_data(n=100)
    prof = dataclasses.replace(_profile(), merger=dataclasses.replace(_profile().merger, batch_size=10, epochs=1))
    train_merger(_stack(), prof, data, alpha, "split", run_dir=tmp_path / "m", progress=False)
    train_batches = sizes[: 100 // 10]  # then come the validation attacks on whole batches
    assert train_batches == [10 - split_count(alpha, 10)] * 10
    assert split_count(0.3, 10) == 3 and split_count(0.5, 7) == 3


def test_alpha_one_trains_on_clean_data_only(tmp_path, monkeypatch):
    sizes = _record_attack_sizes(monkeypatch)
    prof = dataclasses.replace(_profile(), merger=dataclasses.replace(_profile().merger, epochs=1))
    train_merger(_stack(), prof, _random_data(), 1.0, "paired", run_dir=tmp_path / "m", progress=False)
    assert sizes == []  # no attack in training, and none in validation: alpha = 1 selects on clean accuracy


def test_merger_bad_input(tmp_path):
    stack, data, prof = _stack(), _random_data(), _profile()
    with pytest.raises(ValueError, match=r"alpha .* \[0, 1\]"):
        train_merger(stack, prof, data, 1.5, run_dir=tmp_path / "m")
    with pytest.raises(ValueError, match="unknown merger mode"):
        train_merger(stack, prof, data, 0.5, "halves", run_dir=tmp_path / "m")
    with pytest.raises(TypeError, match="StackedModel"):
        train_merger(WideResNet(10, 1, 4), prof, data, 0.5, run_dir=tmp_path / "m")


def test_merger_kill_and_resume(tmp_path):
    data, prof = _random_data(), _profile()
    prof = dataclasses.replace(prof, merger=dataclasses.replace(prof.merger, epochs=3, lr_milestones=(2,)))
    a = train_merger(_stack(), prof, data, 0.5, run_dir=tmp_path / "a", progress=False)
    train_merger(_stack(), prof, data, 0.5, run_dir=tmp_path / "b", progress=False, stop_after=1)
    b = train_merger(_stack(), prof, data, 0.5, run_dir=tmp_path / "b", progress=False)
    assert torch.equal(a.merger.weight, b.merger.weight)
