"""Tests of afs.attacks: PGD against an independent textbook loop, the threat-model constraints, the
authors' variant, model-mode and gradient hygiene, the compiled loop, and the AutoAttack wrapper.

The toy task (tests/toys.py) is standardly trained, hence accurate (~96%) but not robust: PGD-10 at
1/255 leaves ~57%, at 4/255 and above ~0%. The thresholds below rely on that.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import toys
from afs.attacks import PGD, Loss, Start, fgsm
from afs.autoattack import AutoAttackWarning, autoattack

EPS_MID = 1 / 255  # the toy's accuracy under PGD-10 is ~57% here: room to see differences
ALPHA_MID = EPS_MID / 4


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures `one_thread` and `net`: conftest.py


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return toys.make_data(200)


def textbook_pgd(model, x, y, eps, alpha, steps, *, start=None, gen=None):
    """Madry et al.'s PGD written from scratch: uniform start, sign step, clip to the ball, clamp to the box."""
    if start is None:
        start = x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps
    x_adv = start.clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(1)


# --------------------------------------------------------------------------------------------------------
# Against an independent reference
# --------------------------------------------------------------------------------------------------------
def test_pgd_without_start_equals_textbook_loop_exactly(net, data):
    x, y = data
    ours = PGD(net, eps=EPS_MID, step_size=ALPHA_MID, steps=10, start="none")(x, y)
    ref = textbook_pgd(net, x, y, EPS_MID, ALPHA_MID, 10, start=x)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_pgd_robust_accuracy_matches_textbook_loop(net, data):
    x, y = data
    ours = [toys.accuracy(net, PGD(net, eps=EPS_MID, step_size=ALPHA_MID)(x, y, seed=s), y) for s in range(3)]
    ref = [
        toys.accuracy(net, textbook_pgd(net, x, y, EPS_MID, ALPHA_MID, 10, gen=torch.Generator().manual_seed(100 + s)), y)
        for s in range(3)
    ]
    assert 30 < sum(ref) / 3 < 85, "the toy no longer sits in the informative range at 1/255"
    assert abs(sum(ours) / 3 - sum(ref) / 3) <= 3.0


