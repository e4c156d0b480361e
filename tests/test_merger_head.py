"""The fused merger head (``afs_kernels.merger_head``) against its pure-PyTorch reference and the stack.

On a CPU machine the Triton kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it): shapes stay
tiny. On a GPU machine run with ``TRITON_INTERPRET=0`` to test the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from afs_kernels import HAS_TRITON, fold_bn, merger_head, merger_head_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
TRITON_OK = HAS_TRITON and (INTERPRET or DEVICE.type == "cuda")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")

# (batch, channels per member, (H, W) per member, layout, classes). Awkward on purpose: B = 1 and odd B,
# members of different widths and map sizes, a member wider than one channel block (300 > 256 at 2x2),
# a 9x9 map (two trips of the pixel loop), 70 classes (two trips of the class loop), strided layouts.
CASES = [
    (1, [3, 5], [(2, 2), (2, 2)], "contiguous", 10),
    (5, [4, 1, 6], [(3, 3), (3, 3), (3, 3)], "channels_last", 10),
    (3, [7, 2], [(3, 2), (2, 3)], "transposed", 4),
    (3, [300, 3], [(2, 2), (9, 9)], "sliced", 70),
]
# Per-dtype tolerances (atol, rtol) on logits and gradients: fp32 tight; bf16 rounds the outputs to 8 bits.
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout (the kernels must read strides, not assume NCHW)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)  # H and W strides swapped
    if layout == "sliced":
        return torch.cat([t, t], dim=1)[:, : t.shape[1]]  # a channel slice of a wider tensor
    return t.contiguous()


def _inputs(batch, channels, sizes, layout, classes, dtype=torch.float32, seed=0, bias=True):
    """Feature maps (leaves requiring grad), folded BN affines and merger weights on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    fmaps, scales, shifts = [], [], []
    for c, (h, w) in zip(channels, sizes):
        f = torch.randn(batch, c, h, w, generator=gen)
        fmaps.append(_layout(f.to(device=DEVICE, dtype=dtype), layout).requires_grad_(True))
        # Mixed-sign scales and shifts: the ReLU cuts a good share of values, and some channels are all-off.
        scales.append(torch.randn(c, generator=gen).to(DEVICE))
        shifts.append((0.5 * torch.randn(c, generator=gen)).to(DEVICE))
    weight = torch.randn(classes, sum(channels), generator=gen).to(DEVICE).requires_grad_(True)
    b = torch.randn(classes, generator=gen).to(DEVICE).requires_grad_(True) if bias else None
    return fmaps, scales, shifts, weight, b


def _grads(out, leaves, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, [t for t in leaves if t is not None], g)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[3]}-K{c[4]}")
def test_forward_and_gradients_match_reference(case, dtype):
    fmaps, scales, shifts, weight, bias = _inputs(*case, dtype=dtype)
    out = merger_head(fmaps, scales, shifts, weight, bias, backend="triton")
    ref = merger_head_reference(fmaps, scales, shifts, weight, bias)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (case[0], case[4])
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    leaves = [*fmaps, weight, bias]
    for name, got, want in zip(["F"] * len(fmaps) + ["W", "b"], _grads(out, leaves), _grads(ref, leaves)):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


@needs_triton
def test_fmap_gradient_keeps_memory_format_and_is_masked_by_relu():
    fmaps, scales, shifts, weight, bias = _inputs(2, [4, 3], [(3, 3), (3, 3)], "channels_last", 5)
    out = merger_head(fmaps, scales, shifts, weight, bias, backend="triton")
    grads = _grads(out, fmaps)
    for f, g, s, t in zip(fmaps, grads, scales, shifts):
        assert g.is_contiguous(memory_format=torch.channels_last)
        off = (f.detach() * s[:, None, None] + t[:, None, None]) <= 0
        assert off.any() and (g[off] == 0).all()  # where the ReLU is off no gradient reaches the map


@needs_triton
def test_no_bias_and_weight_only_gradient():
    fmaps, scales, shifts, weight, _ = _inputs(3, [2, 5], [(2, 2), (2, 2)], "contiguous", 3, bias=False)
    fmaps = [f.detach() for f in fmaps]  # a merger-training step: only W needs a gradient
    out = merger_head(fmaps, scales, shifts, weight, None, backend="triton")
    ref = merger_head_reference(fmaps, scales, shifts, weight, None)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    (gw,), (rw,) = _grads(out, [weight]), _grads(ref, [weight])
    torch.testing.assert_close(gw, rw, atol=2e-5, rtol=1e-5)


