"""afs.analysis: features, t-SNE, gradient maps, weight statistics and model costs on tiny real networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from afs import analysis
from afs.models import WideResNet
from afs.stacking import StackedModel


def tiny_net(seed: int) -> WideResNet:
    torch.manual_seed(seed)
    return WideResNet(depth=10, widen_factor=1, num_classes=10)  # 64-d features


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, generator=g)  # odd batch
    y = torch.randint(0, 10, (7,), generator=g)
    return x, y


def test_features_of_shapes_dtypes_and_batching(images):
    x, _ = images
    net = tiny_net(0)
    f = analysis.features_of(net, x, batch_size=3)
    assert f.shape == (7, net.feature_dim) and f.dtype == torch.float32
    # uint8 and the same images as float in [0, 1] give the same features; batching does not matter.
    torch.testing.assert_close(f, analysis.features_of(net, x.float() / 255, batch_size=7))
    stack = StackedModel([tiny_net(0), tiny_net(1)], 10)
    fs = analysis.features_of(stack, x, batch_size=4)
    assert fs.shape == (7, 2 * net.feature_dim)
    torch.testing.assert_close(fs[:, : net.feature_dim], f)  # member 0's block is member 0's features
    net.train()
    analysis.features_of(net, x)
    assert net.training  # mode restored
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        analysis.features_of(net, x.float())  # 0..255 floats are not images in [0, 1]
    with pytest.raises(ValueError, match="4-D"):
        analysis.features_of(net, x[0])


def test_tsne_is_deterministic_and_2d():
    g = np.random.default_rng(0)
    feats = np.concatenate([g.normal(0, 1, (20, 8)), g.normal(6, 1, (20, 8))])
    a = analysis.tsne_embedding(feats, seed=3, max_iter=400)
    b = analysis.tsne_embedding(torch.from_numpy(feats), seed=3, max_iter=400)
    assert a.shape == (40, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # Two well-separated clusters stay separated in the embedding.
    assert analysis.knn_accuracy(a, np.repeat([0, 1], 20), k=3) >= 95.0
    with pytest.raises(ValueError, match="2-D"):
        analysis.tsne_embedding(feats[0])
    with pytest.raises(ValueError, match="max_iter"):
        analysis.tsne_embedding(feats, max_iter=10)


def test_knn_accuracy_separated_vs_random():
    g = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 25)
    separated = np.eye(4)[y] * 10 + g.normal(0, 0.1, (100, 4))
    assert analysis.knn_accuracy(separated, y) == 100.0
    noise = g.normal(0, 1, (100, 4))
    assert analysis.knn_accuracy(noise, y) < 60.0
    with pytest.raises(ValueError, match="k must be"):
        analysis.knn_accuracy(noise, y, k=100)


def test_gradient_maps_range_transform_and_no_parameter_grads(images):
    x, y = images
    net = tiny_net(2)
    net.train()
    maps = analysis.input_gradient_maps(net, x, y)
    assert maps.shape == (7, 32, 32) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(7))  # each image's peak is 1
    assert all(p.grad is None for p in net.parameters())
    assert net.training  # mode restored
    # The documented transform, recomputed independently with eval-mode autograd.
    net.eval()
    xf = (x.float() / 255).requires_grad_(True)
    torch.nn.functional.cross_entropy(net(xf), y, reduction="sum").backward()
    g = xf.grad.abs().amax(1)
    g = g / g.flatten(1).amax(1).view(-1, 1, 1)
    ref = torch.log1p(analysis.LOG_K * g) / math.log1p(analysis.LOG_K)
    torch.testing.assert_close(maps, ref, rtol=1e-4, atol=1e-5)


def test_gradient_maps_through_a_stack(images):
    x, y = images
    stack = StackedModel([tiny_net(3), tiny_net(4)], 10)
    maps = analysis.input_gradient_maps(stack, x[:2], y[:2])
    assert maps.shape == (2, 32, 32) and float(maps.max()) == pytest.approx(1.0)
    assert all(p.grad is None for p in stack.parameters())
    with pytest.raises(ValueError, match="integer labels"):
        analysis.input_gradient_maps(stack, x[:2], y[:3])


def test_classifier_weights_of_a_net_and_a_stack():
    net = tiny_net(5)
    assert analysis.classifier_weights(net).shape == (10 * 64,)
    stack = StackedModel([tiny_net(5), tiny_net(6), tiny_net(7)], 10)
    w = analysis.classifier_weights(stack)
    assert w.shape == (10 * 3 * 64,)
    # Row-major (classes, 3 * 64): member i's block is columns i*64 .. (i+1)*64, Fig. 4b's importance ratio.
    mass = np.abs(w.reshape(10, 3, 64)).sum(axis=(0, 2))
    np.testing.assert_allclose(mass / mass.sum(), stack.importance_ratio().numpy(), rtol=1e-5)
    with pytest.raises(TypeError):
        analysis.classifier_weights(torch.nn.Conv2d(1, 1, 1))


def test_weight_concentration_bounds():
    even = np.ones(1000)
    spiky = np.zeros(1000)
    spiky[:10] = 1.0
    assert analysis.weight_concentration(even, top=0.05) == pytest.approx(0.05)
    assert analysis.weight_concentration(spiky, top=0.05) == pytest.approx(1.0)
    g = np.random.default_rng(2)
    heavy, light = g.standard_cauchy(5000), g.uniform(-1, 1, 5000)
    assert analysis.weight_concentration(heavy) > analysis.weight_concentration(light)
    with pytest.raises(ValueError):
        analysis.weight_concentration(even, top=0.0)


def test_model_costs_match_the_papers_table_vi():
    # WRN-28-10: Table VI 36.47 M parameters, 5.24 G multiply-accumulates; WRN-28-30: 328 M, 47.04 G;
    # six stacked WRN-28-10: 218.82 M, 31.44 G. Counted on the meta device (no weights allocated).
    base, large, afs6 = analysis.model_costs(28, 10), analysis.model_costs(28, 30), analysis.model_costs(28, 10, 6)
    for got, params, macs in ((base, 36.47, 5.24), (large, 328.0, 47.04), (afs6, 218.82, 31.44)):
        assert got["params_M"] == pytest.approx(params, rel=2e-3)
        assert got["macs_G"] == pytest.approx(macs, rel=2e-3)
        assert got["flops_G"] == pytest.approx(2 * got["macs_G"])
    # A real (tiny) network counts the same as its meta twin.
    from afs.models import model_cost

    net = tiny_net(0)
    small = analysis.model_costs(10, 1)
    assert small["params_M"] == pytest.approx(model_cost(net)["params"] / 1e6)
    assert small["flops_G"] == pytest.approx(model_cost(net)["flops"] / 1e9)
    stack = StackedModel([tiny_net(0), tiny_net(1)], 10)
    got = analysis.model_costs(10, 1, members=2)["flops_G"]
    assert got == pytest.approx(model_cost(stack)["flops"] / 1e9, rel=1e-3)
