"""The project's single PGD loop: ``pgd_loop``, eager and ``torch.compile``d (``compile=``).

Compiled tests use ``backend="aot_eager"`` (or a counting wrapper of it); exactly one test uses Inductor.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from afs_kernels import pgd_loop, random_start
from afs_kernels.attack_loop import COMPILED_PIXEL_TOLERANCE, sum_cross_entropy

N_CLASSES = 3


class TinyNet(nn.Module):
    """A deterministic little CNN on (N, 3, 8, 8) inputs: conv -> BN -> ReLU -> pool -> linear."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input it sees (= every PGD iterate before its step)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.fixture()
def model() -> TinyNet:
    return TinyNet().eval()


@pytest.fixture()
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 8, 8, generator=gen)
    y = torch.randint(0, N_CLASSES, (12,), generator=gen)
    return x, y


@pytest.fixture()
def fresh_dynamo():
    """Each compile test starts from empty Dynamo caches, so compile counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).reshape(a.shape[0], -1).abs().amax(dim=1)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


class CountingBackend:
    """A ``torch.compile`` backend that counts compilations and delegates to aot_eager."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


# --------------------------------------------------------------------------------------------------------
# Eager loop
# --------------------------------------------------------------------------------------------------------
def test_iterates_stay_in_ball_and_box(model, data):
    x, y, eps = *data, 8 / 255
    rec = Recorder(model)
    start = random_start(x, eps, seed=0)
    out = pgd_loop(rec, x, y, start, eps, eps / 4, 5)
    iterates = rec.seen[1:] + [out]  # seen[0] is the start; then one per step, the last one is returned
    assert len(rec.seen) == 5
    for it in iterates:
        assert bool((_linf(it, x) <= eps * (1 + 1e-5)).all())
        assert float(it.min()) >= 0.0 and float(it.max()) <= 1.0
    assert not out.requires_grad
    # The attack moved: most samples end near the surface of the ball.
    assert (_linf(out, x) > 0.5 * eps).float().mean().item() > 0.5


def test_per_sample_budgets(model, data):
    x, y = data
    eps = torch.linspace(0, 12 / 255, x.shape[0])
    out = pgd_loop(model, x, y, random_start(x, eps, seed=1), eps, eps / 4, 4)
    assert bool((_linf(out, x) <= eps + 1e-6).all())
    assert torch.equal(out[0], x[0])  # eps = 0 for sample 0


def test_eps_zero_returns_x_nat(model, data):
    x, y = data
    out = pgd_loop(model, x, y, x.clone(), 0.0, 0.1, 3)
    assert torch.equal(out, x)


def test_no_parameter_gradients_and_mode_untouched(model, data):
    x, y = data
    assert all(p.requires_grad for p in model.parameters())
    for training in (False, True):
        model.train(training)
        pgd_loop(model, x, y, random_start(x, 8 / 255, seed=0), 8 / 255, 2 / 255, 2)
        assert model.training is training, "pgd_loop must leave train/eval to the caller"
    assert all(p.grad is None for p in model.parameters()), "an attack populated a parameter's .grad"
    assert all(p.requires_grad for p in model.parameters())


def test_attack_increases_loss_and_runs_under_no_grad(model, data):
    x, y = data
    with torch.no_grad():  # evaluation code calls the attack under no_grad: it must still get gradients
        adv = pgd_loop(model, x, y, x.clone(), 8 / 255, 2 / 255, 5)
        clean_loss = sum_cross_entropy(model(x), y).item()
        adv_loss = sum_cross_entropy(model(adv), y).item()
    assert adv_loss > clean_loss


def test_steps_zero_returns_start(model, data):
    x, y = data
    start = random_start(x, 8 / 255, seed=0)
    assert torch.equal(pgd_loop(model, x, y, start, 8 / 255, 2 / 255, 0), start)