def test_auto_backend_off_cuda_is_the_reference():
    fmaps, scales, shifts, weight, bias = _inputs(2, [3, 2], [(2, 2), (2, 2)], "contiguous", 4)
    if DEVICE.type == "cuda":
        pytest.skip("on CUDA 'auto' picks the kernel (covered above)")
    out = merger_head(fmaps, scales, shifts, weight, bias)  # auto never picks the interpreter
    assert torch.equal(out, merger_head_reference(fmaps, scales, shifts, weight, bias))


def test_fold_bn_equals_eval_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, 6, 3, 3)
    scale, shift = fold_bn(bn)
    assert not scale.requires_grad and scale.dtype == torch.float32
    torch.testing.assert_close(x * scale[:, None, None] + shift[:, None, None], bn(x).detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="track_running_stats"):
        fold_bn(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(TypeError, match="BatchNorm"):
        fold_bn(nn.Linear(2, 2))


@needs_triton
def test_stacked_model_feature_maps_through_kernel_equal_the_stack():
    """End to end: the members' pre-BN maps through the kernel give stack(x), and the same input gradient."""
    from afs.models import WideResNet
    from afs.stacking import StackedModel

    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = WideResNet(depth=10, widen_factor=1, num_classes=10)
        with torch.no_grad():  # non-trivial eval-mode statistics in the final BN
            m.bn.running_mean.normal_(0.0, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
            m.bn.weight.uniform_(0.5, 1.5)
            m.bn.bias.normal_(0.0, 0.2)
        members.append(m.to(device=DEVICE, memory_format=torch.channels_last))
    stack = StackedModel(members, num_classes=10).to(DEVICE).eval()
    folded = [fold_bn(m.bn) for m in stack.extractors]
    scales, shifts = [s for s, _ in folded], [t for _, t in folded]

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)  # maps of 2x2
    y = torch.tensor([0, 3, 7], device=DEVICE)
    # On a GPU, TF32 convolutions would round both paths' (slightly different) map gradients to 10 bits.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        x_k = x.clone().requires_grad_(True)
        fmaps = [m.feature_map(x_k) for m in stack.extractors]
        out = merger_head(fmaps, scales, shifts, stack.merger.weight, stack.merger.bias, backend="triton")
        x_r = x.clone().requires_grad_(True)
        ref = stack(x_r)
        (g_k,) = torch.autograd.grad(nn.functional.cross_entropy(out, y), x_k)
        (g_r,) = torch.autograd.grad(nn.functional.cross_entropy(ref, y), x_r)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert g_r.abs().max() > 0
    torch.testing.assert_close(g_k, g_r, atol=1e-5, rtol=1e-3)


def test_bad_inputs_are_named():
    fmaps, scales, shifts, weight, bias = _inputs(2, [3, 2], [(2, 2), (2, 2)], "contiguous", 4)
    with pytest.raises(ValueError, match="1 scales given for 2"):
        merger_head(fmaps, scales[:1], shifts, weight, bias)
    with pytest.raises(ValueError, match=r"weight must have shape \(K, sum C_i\) = \(K, 5\)"):
        merger_head(fmaps, scales, shifts, weight[:, :4], bias)
    with pytest.raises(ValueError, match="4-D"):
        merger_head([fmaps[0][:, :, 0], fmaps[1]], scales, shifts, weight, bias)
    with pytest.raises(ValueError, match="shifts\\[1\\] must have shape \\(2,\\)"):
        merger_head(fmaps, scales, [shifts[0], shifts[0]], weight, bias)
    with pytest.raises(ValueError, match="requires grad"):
        merger_head(fmaps, [scales[0].clone().requires_grad_(True), scales[1]], shifts, weight, bias)
    with pytest.raises(TypeError, match="dtype mismatch"):
        merger_head([fmaps[0], fmaps[1].double()], scales, shifts, weight, bias)
    with pytest.raises(ValueError, match="batch mismatch"):
        merger_head([fmaps[0], fmaps[1][:1]], scales, shifts, weight, bias)
    with pytest.raises(TypeError, match="list of"):
        merger_head(fmaps[0], scales, shifts, weight, bias)
    with pytest.raises(ValueError, match="unknown backend"):
        merger_head(fmaps, scales, shifts, weight, bias, backend="cuda")
