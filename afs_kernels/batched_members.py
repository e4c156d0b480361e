"""n same-architecture extractors run as ONE batched model: ``torch.func.stack_module_state`` + ``vmap``.

A stack of the paper (Section III) holds up to 6+ WRN-28-10s of identical architecture that differ only in
their weights. Called in a Python loop they run one after another: n small launches per layer, each too
small at modest batch sizes to fill a big GPU. Stacking their weights along a new leading dimension and
vmapping one functional forward over it turns every layer into one launch over all members (convolutions
become grouped convolutions, BatchNorms batched affine ops), at the price of one copy of the weights.

Mixed precision: ``torch.autocast`` does not reach inside ``vmap`` (functorch's batched tensors bypass the
autocast dispatch; checked on torch 2.14: a vmapped conv under autocast stays fp32), so the precision is
chosen by casting the copy, ``BatchedMembers(members).to(torch.bfloat16)``; inputs are cast to the stacked
weights' dtype on the way in (the input gradient comes back in the input's dtype).

The members are frozen (eval mode, no parameter gradients, as in ``afs.stacking.StackedModel``): the
stacked weights are buffers, copied once at construction. Gradients w.r.t. the *input* flow through the
vmapped forward as usual, which is what an attack on the stack needs. Changing a member afterwards does
not change the batched copy; build a new ``BatchedMembers``.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

__all__ = ["BatchedMembers"]


class _MethodCall(nn.Module):
    """Calls ``module.<method>(x)``: ``functional_call`` runs ``forward``, and members expose ``features``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, method: str) -> torch.Tensor:
        return getattr(self.module, method)(x)


def _check_same_architecture(members: Sequence[nn.Module]) -> None:
    """ValueError naming the first difference in class, parameter or buffer names/shapes/dtypes."""
    ref = members[0]
    ref_state = {k: (tuple(v.shape), v.dtype) for k, v in [*ref.named_parameters(), *ref.named_buffers()]}
    for i, m in enumerate(members[1:], start=1):
        if type(m) is not type(ref):
            raise ValueError(f"member {i} is a {type(m).__name__}, member 0 a {type(ref).__name__}: not batchable")
        state = {k: (tuple(v.shape), v.dtype) for k, v in [*m.named_parameters(), *m.named_buffers()]}
        if state.keys() != ref_state.keys():
            diff = sorted(set(state) ^ set(ref_state))[:3]
            raise ValueError(f"member {i} has other parameters/buffers than member 0 (e.g. {diff})")
        for k, v in state.items():
            if v != ref_state[k]:
                raise ValueError(f"member {i}'s {k} has shape/dtype {v}, member 0's {ref_state[k]}")


class BatchedMembers(nn.Module):
    """The features of n same-architecture frozen extractors, computed in one vmapped call.

    ``features(x)`` equals ``torch.cat([m.features(x) for m in members], dim=1)`` (B, n*d) and
    ``feature_maps(x)`` equals ``torch.stack([m.feature_map(x) for m in members])`` (n, B, C, h, w) -- up to
    float reassociation of the grouped convolutions.

    Args:
        members: extractors of one class and identical shapes (``afs.models`` networks expose
            ``features``/``feature_map``); they are read once, in eval mode, and not modified.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("BatchedMembers needs at least one member, got an empty list")
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise TypeError(f"member {i} must be an nn.Module, got {type(m).__name__}")
        _check_same_architecture(members)
        devices = {t.device for m in members for t in [*m.parameters(), *m.buffers()]}
        if len(devices) > 1:
            raise ValueError(f"members live on different devices: {sorted(map(str, devices))}")
        self.n_members = len(members)
        self.feature_dim = getattr(members[0], "feature_dim", None)
        # stack_module_state wants one mode for all; eval is what frozen extractors run in. Mode is restored.
        modes = [m.training for m in members]
        for m in members:
            m.eval()
        try:
            params, buffers = torch.func.stack_module_state(members)
        finally:
            for m, mode in zip(members, modes):
                m.train(mode)
        # The stacked copies become buffers: no parameter gradients, and .to(device/dtype) moves them.
        self._names: list[tuple[str, str]] = []
        for name, value in [*params.items(), *buffers.items()]:
            slot = "s_" + name.replace(".", "__")
            self.register_buffer(slot, value.detach(), persistent=False)
            self._names.append((f"module.{name}", slot))
        # A weightless template (meta tensors) whose forward is run with the stacked tensors swapped in. Kept
        # in a tuple so nn.Module does not register it (``.to(device)`` must not try to move meta tensors).
        template = copy.deepcopy(members[0]).to("meta").eval()
        self._template = (_MethodCall(template),)

    def _state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, slot) for name, slot in self._names}

    def _run(self, method: str, x: torch.Tensor) -> torch.Tensor:
        """``member.<method>(x)`` for every member, stacked: (n, B, ...)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        state = self._state()
        first = next((t for t in state.values() if t.is_floating_point()), None)
        if first is not None and first.device != x.device:
            raise ValueError(f"device mismatch: the batched members are on {first.device}, x on {x.device}")
        if first is not None and x.is_floating_point() and x.dtype != first.dtype:
            x = x.to(first.dtype)  # autocast does not apply under vmap: the weights' dtype decides
        call = self._template[0]

        def one(member_state: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(call, member_state, (inp, method))

        # in_dims: the state dict is batched along dim 0 (members); the input is shared by all members.
        return torch.func.vmap(one, in_dims=(0, None))(state, x)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's ``feature_map(x)`` (pre-BN last conv activations), stacked: (n, B, C, h, w)."""
        return self._run("feature_map", x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The members' penultimate features side by side, (B, n*d): the ``concat`` of Eq. 2."""
        per_member = self._run("features", x)  # (n, B, d)
        return per_member.permute(1, 0, 2).reshape(x.shape[0], -1)  # member-major columns, as torch.cat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def train(self, mode: bool = True) -> "BatchedMembers":
        # Frozen extractors: the template always runs in eval mode (running BN statistics), whatever the caller.
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"n_members={self.n_members}, feature_dim={self.feature_dim}"
