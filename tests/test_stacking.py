"""The stacked model (Eq. 1-2): frozen members, concatenated features, importance ratios, bad input."""

import pytest
import torch

from afs.models import PreActResNet18, SmallCNN, WideResNet
from afs.stacking import LogitEnsemble, StackedModel


def _members(n=3, classes=10):
    torch.manual_seed(0)
    return [WideResNet(10, 1, classes) for _ in range(n)]


def test_features_concatenate_members_in_order():
    members = _members(3)
    stack = StackedModel(members, 10, budgets=(3, 5, 8)).eval()
    x = torch.rand(4, 3, 32, 32)
    f = stack.features(x)
    assert f.shape == (4, 3 * 64) and stack.feature_dim == 192
    torch.testing.assert_close(f[:, 64:128], members[1].features(x))
    torch.testing.assert_close(stack(x), stack.merger(f))


def _old_forward(stack, x):
    """The stack's forward before it ran on afs_kernels.merger_head: the members' own features, concatenated,
    through the nn.Linear merger (Eq. 1-2 as plain modules)."""
    return stack.merger(torch.cat([m.features(x) for m in stack.extractors], dim=1))


def _with_statistics(m):
    # Non-trivial running statistics in every BN (fresh ones are mean 0, var 1: folding them is a no-op).
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.normal_(0.0, 0.5, generator=gen)
                bn.running_var.uniform_(0.5, 2.0, generator=gen)
                bn.bias.normal_(0.0, 0.2, generator=gen)
    return m


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_forward_is_the_unfused_composition_bit_for_bit_on_cpu(bf16):
    """On a CPU the stack runs merger_head's reference: logits and input gradients equal the old forward
    exactly, under the cpu profile's bf16 autocast too, so no CPU number moved."""
    torch.manual_seed(0)
    stack = StackedModel([_with_statistics(SmallCNN(1, 10)) for _ in range(3)], 10).eval()
    x = torch.rand(5, 3, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        fused, old = stack(x), _old_forward(stack, x)
    assert fused.dtype == old.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.equal(fused, old)
    (g_fused,), (g_old,) = torch.autograd.grad(fused.sum(), x), torch.autograd.grad(old.sum(), x)
    assert g_old.abs().sum() > 0 and torch.equal(g_fused, g_old)
    (w_fused,), (w_old,) = (torch.autograd.grad(z.float().square().sum(), stack.merger.weight) for z in
                            (stack(x), _old_forward(stack, x)))
    assert torch.equal(w_fused, w_old)  # the merger trains through it too (Eq. 5)


@pytest.mark.parametrize("make", [lambda: WideResNet(10, 1, 10), lambda: PreActResNet18(10), lambda: SmallCNN(1, 10)],
                         ids=["wrn", "preact18", "cnn"])
def test_a_stack_of_each_architecture_and_a_mixed_one(make):
    torch.manual_seed(1)
    members = [_with_statistics(make()), _with_statistics(make())]
    for stack in (StackedModel(members, 10), StackedModel([members[0], _with_statistics(SmallCNN(1, 10))], 10)):
        x = torch.rand(2, 3, 32, 32, requires_grad=True)
        z = stack.eval()(x)
        assert z.shape == (2, 10) and torch.equal(z, _old_forward(stack, x))
        assert stack.features(x).shape == (2, stack.feature_dim)
        (g,) = torch.autograd.grad(z[:, 0].sum(), x)
        assert g.abs().sum() > 0  # the attack's path to the input goes through every member's final BN


def test_members_frozen_and_stay_in_eval_mode():
    stack = StackedModel(_members(2), 10)
    stack.train()
    assert stack.merger.training and not any(m.training for m in stack.extractors)
    assert all(not p.requires_grad for m in stack.extractors for p in m.parameters())
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = stack(x).sum()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks see through the whole stack
    assert all(p.grad is None for m in stack.extractors for p in m.parameters())
    assert stack.merger.weight.grad is not None


def test_importance_ratio_sums_to_one_and_follows_weight_mass():
    stack = StackedModel(_members(3), 10)
    with torch.no_grad():
        stack.merger.weight.zero_()
        stack.merger.weight[:, :64] = 1.0  # member 0: 640 units of mass
        stack.merger.weight[:, 128:] = -3.0  # member 2: 1920
    r = stack.importance_ratio()
    torch.testing.assert_close(r, torch.tensor([0.25, 0.0, 0.75]))
    torch.testing.assert_close(StackedModel(_members(3), 10).importance_ratio().sum(), torch.tensor(1.0))


def test_logit_ensemble_is_the_mean_of_member_logits():
    members = _members(2)
    ens = LogitEnsemble(members).eval()
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(ens(x), (members[0](x) + members[1](x)) / 2)


def test_bad_stacks_are_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        StackedModel([], 10)
    with pytest.raises(ValueError, match="different numbers of classes"):
        StackedModel([WideResNet(10, 1, 10), WideResNet(10, 1, 100)], 10)
    with pytest.raises(ValueError, match="merger predicts 100 classes"):
        StackedModel(_members(2, 10), 100)
    with pytest.raises(TypeError, match="not an afs extractor"):
        StackedModel([torch.nn.Linear(3, 3)], 10)
    with pytest.raises(ValueError, match="budgets given"):
        StackedModel(_members(2), 10, budgets=(1, 2, 3))
    with pytest.raises(ValueError, match="empty"):
        LogitEnsemble([])
    # Mixed architectures are fine: features are just concatenated.
    assert StackedModel([WideResNet(10, 1, 10), PreActResNet18(10)], 10).feature_dim == 64 + 512