def test_authors_variant_differs_only_by_box_clamping(model, data):
    x, y = data
    eps, step = 16 / 255, 4 / 255
    # Interior pixels: the box clamp never acts, so both variants give the same iterate.
    x_mid = 0.3 + 0.4 * x
    start = x_mid + eps * (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    a = pgd_loop(model, x_mid, y, start, eps, step, 4)
    b = pgd_loop(model, x_mid, y, start, eps, step, 4, clamp_box_each_step=False)
    assert torch.equal(a, b)
    # Pixels on the box edges: the authors' iterates leave [0, 1] during the loop; the result does not.
    x_edge = (x > 0.5).float()
    gen = torch.Generator().manual_seed(1)
    start = x_edge + (torch.rand(x.shape, generator=gen) - torch.rand(x.shape, generator=gen)) * eps  # (U-U)*eps
    rec = Recorder(model)
    authors = pgd_loop(rec, x_edge, y, start, eps, step, 4, clamp_box_each_step=False)
    assert any(float(it.min()) < 0.0 or float(it.max()) > 1.0 for it in rec.seen[1:]), "never left the box"
    assert float(authors.min()) >= 0.0 and float(authors.max()) <= 1.0
    assert bool((_linf(authors, x_edge) <= eps + 1e-6).all())
    standard = pgd_loop(model, x_edge, y, start.clamp(0, 1), eps, step, 4)
    assert not torch.equal(authors, standard)


def test_custom_loss_fn(model, data):
    x, y = data
    # Descending the loss (a "targeted" style objective) must lower it, not raise it.
    out = pgd_loop(model, x, y, x.clone(), 8 / 255, 2 / 255, 5, loss_fn=lambda z, t: -F.cross_entropy(z, t))
    with torch.no_grad():
        assert F.cross_entropy(model(out), y) < F.cross_entropy(model(x), y)


def test_pgd_loop_errors(model, data):
    x, y = data
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        pgd_loop(model, x, y, x, 0.1, 0.01, -1)
    with pytest.raises(ValueError, match=r"y must have shape \[B\]"):
        pgd_loop(model, x, y[:3], x, 0.1, 0.01, 1)
    with pytest.raises(TypeError, match="integer class labels"):
        pgd_loop(model, x, y.float(), x, 0.1, 0.01, 1)
    with pytest.raises(ValueError, match="shape mismatch: x_start"):
        pgd_loop(model, x, y, x[:2], 0.1, 0.01, 1)
    with pytest.raises(ValueError, match=r"x_nat must lie in the \[0, 1\] pixel box"):
        pgd_loop(model, x * 255, y, x * 255, 0.1, 0.01, 1)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        pgd_loop(model, x, y, x, -0.1, 0.01, 1)
    with pytest.raises(ValueError, match="device mismatch: model parameters"):
        pgd_loop(copy.deepcopy(model).to("meta"), x, y, x, 0.1, 0.01, 1)
    with pytest.raises(TypeError, match="model must be callable"):
        pgd_loop(None, x, y, x, 0.1, 0.01, 1)
    with pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        with torch.inference_mode():
            pgd_loop(model, x, y, x, 0.1, 0.01, 1)
    with pytest.raises(ValueError, match="does not depend on the input"):
        pgd_loop(lambda t: torch.zeros(t.shape[0], N_CLASSES, requires_grad=True), x, y, x, 0.1, 0.01, 1)


# --------------------------------------------------------------------------------------------------------
# Compiled loop (aot_eager except one Inductor test)
# --------------------------------------------------------------------------------------------------------
def test_compiled_budget_sweep_compiles_once(model, data, fresh_dynamo):
    x, y = data
    counter = CountingBackend()
    opts = {"backend": counter, "fullgraph": True}  # fullgraph: a graph break would raise
    eager_model = copy.deepcopy(model)
    budgets = [2 / 255, torch.tensor(4 / 255), torch.linspace(0, 8 / 255, x.shape[0])]  # float, 0-d, [B]
    for eps in budgets:
        out = pgd_loop(model, x, y, x.clone(), eps, 1 / 255, 3, compile=opts)
        ref = pgd_loop(eager_model, x, y, x.clone(), eps, 1 / 255, 3)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert counter.compiles == 1, f"{counter.compiles} compilations for a sweep over 3 budgets"
    pgd_loop(model, x, y, x.clone(), 8 / 255, 2 / 255, 7, compile=opts)  # a new step count: no new graph
    assert counter.compiles == 1


def test_compiled_agrees_with_eager_and_freezes_parameters(model, data, fresh_dynamo):
    x, y = data
    model.fc.weight.requires_grad_(False)  # a caller's own frozen parameter must stay frozen
    flags = [p.requires_grad for p in model.parameters()]
    eps = 16 / 255
    start = random_start(x, eps, seed=2)
    eager = pgd_loop(model, x, y, start, eps, eps / 4, 5)
    compiled = pgd_loop(model, x, y, start, eps, eps / 4, 5, compile={"backend": "aot_eager"})
    assert bool((_linf(compiled, x) <= eps * (1 + 1e-5)).all())
    assert float(compiled.min()) >= 0.0 and float(compiled.max()) <= 1.0
    # Robust accuracy within noise (here one sample of 12); not a bitwise comparison.
    assert abs(_accuracy(model, compiled, y) - _accuracy(model, eager, y)) <= 1 / 12 + 1e-9
    assert [p.requires_grad for p in model.parameters()] == flags, "requires_grad not restored"
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_compiled_train_mode_updates_batchnorm_like_eager(data, fresh_dynamo):
    """A BatchNorm in train mode mutates its running stats inside the gradient transform: still allowed."""
    x, y = data
    eager_model, compiled_model = TinyNet().train(), TinyNet().train()
    a = pgd_loop(eager_model, x, y, x.clone(), 8 / 255, 2 / 255, 2, clamp_box_each_step=False)
    b = pgd_loop(compiled_model, x, y, x.clone(), 8 / 255, 2 / 255, 2, clamp_box_each_step=False,
                 compile={"backend": "aot_eager"})
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled_model.bn.running_mean, eager_model.bn.running_mean)
    assert int(compiled_model.bn.num_batches_tracked) == int(eager_model.bn.num_batches_tracked) == 2
    assert compiled_model.training


