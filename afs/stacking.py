"""The stacked model of Eq. 1-2 and the paper's "naive approach" baseline.

``StackedModel``: n frozen extractors g_i, their features concatenated, one linear merger on top,

    z = W · [g_1(x); g_2(x); ...; g_n(x)] + b        (Eq. 1, Eq. 2)

The extractors never leave eval mode and never receive gradients with respect to their parameters
(their ``requires_grad`` is off), but gradients with respect to the *input* flow through them, so an
attack on the stack is an adaptive white-box attack on the whole model, as in the paper's evaluation.

``LogitEnsemble``: the mean of the members' own classifier logits (Section II-C's "naive approach").
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["StackedModel", "LogitEnsemble", "importance_ratio"]


def _check_members(extractors: Sequence[nn.Module], kind: str) -> list[nn.Module]:
    members = list(extractors)
    if not members:
        raise ValueError(f"a {kind} needs at least one extractor, got an empty list")
    for i, m in enumerate(members):
        if not (hasattr(m, "features") and hasattr(m, "feature_dim")):
            raise TypeError(f"member {i} ({type(m).__name__}) has no features()/feature_dim: not an afs extractor")
    classes = {getattr(m, "num_classes", None) for m in members}
    if len(classes) > 1:
        raise ValueError(f"extractors were trained for different numbers of classes: {sorted(map(str, classes))}")
    channels = {_in_channels(m) for m in members}
    if len(channels) > 1:
        raise ValueError(f"extractors take inputs with different channel counts: {sorted(channels)}")
    return members


def _in_channels(m: nn.Module) -> int:
    for sub in m.modules():
        if isinstance(sub, nn.Conv2d):
            return sub.in_channels
    return -1


def _freeze(m: nn.Module) -> None:
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)


class StackedModel(nn.Module):
    """Frozen extractors + one ``nn.Linear`` merger over their concatenated features (Eq. 1-2).

    Args:
        extractors: trained networks exposing ``features(x)`` and ``feature_dim`` (``afs.models``).
        num_classes: outputs of the merger; must equal the extractors' own ``num_classes``.
        budgets: the training budget of each member in 1/255, kept for labels and importance plots.
    """

    def __init__(self, extractors: Sequence[nn.Module], num_classes: int, budgets: Sequence[float] | None = None):
        super().__init__()
        members = _check_members(extractors, "stack")
        member_classes = getattr(members[0], "num_classes", num_classes)
        if member_classes != num_classes:
            raise ValueError(f"the merger predicts {num_classes} classes but the extractors {member_classes}")
        if budgets is not None and len(budgets) != len(members):
            raise ValueError(f"{len(budgets)} budgets given for {len(members)} extractors")
        self.extractors = nn.ModuleList(members)
        for m in self.extractors:
            _freeze(m)
        self.budgets = tuple(budgets) if budgets is not None else None
        self.feature_dims = tuple(int(m.feature_dim) for m in members)
        self.feature_dim = sum(self.feature_dims)
        self.num_classes = num_classes
        self.merger = nn.Linear(self.feature_dim, num_classes)  # W: (classes, sum d_i)

    def train(self, mode: bool = True) -> "StackedModel":
        # Only the merger follows train()/eval(); the extractors stay in eval mode (frozen BN statistics).
        self.training = mode
        self.merger.train(mode)
        for m in self.extractors:
            m.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """G(x; Theta) of Eq. 2: the members' features side by side, (B, sum feature_dim)."""
        return torch.cat([m.features(x) for m in self.extractors], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.merger(self.features(x))  # Eq. 1

    def importance_ratio(self) -> Tensor:
        """Fig. 4b: for each member i, sum|W_i| / sum|W| over its block of merger columns; sums to 1."""
        return importance_ratio(self.merger.weight, self.feature_dims)

    def extra_repr(self) -> str:
        return f"members={len(self.extractors)}, budgets={self.budgets}, feature_dim={self.feature_dim}"


def importance_ratio(weight: Tensor, feature_dims: Sequence[int]) -> Tensor:
    """Per-block share of the merger's absolute weight mass: ``sum|W_i| / sum|W|`` (Fig. 4b)."""
    if weight.shape[1] != sum(feature_dims):
        raise ValueError(f"weight has {weight.shape[1]} columns, feature blocks sum to {sum(feature_dims)}")
    mass = torch.stack([blk.abs().sum() for blk in weight.detach().split(list(feature_dims), dim=1)])
    return mass / mass.sum()


class LogitEnsemble(nn.Module):
    """The mean of the members' own logits: the "naive approach" the paper's learnable merger replaces."""

    def __init__(self, models: Sequence[nn.Module], budgets: Sequence[float] | None = None):
        super().__init__()
        members = _check_members(models, "logit ensemble")
        self.members = nn.ModuleList(members)
        for m in self.members:
            _freeze(m)
        self.budgets = tuple(budgets) if budgets is not None else None
        self.num_classes = getattr(members[0], "num_classes", None)

    def train(self, mode: bool = True) -> "LogitEnsemble":
        self.training = mode  # nothing trainable: members stay in eval mode
        for m in self.members:
            m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)
