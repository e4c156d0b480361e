"""The fused merger head (``afs_kernels.merger_head``) against its pure-PyTorch reference and the stack.

On a CPU machine the Triton kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it): shapes stay
tiny. On a GPU machine run with ``TRITON_INTERPRET=0`` to test the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from afs_kernels import HAS_TRITON, merger_head, merger_head_reference

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


def _bn(c: int, gen: torch.Generator) -> nn.BatchNorm2d:
    """An eval-mode BN with non-trivial statistics: mixed-sign scales and shifts, so the ReLU cuts a good
    share of values and some channels are all-off."""
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2.5 + 0.2)
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(0.5 * torch.randn(c, generator=gen))
    return bn.requires_grad_(False).eval().to(DEVICE)


def _inputs(batch, channels, sizes, layout, classes, dtype=torch.float32, seed=0, bias=True):
    """Feature maps (leaves requiring grad), the members' final BNs and merger weights on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    fmaps, bns = [], []
    for c, (h, w) in zip(channels, sizes):
        f = torch.randn(batch, c, h, w, generator=gen)
        fmaps.append(_layout(f.to(device=DEVICE, dtype=dtype), layout).requires_grad_(True))
        bns.append(_bn(c, gen))
    weight = torch.randn(classes, sum(channels), generator=gen).to(DEVICE).requires_grad_(True)
    b = torch.randn(classes, generator=gen).to(DEVICE).requires_grad_(True) if bias else None
    return fmaps, bns, weight, b


def _reference(fmaps, bns, weight, bias):
    """The oracle in fp32 (the kernels compute in fp32 whatever the maps' dtype)."""
    return merger_head_reference([f.float() for f in fmaps], bns, weight, bias)


def _grads(out, leaves, seed=1):
    # Rounded to bf16 first, so a bf16 output and its fp32 oracle get the same upstream gradient.
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).bfloat16().to(out)
    return torch.autograd.grad(out, [t for t in leaves if t is not None], g)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[3]}-K{c[4]}")
def test_forward_and_gradients_match_reference(case, dtype):
    fmaps, bns, weight, bias = _inputs(*case, dtype=dtype)
    out = merger_head(fmaps, bns, weight, bias, backend="triton")
    ref = _reference(fmaps, bns, weight, bias)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (case[0], case[4])
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    leaves = [*fmaps, weight, bias]
    for name, got, want in zip(["F"] * len(fmaps) + ["W", "b"], _grads(out, leaves), _grads(ref, leaves)):
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"grad {name}: {m}")


@needs_triton
def test_fmap_gradient_keeps_memory_format_and_is_masked_by_relu():
    fmaps, bns, weight, bias = _inputs(2, [4, 3], [(3, 3), (3, 3)], "channels_last", 5)
    out = merger_head(fmaps, bns, weight, bias, backend="triton")
    for f, g, bn in zip(fmaps, _grads(out, fmaps), bns):
        assert g.is_contiguous(memory_format=torch.channels_last)
        off = bn(f.detach()) <= 0
        assert off.any() and (g[off] == 0).all()  # where the ReLU is off no gradient reaches the map


@needs_triton
def test_no_bias_and_weight_only_gradient():
    fmaps, bns, weight, _ = _inputs(3, [2, 5], [(2, 2), (2, 2)], "contiguous", 3, bias=False)
    fmaps = [f.detach() for f in fmaps]  # a merger-training step: only W needs a gradient
    out = merger_head(fmaps, bns, weight, None, backend="triton")
    ref = merger_head_reference(fmaps, bns, weight, None)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    (gw,), (rw,) = _grads(out, [weight]), _grads(ref, [weight])
    torch.testing.assert_close(gw, rw, atol=2e-5, rtol=1e-5)


@needs_triton
def test_train_mode_batchnorm_is_refused_by_the_kernel():
    fmaps, bns, weight, bias = _inputs(2, [3, 2], [(2, 2), (2, 2)], "contiguous", 4)
    bns[1].train()  # batch statistics: not the folded running ones
    with pytest.raises(ValueError, match="eval mode"):
        merger_head(fmaps, bns, weight, bias, backend="triton")


def test_auto_backend_off_cuda_is_the_reference():
    fmaps, bns, weight, bias = _inputs(2, [3, 2], [(2, 2), (2, 2)], "contiguous", 4)
    if DEVICE.type == "cuda":
        pytest.skip("on CUDA 'auto' picks the kernel (covered above)")
    out = merger_head(fmaps, bns, weight, bias)  # auto never picks the interpreter
    assert torch.equal(out, merger_head_reference(fmaps, bns, weight, bias))


def _members(n: int = 2):
    from afs.models import WideResNet

    members = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = WideResNet(depth=10, widen_factor=1, num_classes=10)
        with torch.no_grad():  # non-trivial eval-mode statistics in the final BN
            m.final_bn.running_mean.normal_(0.0, 0.5)
            m.final_bn.running_var.uniform_(0.5, 2.0)
            m.final_bn.weight.uniform_(0.5, 1.5)
            m.final_bn.bias.normal_(0.0, 0.2)
        members.append(m.to(device=DEVICE, memory_format=torch.channels_last))
    return members


@needs_triton
def test_stack_forward_through_the_kernel_equals_the_unfused_stack(monkeypatch):
    """End to end: StackedModel.forward with the Triton kernel (forced, as "auto" picks it on CUDA) gives the
    unfused modules' logits, input gradient (the attack's path) and merger gradient (merger training)."""
    import functools

    import afs.stacking

    stack = afs.stacking.StackedModel(_members(), num_classes=10).to(DEVICE).eval()
    monkeypatch.setattr(afs.stacking, "merger_head", functools.partial(merger_head, backend="triton"))
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)  # maps of 2x2
    y = torch.tensor([0, 3, 7], device=DEVICE)
    # On a GPU, TF32 convolutions would round both paths' (slightly different) map gradients to 10 bits.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        x_k, x_r = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, ref = stack(x_k), stack.merger(stack.features(x_r))
        g_k = torch.autograd.grad(nn.functional.cross_entropy(out, y), [x_k, stack.merger.weight])
        g_r = torch.autograd.grad(nn.functional.cross_entropy(ref, y), [x_r, stack.merger.weight])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert g_r[0].abs().max() > 0
    torch.testing.assert_close(g_k[0], g_r[0], atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(g_k[1], g_r[1], atol=1e-5, rtol=1e-4)


def test_bad_inputs_are_named():
    fmaps, bns, weight, bias = _inputs(2, [3, 2], [(2, 2), (2, 2)], "contiguous", 4)
    with pytest.raises(ValueError, match="one BatchNorm per feature map"):
        merger_head(fmaps, bns[:1], weight, bias)
    with pytest.raises(ValueError, match=r"weight must be \(K, sum C_i\) = \(K, 5\)"):
        merger_head(fmaps, bns, weight[:, :4], bias)
    with pytest.raises(ValueError, match=r"fmaps\[0\] must be \(B, 3, H, W\)"):
        merger_head([fmaps[0][:, :, 0], fmaps[1]], bns, weight, bias)
    with pytest.raises(ValueError, match=r"fmaps\[1\] must be \(B, 2, H, W\) with B = 2"):
        merger_head([fmaps[0], fmaps[1][:1]], bns, weight, bias)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        merger_head(fmaps, [bns[0], nn.Identity()], weight, bias)
    with pytest.raises(ValueError, match="unknown backend"):
        merger_head(fmaps, bns, weight, bias, backend="cuda")
