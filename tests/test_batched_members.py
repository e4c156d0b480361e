"""``afs_kernels.BatchedMembers`` (stack_module_state + vmap) against the members run in a Python loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from afs.models import PreActResNet18, WideResNet
from afs_kernels import BatchedMembers, fold_bn, merger_head_reference


def _members(n: int = 3) -> list[WideResNet]:
    """Tiny WRN-10-1s with different weights and non-trivial BN running statistics, in eval mode."""
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = WideResNet(depth=10, widen_factor=1, num_classes=10)
        with torch.no_grad():
            for bn in m.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.running_mean.normal_(0.0, 0.3)
                    bn.running_var.uniform_(0.5, 2.0)
        out.append(m.eval())
    return out


@pytest.fixture(scope="module")
def members() -> list[WideResNet]:
    return _members()


def test_features_equal_the_loop_and_gradients_flow_to_the_input(members):
    batched = BatchedMembers(members)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    xb, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = batched(xb)
    want = torch.cat([m.features(xl) for m in members], dim=1)  # (B, n*d), member-major
    assert got.shape == want.shape == (3, 3 * members[0].feature_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    (gb,) = torch.autograd.grad((got * w).sum(), xb)
    (gl,) = torch.autograd.grad((want * w).sum(), xl)
    assert gl.abs().max() > 0
    torch.testing.assert_close(gb, gl, atol=1e-5, rtol=1e-4)
    # Frozen: no parameters at all, so nothing can collect a weight gradient.
    assert list(batched.parameters()) == []


def test_feature_maps_feed_the_merger_head(members):
    batched = BatchedMembers(members)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).contiguous(memory_format=torch.channels_last)
    maps = batched.feature_maps(x)  # (n, B, C, h, w)
    torch.testing.assert_close(maps, torch.stack([m.feature_map(x) for m in members]), atol=1e-5, rtol=1e-5)
    folded = [fold_bn(m.bn) for m in members]
    weight = torch.randn(10, 3 * members[0].feature_dim, generator=torch.Generator().manual_seed(4))
    logits = merger_head_reference(list(maps.unbind(0)), [s for s, _ in folded], [t for _, t in folded], weight, None)
    torch.testing.assert_close(logits, batched(x) @ weight.t(), atol=1e-5, rtol=1e-5)


def test_bf16_copy_computes_in_bf16_and_stays_close(members):
    # autocast does not reach inside vmap, so mixed precision is a cast of the batched copy.
    batched = BatchedMembers(members).to(torch.bfloat16)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    got = batched(x)
    assert got.dtype == torch.bfloat16
    want = torch.cat([m.features(x) for m in members], dim=1)
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
    (g,) = torch.autograd.grad(got.float().sum(), x)
    assert g.dtype == torch.float32 and g.abs().max() > 0


def test_members_are_copied_not_changed(members):
    before = [m.training for m in members]
    members[1].train()
    batched = BatchedMembers(members)
    assert members[1].training  # its mode is restored
    members[1].eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    ref = torch.cat([m.features(x) for m in members], dim=1)
    with torch.no_grad():
        members[0].conv1.weight.add_(1.0)  # a later change to a member does not reach the batched copy
    try:
        torch.testing.assert_close(batched(x), ref, atol=1e-5, rtol=1e-5)
    finally:
        with torch.no_grad():
            members[0].conv1.weight.sub_(1.0)
        for m, mode in zip(members, before):
            m.train(mode)


def test_mismatched_members_are_refused():
    with pytest.raises(ValueError, match="at least one member"):
        BatchedMembers([])
    with pytest.raises(ValueError, match="member 1 is a PreActResNet18"):
        BatchedMembers([WideResNet(10, 1), PreActResNet18()])
    with pytest.raises(ValueError, match="shape/dtype"):
        BatchedMembers([WideResNet(10, 1), WideResNet(10, 1, num_classes=5)])
    with pytest.raises(TypeError, match="nn.Module"):
        BatchedMembers([WideResNet(10, 1), "not a model"])
    batched = BatchedMembers([WideResNet(10, 1)])
    with pytest.raises(ValueError, match="device mismatch"):
        batched(torch.rand(1, 3, 8, 8, device="meta"))