class _Bf16(nn.Module):
    """The model under bf16 autocast (what ``afs.runs.AutocastModel`` does for the profiles)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x)


def test_compiled_bf16_and_channels_last(data, fresh_dynamo):
    x, y = data
    model = TinyNet().eval()
    fast = _Bf16(copy.deepcopy(model).to(memory_format=torch.channels_last))
    xc = x.contiguous(memory_format=torch.channels_last)
    eps = 8 / 255
    out = pgd_loop(fast, xc, y, random_start(xc, eps, seed=0), eps, 2 / 255, 3, compile={"backend": "aot_eager"})
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool((_linf(out, x) <= eps + 1e-6).all())
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    with torch.no_grad():
        assert sum_cross_entropy(model(out), y) > sum_cross_entropy(model(x), y)


def test_compiled_cache_does_not_keep_models_alive(data):
    from afs_kernels.attack_loop import _COMPILED

    x, y = data
    model = TinyNet()
    ref = weakref.ref(model)
    pgd_loop(model, x, y, x.clone(), 8 / 255, 2 / 255, 1, compile={"backend": "aot_eager"})
    pgd_loop(model, x, y, x.clone(), 8 / 255, 2 / 255, 1, compile={"backend": "aot_eager"})
    assert len(_COMPILED[model]) == 1, "the compiled step must be cached per (model, options)"
    pgd_loop(model, x, y, x.clone(), 8 / 255, 2 / 255, 1, compile={"backend": "aot_eager", "dynamic": False})
    assert len(_COMPILED[model]) == 2  # other options, other entry
    del model
    gc.collect()
    assert ref() is None, "the compiled-step cache leaked its model"


def test_compiled_errors(model, data):
    x, y = data
    with pytest.raises(TypeError, match="nn.Module"):
        pgd_loop(lambda t: t, x, y, x, 0.1, 0.01, 1, compile={"backend": "aot_eager"})
    with pytest.raises(TypeError, match="dict of torch.compile options"):
        pgd_loop(model, x, y, x, 0.1, 0.01, 1, compile="inductor")
    with pytest.raises(ValueError, match="per-sample eps"):
        pgd_loop(model, x, y, x, torch.zeros(5), 0.1, 1, compile={"backend": "aot_eager"})


def test_inductor_compiled_matches_eager(model, data, fresh_dynamo):
    """The suite's only Inductor compile: small batch, two steps."""
    x, y = data
    x, y = x[:4], y[:4]
    start = random_start(x, 8 / 255, seed=0)
    out = pgd_loop(model, x, y, start, 8 / 255, 2 / 255, 2, compile={})
    ref = pgd_loop(model, x, y, start, 8 / 255, 2 / 255, 2)
    # Inductor may reorder float ops: a pixel whose gradient is ~0 can flip its sign step.
    assert (out - ref).abs().gt(1e-5).float().mean().item() < COMPILED_PIXEL_TOLERANCE
    assert bool((_linf(out, x) <= 8 / 255 + 1e-6).all())
