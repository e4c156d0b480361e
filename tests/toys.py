"""Tiny models and a tiny synthetic task shared by the attack and evaluation tests.

The task is built so that a *standardly* trained model is accurate but not robust: each of the 10 classes
owns a fixed random +-1 "texture" template, and an image is mid-grey plus a faint copy of its class's
template plus Gaussian noise. A matched filter separates the classes by a logit margin of about
``amplitude * D`` (D = 3*16*16 pixels) while an L-inf attack of budget eps can move that margin by about
``eps * D``, so any eps above the template amplitude (0.02 < 8/255 ~= 0.031) breaks the model: the
undefended toy falls to ~0% at the paper's budget, which is exactly what the tests need to assert.

Everything is deterministic: data and weights come from explicit seeds and never touch torch's global RNG.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
import torch.nn.functional as F

# Shape of the toy images; 16x16 keeps a training run to a few seconds on 2 cores.
CHANNELS, SIZE, N_CLASSES = 3, 16, 10
# Template amplitude (pixel units) and noise std: SNR high enough for ~100% clean accuracy,
# amplitude below 8/255 so that the paper's budget breaks the standardly trained toy.
AMPLITUDE, NOISE_STD = 0.02, 0.06
# Seeds: the templates are part of the task definition; data splits use their own seeds.
TEMPLATE_SEED, TRAIN_SEED, TEST_SEED, INIT_SEED = 1234, 1, 2, 3


class TinyNet(nn.Module):
    """Two small convolutions and a linear head (no global pool, so it can learn global templates)."""

    def __init__(self, width: int = 8, n_classes: int = N_CLASSES, size: int = SIZE) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(CHANNELS, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.feature_dim = 2 * width * (size // 2) ** 2
        self.head = nn.Linear(self.feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (B, feature_dim)."""
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ToyStack(nn.Module):
    """A miniature feature stack: concatenated features of several nets and one linear merger (Eq. 1-2)."""

    def __init__(self, nets: list[TinyNet], n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.merger = nn.Linear(sum(n.feature_dim for n in nets), n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merger(torch.cat([n.features(x) for n in self.nets], dim=1))  # (B, n*feature_dim)


class NoisyLogits(nn.Module):
    """Wraps a model and adds fresh noise to its logits: a 'randomised defence' for AutoAttack's check."""

    def __init__(self, model: nn.Module, std: float = 1e-2) -> None:
        super().__init__()
        self.model, self.std = model, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits + self.std * torch.randn_like(logits)


class DropoutNet(nn.Module):
    """A model whose output depends on train/eval mode (dropout): lets tests see which mode attacks use."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.drop = model, nn.Dropout(p=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.drop(x))


def templates() -> torch.Tensor:
    """The class templates, (N_CLASSES, C, H, W) with entries in {-1, +1}."""
    g = torch.Generator().manual_seed(TEMPLATE_SEED)
    return torch.randint(0, 2, (N_CLASSES, CHANNELS, SIZE, SIZE), generator=g).float() * 2 - 1


def make_data(n: int, seed: int = TEST_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in [0, 1], (n, C, H, W) float32, and their int64 labels, balanced over classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % N_CLASSES
    y = y[torch.randperm(n, generator=g)]
    noise = torch.randn(n, CHANNELS, SIZE, SIZE, generator=g)
    x = 0.5 + AMPLITUDE * templates()[y] + NOISE_STD * noise
    return x.clamp(0.0, 1.0), y


@functools.lru_cache(maxsize=None)
def _trained_state(width: int, seed: int) -> dict[str, torch.Tensor]:
    # Cached as a state dict so every caller gets a fresh, unshared module (tests flip modes and wrap it).
    x, y = make_data(2000, seed=TRAIN_SEED)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module init uses the global RNG; forked so callers' RNG is untouched
        net = TinyNet(width)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    # Standard (non-adversarial) training: 8 epochs of 2000 samples, ~1-2 s on 2 cores.
    for _ in range(8):
        for idx in torch.randperm(len(x), generator=g).split(100):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def trained_tiny_net(width: int = 8, seed: int = INIT_SEED) -> TinyNet:
    """A standardly trained (hence non-robust) TinyNet, in eval mode, without gradients on its parameters."""
    net = TinyNet(width)
    net.load_state_dict(_trained_state(width, seed))
    return net.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent, computed in eval mode without touching the model's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return 100.0 * (model(x).argmax(1) == y).float().mean().item()
    finally:
        model.train(was_training)
