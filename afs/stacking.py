"""The stacked model of Eq. 1-2 (``StackedModel``) and the paper's "naive approach" (``LogitEnsemble``)."""

# Eq. 1-2, for B images, n members, member i's last feature map F_i(x) of shape (B, C_i, H_i, W_i):
#   g_i(x) = mean_{h,w} relu(BN_i(F_i(x)))        (B, d_i), d_i = C_i (640 for a WRN-28-10)
#   G(x)   = concat(g_1(x), ..., g_n(x))          (B, sum d_i)                 Eq. 2
#   z      = W · G(x) + b                         (B, K), W: (K, sum d_i)      Eq. 1
# The members are frozen once trained (eval mode, no parameter gradients): only W and b learn (Eq. 5, in
# afs.merger). Gradients w.r.t. the input still flow through every member, so a PGD on the stack is an
# adaptive white-box attack on the whole model, as in the paper's evaluation.

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from afs_kernels import merger_head

__all__ = ["StackedModel", "LogitEnsemble"]


def _check_members(extractors: Sequence[nn.Module], kind: str, budgets: Sequence[float] | None,
                   num_classes: int | None = None) -> list[nn.Module]:
    members = list(extractors)
    if not members:
        raise ValueError(f"a {kind} needs at least one extractor, got an empty list")
    for i, m in enumerate(members):
        # The fused forward needs each member's pre-BN feature map and final BN (the afs.models interface).
        if not all(hasattr(m, a) for a in ("feature_map", "final_bn", "features", "feature_dim")):
            raise TypeError(f"member {i} ({type(m).__name__}) has no feature_map()/final_bn/features()/"
                            "feature_dim: not an afs extractor")
    # One K-class merger over all members: they must have been trained on the same K classes.
    classes = {getattr(m, "num_classes", None) for m in members}
    if len(classes) > 1:
        raise ValueError(f"extractors were trained for different numbers of classes: {sorted(map(str, classes))}")
    # Every member reads the same image x, so they must agree on its channel count (first conv's input).
    channels = {next((s.in_channels for s in m.modules() if isinstance(s, nn.Conv2d)), -1) for m in members}
    if len(channels) > 1:
        raise ValueError(f"extractors take inputs with different channel counts: {sorted(channels)}")
    member_classes = getattr(members[0], "num_classes", num_classes)
    if num_classes is not None and member_classes != num_classes:
        raise ValueError(f"the merger predicts {num_classes} classes but the extractors {member_classes}")
    if budgets is not None and len(budgets) != len(members):
        raise ValueError(f"{len(budgets)} budgets given for {len(members)} extractors")
    for m in members:
        # Frozen (Section II-B): eval mode, so BN applies its running statistics; no parameter gradients.
        m.eval()
        m.requires_grad_(False)
    return members


class StackedModel(nn.Module):
    """Frozen extractors + one ``nn.Linear`` merger over their concatenated features (Eq. 1-2).

    extractors: trained `afs.models` networks; num_classes: the merger's outputs (= the members' own);
    budgets: each member's training eps in 1/255, kept for labels and importance plots.
    """

    def __init__(self, extractors: Sequence[nn.Module], num_classes: int, budgets: Sequence[float] | None = None):
        super().__init__()
        members = _check_members(extractors, "stack", budgets, num_classes)
        self.extractors = nn.ModuleList(members)
        self.budgets = tuple(budgets) if budgets is not None else None
        self.feature_dims = tuple(int(m.feature_dim) for m in members)  # d_i: 640 per WRN-28-10
        self.feature_dim = sum(self.feature_dims)
        self.num_classes = num_classes
        # W: (K, sum d_i), b: (K,). Column block i of W reads member i's features (Fig. 4b's W_i).
        self.merger = nn.Linear(self.feature_dim, num_classes)

    def train(self, mode: bool = True) -> "StackedModel":
        # Only the merger follows train()/eval(); the members stay in eval mode (frozen BN statistics), which
        # is also what the fused head below requires: it folds each final BN's running statistics.
        self.training = mode
        self.merger.train(mode)
        for m in self.extractors:
            m.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """G(x) of Eq. 2: the members' features side by side, (B, sum d_i) (analysis, t-SNE)."""
        return torch.cat([m.features(x) for m in self.extractors], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        # Eq. 1-2:  z = W · concat(g_1(x), ..., g_n(x)) + b,  g_i(x) = mean_hw relu(BN_i(F_i(x))).
        # Each member stops at its pre-BN map F_i (B, C_i, H_i, W_i); merger_head does BN_i + ReLU + pool +
        # concat + linear in one pass over the maps (Triton on CUDA; a train-mode BN there is an error, not a
        # silently wrong fold). Elsewhere it runs exactly merger(features(x)), so CPU numbers are unchanged.
        fmaps = [m.feature_map(x) for m in self.extractors]
        bns = [m.final_bn for m in self.extractors]
        return merger_head(fmaps, bns, self.merger.weight, self.merger.bias)  # (B, K)

    def importance_ratio(self) -> Tensor:
        """Fig. 4b: for each member i, sum|W_i| / sum|W| over its block W_i of merger columns; sums to 1."""
        # W (K, sum d_i) -> n blocks W_i (K, d_i) -> n absolute masses (n,) -> shares.
        blocks = self.merger.weight.detach().split(list(self.feature_dims), dim=1)
        mass = torch.stack([blk.abs().sum() for blk in blocks])
        return mass / mass.sum()

    def extra_repr(self) -> str:
        return f"members={len(self.extractors)}, budgets={self.budgets}, feature_dim={self.feature_dim}"


# Section II-C's "naive approach": average the members' own classifiers, z = (1/n) sum_i head_i(g_i(x)).
# No learnable weights, so it shows what the learnt merger W adds over plain ensembling.
class LogitEnsemble(nn.Module):
    """The mean of the members' own logits: the "naive approach" the paper's learnable merger replaces."""

    def __init__(self, models: Sequence[nn.Module], budgets: Sequence[float] | None = None):
        super().__init__()
        self.members = nn.ModuleList(_check_members(models, "logit ensemble", budgets))
        self.budgets = tuple(budgets) if budgets is not None else None
        self.num_classes = getattr(self.members[0], "num_classes", None)

    def train(self, mode: bool = True) -> "LogitEnsemble":
        self.training = mode  # nothing trainable: members stay in eval mode
        for m in self.members:
            m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        # (n, B, K) -> (B, K): each member's own head, averaged.
        return torch.stack([m(x) for m in self.members]).mean(dim=0)
