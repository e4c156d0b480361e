"""Tests of afs.evaluation: accuracies and per-sample flags, determinism, batching, input forms, errors,
the accuracy-vs-eps curve and the trade-off score. Uses the standardly trained toy of tests/toys.py."""

from __future__ import annotations

import pytest
import torch

import toys
from afs.evaluation import EvalResult, evaluate, parse_attack, trade_off

EPS, STEP = 1 / 255, 0.25 / 255  # the toy keeps ~57% under PGD-10 here


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures `one_thread` and `net`: conftest.py


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return toys.make_data(120)


@pytest.fixture(scope="module")
def result(net, data) -> EvalResult:
    x, y = data
    return evaluate(net, x, y, ("clean", "pgd10", "pgd20", "fgsm", "pgd3"), eps=EPS, step_size=STEP, batch_size=50, progress=False)


def test_accuracies_are_percent_and_match_flags(net, data, result):
    x, y = data
    assert result.n == 120 and list(result.accuracy) == ["clean", "pgd10", "pgd20", "fgsm", "pgd3"]
    for name, flags in result.correct.items():
        assert flags.dtype == torch.bool and flags.shape == (120,) and flags.device.type == "cpu"
        assert result.accuracy[name] == pytest.approx(100.0 * flags.float().mean().item())
    assert result.accuracy["clean"] == pytest.approx(toys.accuracy(net, x, y))
    assert result.accuracy["clean"] > 90.0  # percent, not a fraction
    assert result.to_dict() == {"n": 120, "accuracy": result.accuracy}


def test_attack_strengths_are_ordered(result):
    acc = result.accuracy
    assert acc["pgd10"] < acc["clean"] - 20
    assert acc["pgd20"] <= acc["pgd10"] + 2.0
    assert acc["pgd10"] <= acc["pgd3"] + 2.0
    # Per sample an adversarial flag implies the clean one: a clean mistake is never robust.
    for name in ("pgd10", "pgd20", "fgsm", "pgd3"):
        assert not bool((result.correct[name] & ~result.correct["clean"]).any()), name


def test_pgd_runs_share_one_chain(net, data, result):
    # PGD-3, -10 and -20 ran as one 20-step chain from each batch's start; alone, each gives the same flags.
    x, y = data
    for name in ("pgd20", "pgd3"):
        alone = evaluate(net, x, y, (name,), eps=EPS, step_size=STEP, batch_size=50, progress=False)
        assert torch.equal(alone.correct[name], result.correct[name]), name


