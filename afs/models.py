"""Feature extractors: WideResNet (the paper's WRN-28-10), PreActResNet-18, and a small CNN (the cpu profile's).

Each takes images in [0, 1] (normalisation is a fixed buffer inside, so eps 8/255 is 8/255 in pixels), ends
``feature_map(x) (B, C, h, w) -> final_bn -> ReLU -> mean over (h, w) = features(x) (B, C) -> head`` (what
`afs.stacking.StackedModel` fuses), and records its arguments (``spec()``) so a checkpoint can rebuild it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afs.attacks import eval_mode, model_device
from afs.io import atomic_torch_save, load_torch

__all__ = ["WideResNet", "PreActResNet18", "SmallCNN", "build_model", "model_from_spec", "model_cost",
           "save_checkpoint", "load_model", "CheckpointMismatchError"]

# CIFAR-10 training-set statistics, used only as a fixed input normalisation inside the model.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


class _Normalize(nn.Module):
    """(x - mean) / std with fixed, non-persistent buffers (they are not weights)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class _ExtractorBase(nn.Module):
    """The shared interface: ``feature_map`` (the last map before the final BN, (B, C, h, w), defined by each
    network) -> ``final_bn`` + ReLU + pool = ``features`` -> ``head``."""

    arch: str
    bn: nn.BatchNorm2d  # the final BN; named "bn" because every checkpoint's state dict says "bn.*"

    def __init__(self, mean: Any, std: Any, **kwargs: Any) -> None:
        super().__init__()
        if kwargs["num_classes"] < 2:
            raise ValueError(f"need num_classes >= 2, got {kwargs['num_classes']}")
        mean, std = (None if v is None else tuple(float(a) for a in v) for v in (mean, std))
        self.kwargs = {**kwargs, "mean": mean, "std": std}  # what `model_from_spec` rebuilds this network from
        self.normalize = _Normalize(mean, std) if mean is not None else nn.Identity()

    def _finish(self, width: int) -> None:
        # Final BN, then the linear head, then the init: this construction order fixes the RNG draws.
        self.bn = nn.BatchNorm2d(width)
        self.feature_dim, self.num_classes = width, self.kwargs["num_classes"]
        self.head = nn.Linear(width, self.num_classes)
        for m in self.modules():  # He-normal convs (fan_out), unit BN, zero linear bias: the usual WRN init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    final_bn = property(lambda self: self.bn)  # the BN on feature_map(x), before the final ReLU and the pool

    def features(self, x: Tensor) -> Tensor:
        """g(x) of Eq. 2: relu(final_bn(feature_map(x))) averaged over (h, w), (B, feature_dim)."""
        return F.relu(self.bn(self.feature_map(x))).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def spec(self) -> dict[str, Any]:
        return {"arch": self.arch, "kwargs": dict(self.kwargs)}

    def extra_repr(self) -> str:
        return f"{_args(self.kwargs)}, feature_dim={self.feature_dim}"


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-conv shortcut (WRN and PreActResNet alike)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        # A projection shortcut sees the pre-activated input (as in the reference WRN and PreAct code);
        # an identity shortcut carries the raw input.
        skip = self.shortcut(o) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(o)))) + skip


class WideResNet(_ExtractorBase):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) with pre-activation blocks as in Madry et al. / Rice et al.
    WRN-28-10 on 32x32 inputs: 36.48M parameters, 640-d features, 10.49 GFLOP forward."""

    arch = "wrn"

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 mean: tuple[float, ...] | None = CIFAR_MEAN, std: tuple[float, ...] | None = CIFAR_STD) -> None:
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"need widen_factor >= 1, got {widen_factor}")
        super().__init__(mean, std, depth=depth, widen_factor=widen_factor, num_classes=num_classes)
        n = (depth - 4) // 6  # blocks per group
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        # Three groups of n blocks; the first block of a group changes the width and (groups 2, 3) halves h, w.
        self.block1, self.block2, self.block3 = [
            nn.Sequential(*[_PreActBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1)
                            for i in range(n)]) for g, stride in enumerate((1, 2, 2))]
        self._finish(widths[3])

    def feature_map(self, x: Tensor) -> Tensor:
        o = self.conv1(self.normalize(x))
        return self.block3(self.block2(self.block1(o)))  # (B, 64k, 8, 8) at 32x32 input


class PreActResNet18(_ExtractorBase):
    """PreActResNet-18 (He et al. 2016), Rice et al.'s PGD-AT baseline: 11.17M parameters, 512-d features."""

    arch = "preact_resnet18"

    def __init__(self, num_classes: int = 10, mean: tuple[float, ...] | None = CIFAR_MEAN,
                 std: tuple[float, ...] | None = CIFAR_STD) -> None:
        super().__init__(mean, std, num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        stages = ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2))  # (c_in, c_out, stride), 2 blocks each
        self.layers = nn.Sequential(*[nn.Sequential(_PreActBlock(a, b, s), _PreActBlock(b, b, 1))
                                      for a, b, s in stages])
        self._finish(512)

    def feature_map(self, x: Tensor) -> Tensor:
        return self.layers(self.conv1(self.normalize(x)))  # (B, 512, 4, 4) at 32x32 input


