"""Triton kernels of ``afs_kernels`` against their pure-PyTorch references, plus properties and errors.

On a CPU machine the Triton kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it), which
is slow: shapes stay tiny. On a GPU machine run with ``TRITON_INTERPRET=0`` to test the compiled kernels.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afs_kernels import HAS_TRITON, Backend, Norm, pgd_step, pgd_step_reference, random_start, random_start_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter runs on CPU tensors; compiled Triton needs CUDA.
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
TRITON_OK = HAS_TRITON and (INTERPRET or DEVICE.type == "cuda")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")

SHAPES = [(3, 3, 5, 7), (1, 3, 32, 32), (5, 1, 1, 1)]
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def _inputs(shape, dtype=torch.float32, seed=0):
    """x_nat in [0,1], an iterate near it, and a gradient with a few exact zeros (sign(0) = 0: no move)."""
    gen = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=gen)
    x_adv = (x_nat + 0.03 * torch.randn(shape, generator=gen)).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    grad[torch.rand(shape, generator=gen) < 0.1] = 0.0
    if shape[0] > 1:
        grad[-1] = 0.0  # an all-zero sample: no move at all
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (x_adv, grad, x_nat))


def _budget(kind, batch, value):
    """A budget as a float, a 0-d tensor or a per-sample [B] tensor (with one zero entry)."""
    if kind == "float":
        return value
    if kind == "scalar":
        return torch.tensor(value, device=DEVICE)
    per = torch.linspace(0.0, 2 * value, batch, device=DEVICE) if batch > 1 else torch.full((1,), value, device=DEVICE)
    return per


def _assert_in_ball_and_box(x, x_nat, eps, tol=1e-6, box=True):
    size = (x.double() - x_nat.double()).cpu().reshape(x.shape[0], -1).abs().amax(dim=1)
    eps_b = torch.as_tensor(eps, dtype=torch.float64).cpu().expand(x.shape[0])
    assert bool((size <= eps_b * (1 + tol) + tol).all()), f"outside the L-inf ball: {size} > {eps_b}"
    if box:
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0, "outside the [0, 1] box"


def _assert_ulp_close(a, b, ulps=1):
    """|a - b| <= ulps units in the last place of b, for a low-precision dtype."""
    bits = MANTISSA_BITS[b.dtype]
    af, bf = a.float(), b.float()
    mag = bf.abs().clamp_min(2.0**-14)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - bits)
    worst = ((af - bf).abs() / ulp).max().item()
    assert worst <= ulps, f"{b.dtype}: off by {worst} ulp"


# --------------------------------------------------------------------------------------------------------
# pgd_step: Triton == reference
# --------------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", ["float", "scalar", "per_sample"])
def test_pgd_step_triton_matches_reference_fp32(shape, budget):
    x_adv, grad, x_nat = _inputs(shape)
    eps, step = _budget(budget, shape[0], 8 / 255), _budget(budget, shape[0], 2 / 255)
    out = pgd_step(x_adv, grad, x_nat, eps, step, backend="triton")
    ref = pgd_step_reference(x_adv, grad, x_nat, eps, step)
    assert out.shape == x_adv.shape and out.dtype == x_adv.dtype and not out.requires_grad
    assert torch.equal(out, ref)  # same fp32 ops in the same order: bit-exact
    _assert_in_ball_and_box(out, x_nat, eps)


@needs_triton
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_pgd_step_triton_non_contiguous(layout):
    x_adv, grad, x_nat = _inputs((3, 3, 6, 5))
    if layout == "transposed":  # a strided view: copied to row-major by the launcher
        x_adv, grad, x_nat = (t.transpose(2, 3) for t in (x_adv, grad, x_nat))
    elif layout == "channels_last":  # dense NHWC: used in place, output keeps the format
        x_adv, grad, x_nat = (t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad, x_nat))
    else:  # every other pixel column: a gap between elements
        x_adv, grad, x_nat = (t[..., ::2] for t in (x_adv, grad, x_nat))
    eps = torch.tensor([0.01, 0.03, 0.0], device=DEVICE)
    out = pgd_step(x_adv, grad, x_nat, eps, 0.01, backend="triton")
    ref = pgd_step_reference(x_adv.contiguous(), grad.contiguous(), x_nat.contiguous(), eps, 0.01)
    assert out.shape == x_adv.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pgd_step_triton_low_precision_within_one_ulp(dtype):
    x_adv, grad, x_nat = _inputs((3, 3, 5, 7), dtype=dtype)
    out = pgd_step(x_adv, grad, x_nat, 8 / 255, 2 / 255, backend="triton")
    ref = pgd_step_reference(x_adv, grad, x_nat, 8 / 255, 2 / 255)
    assert out.dtype == dtype
    _assert_ulp_close(out, ref, ulps=1)


@needs_triton
def test_pgd_step_no_box_clamp():
    # x_nat on the box edges and a big step: without clamp_box the iterate leaves [0, 1] but stays in the ball.
    x_adv, grad, x_nat = _inputs((2, 3, 4, 4))
    x_nat = (x_nat > 0.5).to(x_nat.dtype)
    x_adv = x_nat.clone()
    eps = 0.1
    for backend in ("triton", "reference"):
        out = pgd_step(x_adv, grad, x_nat, eps, eps, clamp_box=False, backend=backend)
        assert float(out.min()) < 0.0 or float(out.max()) > 1.0
        _assert_in_ball_and_box(out, x_nat, eps, box=False)
        clamped = pgd_step(x_adv, grad, x_nat, eps, eps, clamp_box=True, backend=backend)
        # For L-inf, box-clamping commutes with the projection.
        torch.testing.assert_close(clamped, out.clamp(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(pgd_step(x_adv, grad, x_nat, eps, eps, clamp_box=False, backend="triton"),
                               pgd_step_reference(x_adv, grad, x_nat, eps, eps, clamp_box=False), rtol=0, atol=0)


def test_pgd_step_reference_math():
    """The reference against a hand computation on a tiny example (independent of the kernels)."""
    x_nat = torch.tensor([[0.5, 0.5, 0.98, 0.02]])
    x_adv = x_nat.clone()
    grad = torch.tensor([[3.0, -4.0, 1.0, 0.0]])
    out = pgd_step_reference(x_adv, grad, x_nat, 0.1, 0.05)
    expected = torch.tensor([[0.55, 0.45, 1.0, 0.02]])  # 0.98 + 0.05 leaves the box; sign(0) = 0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    # eps = 0 pins the iterate to x_nat whatever the step.
    torch.testing.assert_close(pgd_step_reference(x_adv, grad, x_nat, 0.0, 0.3), x_nat, rtol=0, atol=0)


def test_pgd_step_auto_uses_reference_on_cpu():
    x_adv, grad, x_nat = (t.cpu() for t in _inputs((2, 3, 4, 4)))
    x_adv = x_adv.double()
    grad, x_nat = grad.double(), x_nat.double()
    # fp64 has no Triton kernel; auto on CPU must take the reference (and so accept it).
    out = pgd_step(x_adv, grad, x_nat, 0.1, 0.01, backend="auto")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, pgd_step_reference(x_adv, grad, x_nat, 0.1, 0.01), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# random_start
# --------------------------------------------------------------------------------------------------------
def _random_start(backend, *args, **kwargs):
    if backend == "triton":
        return random_start(*args, backend="triton", **kwargs)
    return random_start_reference(*args, **kwargs)


BACKENDS = [pytest.param("triton", marks=needs_triton), "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_start_in_ball_box_and_reproducible(backend):
    x_nat = torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x_nat[0] = 1.0  # a sample on the box edge: clamping must keep it inside the ball too
    eps = torch.tensor([0.05, 0.3, 0.0], device=DEVICE)
    a = _random_start(backend, x_nat, eps, seed=123)
    b = _random_start(backend, x_nat, eps, seed=123)
    c = _random_start(backend, x_nat, eps, seed=124)
    assert a.shape == x_nat.shape and a.dtype == x_nat.dtype
    _assert_in_ball_and_box(a, x_nat, eps, tol=1e-5)
    assert torch.equal(a, b), "same seed, different start"
    assert not torch.equal(a, c), "different seeds, same start"
    assert torch.equal(a[2], x_nat[2]), "eps = 0 must give x_nat"
    # A generator in a given state gives the same start; the generator advances between calls.
    g1, g2 = torch.Generator(DEVICE).manual_seed(7), torch.Generator(DEVICE).manual_seed(7)
    d1 = _random_start(backend, x_nat, eps, generator=g1)
    assert torch.equal(d1, _random_start(backend, x_nat, eps, generator=g2))
    assert not torch.equal(d1, _random_start(backend, x_nat, eps, generator=g1))
    # No generator and no seed: torch's default generator, so torch.manual_seed repeats a run.
    torch.manual_seed(5)
    e1 = _random_start(backend, x_nat, eps)
    torch.manual_seed(5)
    assert torch.equal(e1, _random_start(backend, x_nat, eps))


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_start_linf_is_uniform(backend):
    # Interior pixels (x_nat = 0.5, eps = 0.1): the box clamp never acts, delta ~ U(-eps, eps).
    x_nat = torch.full((4, 3, 16, 16), 0.5, device=DEVICE)
    eps = 0.1
    delta = (_random_start(backend, x_nat, eps, "Linf", seed=0) - x_nat).double().flatten()
    n = delta.numel()  # 3072; the std of the sample mean is eps/sqrt(3n) ~ 0.001
    assert abs(delta.mean().item()) < 5 * eps / math.sqrt(3 * n)
    assert abs(delta.std().item() / (eps / math.sqrt(3)) - 1) < 0.05
    assert delta.abs().max().item() <= eps * (1 + 1e-6)
    # Each quarter of [-eps, eps] holds ~1/4 of the values (~0.8% std): not a bump at 0, not the edges.
    counts = torch.histc(delta.float(), bins=4, min=-eps, max=eps) / n
    assert bool(((counts - 0.25).abs() < 0.04).all()), counts


@needs_triton
def test_random_start_triton_low_precision():
    x_nat = torch.rand(2, 3, 5, 5, device=DEVICE).to(torch.bfloat16)
    out = random_start(x_nat, 8 / 255, seed=0, backend="triton")
    assert out.dtype == torch.bfloat16
    # bf16 rounding may step just past the ball's surface: allow 1 bf16 ulp at 1.0 (2^-8).
    _assert_in_ball_and_box(out, x_nat, 8 / 255, tol=2**-8)


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------
def test_pgd_step_errors():
    x_adv, grad, x_nat = (t.cpu() for t in _inputs((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="shape mismatch: grad"):
        pgd_step(x_adv, grad[:, :2], x_nat, 0.1, 0.01)
    with pytest.raises(ValueError, match="shape mismatch: x_nat"):
        pgd_step(x_adv, grad, x_nat[:1], 0.1, 0.01)
    with pytest.raises(TypeError, match="dtype mismatch: grad"):
        pgd_step(x_adv, grad.double(), x_nat, 0.1, 0.01)
    with pytest.raises(ValueError, match="device mismatch: x_nat"):
        pgd_step(x_adv, grad, x_nat.to("meta"), 0.1, 0.01)
    with pytest.raises(TypeError, match="floating dtype"):
        pgd_step((x_adv * 255).to(torch.uint8), grad, x_nat, 0.1, 0.01)
    with pytest.raises(TypeError, match="x_adv must be a torch.Tensor"):
        pgd_step(x_adv.numpy(), grad, x_nat, 0.1, 0.01)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        pgd_step(x_adv, grad, x_nat, -0.1, 0.01)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        pgd_step(x_adv, grad, x_nat, torch.tensor([0.1, -0.1]), 0.01)
    with pytest.raises(ValueError, match="step_size must be finite and >= 0"):
        pgd_step(x_adv, grad, x_nat, 0.1, float("nan"))
    with pytest.raises(ValueError, match=r"per-sample eps must have shape \[B\]=\[2\]"):
        pgd_step(x_adv, grad, x_nat, torch.full((3,), 0.1), 0.01)
    with pytest.raises(ValueError, match="per-sample step_size"):
        pgd_step(x_adv, grad, x_nat, 0.1, torch.full((2, 1), 0.01))
    with pytest.raises(TypeError, match="eps must be a float"):
        pgd_step(x_adv, grad, x_nat, "0.1", 0.01)
    bad = grad.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="grad contains non-finite"):
        pgd_step(x_adv, bad, x_nat, 0.1, 0.01)
    with pytest.raises(ValueError, match="grad contains non-finite"):
        pgd_step_reference(x_adv, bad, x_nat, 0.1, 0.01)
    pgd_step(x_adv, bad, x_nat, 0.1, 0.01, check=False)  # check=False skips the (syncing) value checks
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        pgd_step(x_adv, grad, x_nat, 0.1, 0.01, backend="cuda")
    # Enums and their values, case-insensitively, pick the same behaviour.
    assert torch.equal(pgd_step(x_adv, grad, x_nat, 0.1, 0.01, backend=Backend.REFERENCE),
                       pgd_step(x_adv, grad, x_nat, 0.1, 0.01, backend="Reference"))


def test_forced_triton_on_unsupported_device_is_an_error():
    x = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match="backend='triton'"):
        pgd_step(x, x, x, 0.1, 0.01, backend=Backend.TRITON, check=False)


def test_random_start_errors():
    x_nat = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="either generator or seed"):
        random_start(x_nat, 0.1, generator=torch.Generator(), seed=1)
    with pytest.raises(ValueError, match="seed must be an int"):
        random_start(x_nat, 0.1, seed=-1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        random_start(x_nat, 0.1, "Linf", 3)
    with pytest.raises(ValueError, match=r"x_nat must lie in the \[0, 1\] pixel box"):
        random_start(x_nat * 255, 0.1)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        random_start_reference(x_nat, -1.0)
    with pytest.raises(ValueError, match="per-sample eps"):
        random_start(x_nat, torch.full((5,), 0.1))
    with pytest.raises(ValueError, match="unknown norm 'Lmax'"):
        random_start(x_nat, 0.1, "Lmax")
    with pytest.raises(ValueError, match="unknown norm 'L2'; valid: 'Linf'"):
        random_start(x_nat, 0.1, "L2")  # the kernels implement the paper's L-inf threat model only
    assert torch.equal(random_start(x_nat, 0.1, "linf", seed=0), random_start(x_nat, 0.1, Norm.LINF, seed=0))
    with pytest.raises(TypeError, match="floating dtype"):
        random_start(torch.zeros(2, 3, dtype=torch.int64), 0.1)


def test_imports_without_triton_and_without_afs():
    """afs_kernels imports alone (no afs) and where triton is missing; forcing Triton is then a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, afs_kernels as k\n"
        "assert not k.HAS_TRITON and 'afs' not in sys.modules\n"
        "x = torch.rand(2, 3)\n"
        "assert torch.equal(k.pgd_step(x, x, x, 0.1, 0.01), k.pgd_step_reference(x, x, x, 0.1, 0.01))\n"
        "k.random_start(x, 0.1, seed=0)\n"
        "try:\n"
        "    k.pgd_step(x, x, x, 0.1, 0.01, backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'triton is not importable' in str(e); print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