def test_fgsm_is_one_signed_step(net, data):
    x, y = data
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="sum"), xr)
    expected = (x + EPS_MID * g.sign()).clamp(0, 1)
    assert torch.allclose(fgsm(net, eps=EPS_MID)(x, y), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------
# Threat model
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start", ["uniform", "authors", "none"])
def test_inside_ball_and_box(net, start):
    eps = 8 / 255
    x, y = toys.make_data(40)
    x[:, :, 0] = 0.0  # pixels on the box's faces, where the clamp matters
    x[:, :, 1] = 1.0
    x_adv = PGD(net, eps=eps, step_size=eps / 4, steps=5, start=start)(x, y, seed=0)
    dist = linf(x_adv, x)
    assert float(dist.max()) <= eps + 1e-5
    assert float(dist.max()) > 0.5 * eps  # it did move
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_per_sample_eps(net, data):
    x, y = data
    eps = torch.linspace(0, 4 / 255, x.shape[0])
    x_adv = PGD(net, eps=eps, step_size=eps / 4)(x, y, seed=0)
    assert bool((linf(x_adv, x) <= eps + 1e-6).all())
    assert torch.equal(x_adv[0], x[0])  # eps = 0 for the first sample


def test_eps_zero_gives_clean_accuracy(net, data):
    x, y = data
    x_adv = PGD(net, eps=0.0, step_size=2 / 255)(x, y, seed=0)
    assert torch.equal(x_adv, x)
    assert toys.accuracy(net, x_adv, y) == toys.accuracy(net, x, y)


def test_undefended_model_falls_to_zero_at_8_255(net, data):
    x, y = data
    assert toys.accuracy(net, x, y) >= 90.0
    assert toys.accuracy(net, PGD(net)(x, y, seed=0), y) <= 1.0


def test_accuracy_falls_monotonically_with_eps(net, data):
    x, y = data
    accs = [toys.accuracy(net, PGD(net, eps=e / 255, step_size=e / 255 / 4)(x, y, seed=0), y) for e in (0, 0.5, 1, 1.5, 2, 3, 4)]
    assert all(b <= a + 1.5 for a, b in zip(accs, accs[1:])), accs
    assert accs[0] - accs[-1] > 80.0, accs


def test_more_steps_and_restarts_never_help_the_model(net, data):
    x, y = data
    acc10 = toys.accuracy(net, PGD(net, eps=EPS_MID, step_size=ALPHA_MID, steps=10)(x, y, seed=0), y)
    acc20 = toys.accuracy(net, PGD(net, eps=EPS_MID, step_size=ALPHA_MID, steps=20)(x, y, seed=0), y)
    assert acc20 <= acc10 + 1.0
    # With one seed the first restart IS the single-restart run, so per sample a restart can only break more.
    one = net(PGD(net, eps=EPS_MID, step_size=ALPHA_MID)(x, y, seed=3)).argmax(1) == y
    three = net(PGD(net, eps=EPS_MID, step_size=ALPHA_MID, restarts=3)(x, y, seed=3)).argmax(1) == y
    assert bool((three <= one).all())
    assert int(three.sum()) < int(one.sum())  # and at 1/255 restarts do find more


def test_stacked_model(net):
    x, y = toys.make_data(40)
    stack = toys.ToyStack([toys.trained_tiny_net(), toys.trained_tiny_net(seed=4)])
    x_adv = PGD(stack, eps=8 / 255)(x, y, seed=0)
    assert float(linf(x_adv, x).max()) <= 8 / 255 + 1e-6
    assert toys.accuracy(stack, x_adv, y) < toys.accuracy(stack, x, y) or toys.accuracy(stack, x, y) == 0.0
    assert all(p.grad is None for p in stack.parameters())


# --------------------------------------------------------------------------------------------------------
# The authors' variant
# --------------------------------------------------------------------------------------------------------
def test_authors_start_is_triangular_and_uniform_is_uniform():
    x = torch.full((64, 3, 16, 16), 0.5)  # mid-grey: the box never cuts the start
    net = toys.TinyNet()
    eps = 8 / 255
    mean_abs = {}
    for start in ("uniform", "authors"):
        x0 = PGD(net, eps=eps, steps=0, start=start)(x, torch.zeros(64, dtype=torch.long), seed=0)
        mean_abs[start] = float((x0 - x).abs().mean() / eps)
        assert float(linf(x0, x).max()) <= eps + 1e-6
    assert abs(mean_abs["uniform"] - 1 / 2) < 0.01  # E|U(-1,1)| = 1/2
    assert abs(mean_abs["authors"] - 1 / 3) < 0.01  # E|U - U'| = 1/3


class _InputRange(torch.nn.Module):
    """Records the min/max of every input the wrapped model sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append((float(x.detach().min()), float(x.detach().max())))
        return self.model(x)


def test_authors_iterates_leave_the_box_but_not_the_result(net):
    x, y = toys.make_data(40)
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0
    for start, may_leave in (("uniform", False), ("authors", True)):
        spy = _InputRange(net)
        x_adv = PGD(spy, eps=8 / 255, steps=5, start=start)(x, y, seed=0)
        # Forward calls: a one-sample probe, the start, then the iterates after steps 1..4.
        assert len(spy.seen) == 1 + 5
        outside = [lo < 0 or hi > 1 for lo, hi in spy.seen]
        assert outside[1] == may_leave  # the start
        assert any(outside[2:]) == may_leave  # iterates after gradient steps
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


# --------------------------------------------------------------------------------------------------------
# Mode, gradients, seeds, repr
# --------------------------------------------------------------------------------------------------------
class _ModeSpy(torch.nn.Module):
    def __init__(self, model, fail_after=None):
        super().__init__()
        self.model, self.modes, self.fail_after = model, [], fail_after

    def forward(self, x):
        self.modes.append(self.training)
        if self.fail_after is not None and len(self.modes) > self.fail_after:
            raise RuntimeError("boom")
        return self.model(x)


@pytest.mark.parametrize("make", [lambda m: PGD(m, restarts=2), lambda m: fgsm(m)])
@pytest.mark.parametrize("start_training", [True, False])
def test_eval_mode_during_attack_and_modes_restored(make, start_training):
    spy = _ModeSpy(toys.DropoutNet(toys.trained_tiny_net()))
    spy.train(start_training)
    spy.model.model.conv1.train(not start_training)  # a mixed state must come back exactly
    before = [m.training for m in spy.modules()]
    x, y = toys.make_data(8)
    make(spy)(x, y, seed=0)
    assert spy.modes and not any(spy.modes)
    assert [m.training for m in spy.modules()] == before
    assert all(p.grad is None for p in spy.parameters())


def test_modes_restored_after_exception():
    spy = _ModeSpy(toys.trained_tiny_net(), fail_after=3).train()
    x, y = toys.make_data(8)
    with pytest.raises(RuntimeError, match="boom"):
        PGD(spy)(x, y, seed=0)
    assert spy.training and all(m.training for m in spy.modules())
    assert all(p.grad is None for p in spy.parameters())


def test_parameters_never_get_grad_even_if_they_require_it():
    model = toys.trained_tiny_net()
    assert all(p.requires_grad for p in model.parameters())
    x, y = toys.make_data(8)
    for attack in (PGD(model), PGD(model, start="authors", loss="margin"), fgsm(model)):
        attack(x, y, seed=0)
    assert all(p.grad is None for p in model.parameters())


def test_seed_determinism(net):
    x, y = toys.make_data(16)
    for start in ("uniform", "authors"):
        a = PGD(net, eps=EPS_MID, step_size=ALPHA_MID, start=start)
        assert torch.equal(a(x, y, seed=7), a(x, y, seed=7))
        assert not torch.equal(a(x, y, seed=7), a(x, y, seed=8))
    # seed=None: torch's global RNG, so torch.manual_seed repeats it
    g = PGD(net, eps=EPS_MID, step_size=ALPHA_MID)
    torch.manual_seed(0)
    first = g(x, y)
    torch.manual_seed(0)
    assert torch.equal(first, g(x, y))


def test_uniform_start_is_the_kernels_random_start(net):
    # One start implementation: PGD-0 from a seed is afs_kernels.random_start drawn from that seed.
    import afs_kernels

    x, y = toys.make_data(16)
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(PGD(net, steps=0)(x, y, seed=5), afs_kernels.random_start(x, 8 / 255, generator=gen))


def test_continuing_from_an_iterate_is_the_longer_run(net):
    # PGD-10's output plus 10 more steps is PGD-20 from the same start, bit for bit (evaluate relies on it).
    x, y = toys.make_data(16)
    ten = PGD(net, eps=EPS_MID, step_size=ALPHA_MID, steps=10)(x, y, seed=3)
    more = PGD(net, eps=EPS_MID, step_size=ALPHA_MID, steps=10)(x, y, start_from=ten)
    assert torch.equal(more, PGD(net, eps=EPS_MID, step_size=ALPHA_MID, steps=20)(x, y, seed=3))
    with pytest.raises(ValueError, match="restarts=2"):
        PGD(net, restarts=2)(x, y, seed=0, start_from=ten)
    with pytest.raises(ValueError, match="start_from must match"):
        PGD(net)(x, y, seed=0, start_from=ten[:4])


def test_repr_shows_settings(net):
    r = repr(PGD(net, steps=20, restarts=2, start="authors", loss="margin"))
    for part in ("eps=0.0314 (8/255)", "step_size=0.0078 (2/255)", "steps=20", "start=authors", "restarts=2",
                 "loss=margin", "compile=False"):
        assert part in r, (part, r)
    assert repr(fgsm(net, eps=4 / 255)).startswith("PGD(eps=0.0157 (4/255), step_size=0.0157 (4/255), steps=1, start=none")


def test_enums_accept_either_form():
    assert Start("AUTHORS") is Start.AUTHORS and Loss(Loss.MARGIN) is Loss.MARGIN
    assert PGD(toys.TinyNet(), start=Start.NONE, loss="CE").loss is Loss.CE


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"eps": -0.1}, ValueError, "eps"),
        ({"eps": 1.5}, ValueError, "eps"),
        ({"step_size": -1.0}, ValueError, "step_size"),
        ({"steps": -1}, ValueError, "steps"),
        ({"steps": 2.5}, ValueError, "steps"),
        ({"restarts": 0}, ValueError, "restarts"),
        ({"restarts": 2, "start": "none"}, ValueError, "restarts"),
        ({"start": "gaussian"}, ValueError, "start"),
        ({"loss": "hinge"}, ValueError, "loss"),
        ({"compile": "yes"}, TypeError, "compile"),
        ({"eps": "8/255"}, TypeError, "eps"),
    ],
)
def test_bad_settings(kwargs, err, match):
    with pytest.raises(err, match=match):
        PGD(toys.TinyNet(), **kwargs)


def test_bad_inputs(net):
    x, y = toys.make_data(8)
    attack = PGD(net)
    cases = [
        ((x * 255).to(torch.uint8), y, TypeError, "floating"),
        (x[0], y, ValueError, "4-D"),
        (x + 1.0, y, ValueError, r"\[0, 1\]"),
        (x, y.float(), TypeError, "integer"),
        (x, y[:4], ValueError, "shape"),
        (x, torch.full_like(y, toys.N_CLASSES), ValueError, "10 classes"),
        (x, -y - 1, ValueError, "negative"),
    ]
    for xi, yi, err, match in cases:
        with pytest.raises(err, match=match):
            attack(xi, yi, seed=0)
    with pytest.raises(ValueError, match="seed"):
        attack(x, y, seed=-1)
    with pytest.raises(ValueError, match=r"shape \[B\]=\[8\]"):
        PGD(net, eps=torch.full((3,), 0.01))(x, y)
    with pytest.raises(TypeError, match="nn.Module"):
        PGD(lambda t: t)


# --------------------------------------------------------------------------------------------------------
# Compiled loop (aot_eager: no Inductor compile in the tests)
# --------------------------------------------------------------------------------------------------------
def test_compiled_loop_agrees_with_eager(net, data):
    x, y = data
    eager = PGD(net, eps=EPS_MID, step_size=ALPHA_MID)(x, y, seed=0)
    graphs = []

    def counting(gm, example_inputs):  # a torch.compile backend that records each graph it is given
        graphs.append(gm)
        return gm.forward

    compiled = PGD(net, eps=EPS_MID, step_size=ALPHA_MID, compile={"backend": counting})(x, y, seed=0)
    assert graphs, "compile= did not reach torch.compile"
    assert float(linf(compiled, x).max()) <= EPS_MID + 1e-6
    # The same start; the steps differ only where a gradient sign flips in float noise.
    assert (compiled != eager).float().mean().item() <= 0.02
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())  # frozen only during the call


# --------------------------------------------------------------------------------------------------------
# AutoAttack
# --------------------------------------------------------------------------------------------------------
QUICK = {"version": "custom", "attacks": ["apgd-ce", "apgd-t"]}


def test_autoattack_standard_is_at_least_as_strong_as_pgd(net):
    x, y = toys.make_data(16)
    res = autoattack(net, x, y, eps=EPS_MID, batch_size=16)  # the full standard ensemble, ~10 s
    assert res.robust.dtype == torch.bool and res.robust.shape == (16,)
    assert res.robust_accuracy == pytest.approx(100.0 * res.robust.float().mean().item())
    clean = net(x).argmax(1) == y
    assert res.clean_accuracy == pytest.approx(100.0 * clean.float().mean().item())
    assert bool((res.robust <= clean).all())  # a robust sample is a correctly classified one
    pgd = net(PGD(net, eps=EPS_MID, step_size=ALPHA_MID)(x, y, seed=0)).argmax(1) == y
    assert res.robust_accuracy <= 100.0 * pgd.float().mean().item()
    assert res.robust_accuracy < res.clean_accuracy


def test_autoattack_seeded_repeatable_and_leaves_global_rng_alone(net):
    x, y = toys.make_data(12)
    rng = torch.get_rng_state()
    a = autoattack(net, x, y, eps=EPS_MID, seed=1, version="custom", attacks=["apgd-ce"])
    assert torch.equal(rng, torch.get_rng_state())
    b = autoattack(net, x, y, eps=EPS_MID, seed=1, version="custom", attacks=["apgd-ce"])
    assert torch.equal(a.robust, b.robust) and a.robust_accuracy == b.robust_accuracy


def test_autoattack_resume_from_state(net, tmp_path, monkeypatch):
    import pyautoattack

    x, y = toys.make_data(12)
    path = tmp_path / "aa_state.json"
    full = autoattack(net, x, y, eps=EPS_MID, state_path=str(path), **QUICK)  # str accepted
    assert path.exists()
    state = json.loads(path.read_text())
    assert sorted(state["_run_attacks"]) == ["apgd-ce", "apgd-t"]
    assert state["_robust_flags"] == full.robust.tolist()

    # A finished evaluation is returned from the state, with no attack run at all.
    def no_rerun(*args, **kwargs):
        raise AssertionError("AutoAttack ran again although the state file says it is finished")

    with monkeypatch.context() as m:
        m.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", no_rerun)
        again = autoattack(net, x, y, eps=EPS_MID, state_path=path, **QUICK)
    assert torch.equal(again.robust, full.robust) and again.clean_accuracy == full.clean_accuracy

    # An interrupted one (only APGD-CE done, state written the way pyautoattack writes it) resumes to the
    # same flags as the uninterrupted run.
    ce = autoattack(net, x, y, eps=EPS_MID, version="custom", attacks=["apgd-ce"])
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({
        "_attacks_to_run": str({"apgd-ce", "apgd-t"}), "path": str(partial), "_run_attacks": ["apgd-ce"],
        "_robust_flags": ce.robust.tolist(), "_last_saved": "2024-01-01 00:00:00", "_SAVE_TIMEOUT": 60,
        "_clean_accuracy": ce.clean_accuracy / 100,
    }))  # fmt: skip
    resumed = autoattack(net, x, y, eps=EPS_MID, state_path=partial, **QUICK)
    assert torch.equal(resumed.robust, full.robust)
    assert sorted(json.loads(partial.read_text())["_run_attacks"]) == ["apgd-ce", "apgd-t"]

    with pytest.raises(ValueError, match="made for attacks"):
        autoattack(net, x, y, eps=EPS_MID, state_path=path, version="custom", attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="12"):
        autoattack(net, x[:6], y[:6], eps=EPS_MID, state_path=path, **QUICK)


def test_autoattack_surfaces_its_warnings():
    x, y = toys.make_data(8)
    noisy = toys.NoisyLogits(toys.trained_tiny_net())
    with pytest.warns(AutoAttackWarning, match="randomized"):
        autoattack(noisy, x, y, eps=EPS_MID, version="custom", attacks=["apgd-ce"])


def test_autoattack_eval_mode_and_modes_restored():
    # Dropout in train mode would look randomised to AutoAttack's check: no warning proves eval mode.
    model = toys.DropoutNet(toys.trained_tiny_net()).train()
    x, y = toys.make_data(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoAttackWarning)
        autoattack(model, x, y, eps=EPS_MID, version="custom", attacks=["apgd-ce"])
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_autoattack_bad_arguments(net):
    x, y = toys.make_data(4)
    with pytest.raises(ValueError, match="seed"):
        autoattack(net, x, y, seed=None)
    with pytest.raises(ValueError, match="attacks="):
        autoattack(net, x, y, version="custom")
    with pytest.raises(ValueError, match="only used with version=.custom."):
        autoattack(net, x, y, attacks=["apgd-ce"])
    with pytest.raises(ValueError, match="unknown AutoAttack attack"):
        autoattack(net, x, y, version="custom", attacks=["pgd"])
    with pytest.raises(TypeError, match="per-sample"):
        autoattack(net, x, y, eps=torch.full((4,), 0.01))
    with pytest.raises(ValueError, match="eps"):
        autoattack(net, x, y, eps=2.0)
    with pytest.raises(ValueError, match="> 0"):
        autoattack(net, x, y, eps=0.0)
    with pytest.raises(ValueError, match="version"):
        autoattack(net, x, y, version="fast")
    with pytest.raises(TypeError, match="floating"):
        autoattack(net, (x * 255).to(torch.uint8), y)