class SmallCNN(_ExtractorBase):
    """Five 3x3 convs of widths (w, w, 2w, 2w, 4w), w = 16 * widen_factor, each but the last followed by
    BN-ReLU, max-pooled after the 2nd and 4th; the last conv's map goes through the final BN like the WRN's.
    widen_factor 2: 32-32-64-64-128, 0.14M parameters, 128-d features, 0.058 GFLOP.

    Why: on 2 CPU cores a bf16 PGD-AT epoch costs about a WRN-10-1's, and at 10,000 images it learns much more.
    """

    arch = "cnn"

    def __init__(self, widen_factor: int = 2, num_classes: int = 10, mean: tuple[float, ...] | None = CIFAR_MEAN,
                 std: tuple[float, ...] | None = CIFAR_STD) -> None:
        if widen_factor < 1:
            raise ValueError(f"need widen_factor >= 1, got {widen_factor}")
        super().__init__(mean, std, widen_factor=widen_factor, num_classes=num_classes)
        w = 16 * widen_factor
        widths = (w, w, 2 * w, 2 * w, 4 * w)
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(widths[:-1]):
            layers += [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            layers += [nn.MaxPool2d(2)] if i in (1, 3) else []  # 32x32 -> 16x16 -> 8x8
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.conv = nn.Conv2d(c_in, widths[-1], 3, 1, 1, bias=False)
        self._finish(widths[-1])

    def feature_map(self, x: Tensor) -> Tensor:
        return self.conv(self.body(self.normalize(x)))  # (B, 4w, 8, 8) at 32x32 input


_ARCHS: dict[str, type[_ExtractorBase]] = {"wrn": WideResNet, "preact_resnet18": PreActResNet18, "cnn": SmallCNN}


def model_from_spec(spec: dict[str, Any]) -> _ExtractorBase:
    """Rebuild a model from ``model.spec()`` (architecture name + constructor arguments)."""
    if spec.get("arch") not in _ARCHS:
        raise ValueError(f"unknown architecture {spec.get('arch')!r}; valid: {list(_ARCHS)}")
    return _ARCHS[spec["arch"]](**spec.get("kwargs", {}))


def build_model(config: Any, num_classes: int) -> _ExtractorBase:
    """A model from an `afs.config.ModelConfig` (``arch``, ``depth``, ``widen_factor``)."""
    size = {"wrn": {"depth": config.depth, "widen_factor": config.widen_factor},
            "cnn": {"widen_factor": config.widen_factor}}.get(config.arch, {})  # PreActResNet18 has one size
    return model_from_spec({"arch": config.arch, "kwargs": {**size, "num_classes": num_classes}})


def model_cost(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> dict[str, int]:
    """``{"params": parameter count, "flops": forward FLOPs of one input_shape batch}`` (torch.utils.flop_counter:
    a multiply-accumulate is 2 FLOPs; Table VI's "Flops (G)" counts MACs, half: WRN-28-10 10.49 G here, 5.24 there)."""
    from torch.utils.flop_counter import FlopCounterMode

    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:  # modes restored per module
        model(torch.zeros(input_shape, device=model_device(model)))
    return {"params": sum(p.numel() for p in model.parameters()), "flops": int(counter.get_total_flops())}


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another architecture or another width than the model it is loaded into."""


def save_checkpoint(model: _ExtractorBase, path: str | os.PathLike, **extra: Any) -> None:
    """Save weights with the architecture and its arguments, atomically. ``extra`` must be plain data."""
    atomic_torch_save({"format": "afs-model/1", **model.spec(), "state_dict": model.state_dict(), "extra": extra},
                      Path(path))


def load_model(path: str | os.PathLike, model: _ExtractorBase | None = None,
               map_location: Any = "cpu") -> _ExtractorBase:
    """Load a `save_checkpoint` file (``weights_only``: no pickle code runs) into a network rebuilt from its
    spec (``model=None``) or into ``model``, which must have exactly the saved architecture and arguments."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = load_torch(path, map_location=map_location)  # a truncated file: an error naming it and the remedy
    if not isinstance(payload, dict) or payload.get("format") != "afs-model/1":
        raise ValueError(f"{path} is not an afs model checkpoint (missing format tag 'afs-model/1')")
    saved = {"arch": payload["arch"], "kwargs": _normalise_kwargs(payload["kwargs"])}
    if model is None:
        model = model_from_spec(saved)
    else:
        want = {"arch": model.arch, "kwargs": _normalise_kwargs(model.kwargs)}
        if saved != want:
            raise CheckpointMismatchError(f"checkpoint {path} holds {_describe(saved)}, the model is {_describe(want)}")
    model.load_state_dict(payload["state_dict"])
    return model


def _normalise_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    # JSON/pickle round trips turn tuples into lists; compare as tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _describe(spec: dict[str, Any]) -> str:
    return f"{_ARCHS[spec['arch']].__name__ if spec['arch'] in _ARCHS else spec['arch']}({_args(spec['kwargs'])})"


def _args(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("mean", "std"))