class _RightOnlyWhenPerturbed(torch.nn.Module):
    """Says class 1 on an image of whole 1/255 levels (every clean image), class 0 anywhere off that grid:
    with labels 0 it is wrong on every clean image and right on almost every perturbed one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        off_grid = (x - (x * 255).round().detach() / 255).abs().flatten(1).sum(1)  # 0 on the grid
        return torch.stack([1e4 * off_grid - 1, torch.zeros_like(off_grid)], 1)


def test_a_clean_mistake_is_never_robust():
    # Robust accuracy counts an image only if the clean one is right too (as AutoAttack does); counting the
    # attack's output alone would give this model ~100% "robust" accuracy at 0% clean.
    x = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(20, dtype=torch.long)
    model = _RightOnlyWhenPerturbed()
    res = evaluate(model, x, y, ("clean", "pgd5", "fgsm"), eps=EPS, step_size=STEP, batch_size=8, progress=False)
    assert res.accuracy == {"clean": 0.0, "pgd5": 0.0, "fgsm": 0.0}
    start = (x.float() / 255 + 0.5 / 255).clamp(0, 1)  # off the grid, inside the ball: the model is right there
    assert bool((model(start).argmax(1) == 0).all())


def test_deterministic_for_a_seed(net, data, result):
    x, y = data
    again = evaluate(net, x, y, ("pgd10",), eps=EPS, step_size=STEP, batch_size=50, progress=False)
    assert torch.equal(again.correct["pgd10"], result.correct["pgd10"])
    # A batch's starts depend on (seed, batch index) only: the first two batches come out the same
    # whether or not a third one follows.
    head = evaluate(net, x[:100], y[:100], ("pgd10",), eps=EPS, step_size=STEP, batch_size=50, progress=False)
    assert torch.equal(head.correct["pgd10"], result.correct["pgd10"][:100])


def test_seed_changes_the_starts(net, data):
    x, y = data
    a = evaluate(net, x, y, ("pgd1",), eps=4 / 255, step_size=0.5 / 255, seed=0, progress=False)
    b = evaluate(net, x, y, ("pgd1",), eps=4 / 255, step_size=0.5 / 255, seed=1, progress=False)
    assert not torch.equal(a.correct["pgd1"], b.correct["pgd1"])


def test_clean_is_independent_of_batch_size(net, data, result):
    x, y = data
    for bs in (1, 7, 500):
        r = evaluate(net, x, y, ("clean",), batch_size=bs, progress=False)
        assert torch.equal(r.correct["clean"], result.correct["clean"])


def test_uint8_input(net, data):
    x, y = data
    x8 = (x * 255).round().to(torch.uint8)
    r8 = evaluate(net, x8, y, ("clean", "pgd2"), eps=EPS, step_size=STEP, progress=False)
    rf = evaluate(net, x8.float() / 255, y, ("clean", "pgd2"), eps=EPS, step_size=STEP, progress=False)
    assert torch.equal(r8.correct["clean"], rf.correct["clean"])
    assert torch.equal(r8.correct["pgd2"], rf.correct["pgd2"])


def test_model_modes_restored(data):
    model = toys.DropoutNet(toys.trained_tiny_net()).train()
    model.model.head.eval()  # mixed state
    before = [m.training for m in model.modules()]
    x, y = data
    r = evaluate(model, x[:20], y[:20], ("clean", "pgd1"), progress=False)
    assert [m.training for m in model.modules()] == before
    # Clean accuracy was measured in eval mode (dropout off): it matches the eval-mode model's.
    assert r.accuracy["clean"] == pytest.approx(toys.accuracy(model, x[:20], y[:20]))
    assert all(p.grad is None for p in model.parameters())


def test_autoattack_through_evaluate(net):
    x, y = toys.make_data(12)
    r = evaluate(net, x, y, ("clean", "aa"), eps=EPS, progress=False,
                 aa_kwargs={"version": "custom", "attacks": ["apgd-ce"]})  # fmt: skip
    assert r.accuracy["aa"] < r.accuracy["clean"]
    assert bool((r.correct["aa"] <= r.correct["clean"]).all())


def test_attack_names():
    assert parse_attack("pgd20") == ("pgd", 20, 1) and parse_attack("PGD7") == ("pgd", 7, 1)
    assert parse_attack("pgd50x3") == ("pgd", 50, 3) and parse_attack("cw20") == ("cw", 20, 1)
    assert parse_attack("clean") == ("clean", 0, 1) and parse_attack("aa") == ("aa", 0, 1)
    for bad in ("pgd", "pgd0", "pgdx", "cw", "pgd-10", ""):
        with pytest.raises(ValueError, match="valid forms"):
            parse_attack(bad)


def test_bad_inputs(net, data):
    x, y = data
    with pytest.raises(ValueError, match="valid forms: 'clean', 'fgsm', 'aa'"):
        evaluate(net, x, y, ("clean", "pgd"), progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(net, x, y, (), progress=False)
    with pytest.raises(ValueError, match="shape"):
        evaluate(net, x, y[:10], progress=False)
    with pytest.raises(ValueError, match="4-D"):
        evaluate(net, x[0], y, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(net, x * 255, y, progress=False)
    with pytest.raises(TypeError, match="integer"):
        evaluate(net, x, y.float(), progress=False)
    with pytest.raises(ValueError, match="eps"):
        evaluate(net, x, y, ("pgd10",), eps=-1.0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(net, x, y, batch_size=0, progress=False)


def test_accuracy_falls_as_eps_grows(net, data):
    x, y = data
    accs = [evaluate(net, x, y, ("pgd5",), eps=e / 255, step_size=e / 255 / 4, progress=False).accuracy["pgd5"]
            for e in (0.0, 0.5, 1, 2, 4)]
    assert accs[0] == pytest.approx(toys.accuracy(net, x, y))  # eps = 0 is clean accuracy
    assert all(b <= a + 2.0 for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] <= 2.0


def test_trade_off():
    assert trade_off(90.0, 50.0) == 70.0
    assert trade_off(85.15, 51.02) == pytest.approx(68.085)  # Table IV, PGD-AT row (printed as 68.08)


def test_label_out_of_range_is_caught_before_running(net, data):
    x, y = data
    with pytest.raises(ValueError, match="10 classes"):
        evaluate(net, x, torch.full_like(y, 10), ("clean",), progress=False)
