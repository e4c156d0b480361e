"""The stacked model (Eq. 1-2): frozen members, concatenated features, importance ratios, bad input."""

import pytest
import torch

from afs.models import PreActResNet18, WideResNet
from afs.stacking import LogitEnsemble, StackedModel, importance_ratio


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
    with pytest.raises(ValueError, match="columns"):
        importance_ratio(torch.ones(10, 5), (2, 2))


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
