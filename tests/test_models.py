"""Models: the paper's WRN-28-10 sizes, the feature interface, checkpoints that refuse the wrong network."""

import pytest
import torch

from afs.config import ModelConfig
from afs.models import (
    CheckpointMismatchError,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    build_model,
    model_cost,
    load_model,
    save_checkpoint,
)


def test_wrn_28_10_matches_the_papers_size():
    m = WideResNet(28, 10, num_classes=10)
    cost = model_cost(m)
    assert cost["params"] == 36_479_194  # 36.48M (Table VI prints 36.47)
    assert m.feature_dim == 640
    # 10.49 GFLOP counted by torch.utils.flop_counter = 5.24 G multiply-accumulates (Table VI's "5.24").
    flops = cost["flops"]
    assert round(flops / 1e9, 2) == 10.49
    assert round(flops / 2e9, 2) == 5.24


def test_preact_resnet18_size():
    m = PreActResNet18(num_classes=10)
    assert model_cost(m)["params"] == 11_172_170 and m.feature_dim == 512


@pytest.mark.parametrize("model", [WideResNet(10, 2, 7), PreActResNet18(7), SmallCNN(1, 7)],
                         ids=["wrn-10-2", "preact18", "cnn-1"])
def test_features_and_logits(model):
    model.eval()
    x = torch.rand(3, 3, 32, 32)
    f = model.features(x)
    assert f.shape == (3, model.feature_dim)
    assert (f >= 0).all()  # after ReLU + average pool
    # The interface the stack's fused head relies on: features = mean_hw relu(final_bn(feature_map(x))).
    fmap = model.feature_map(x)
    assert isinstance(model.final_bn, torch.nn.BatchNorm2d) and fmap.shape[:2] == (3, model.feature_dim)
    assert torch.equal(f, torch.relu(model.final_bn(fmap)).mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), model.head(f))
    assert model(x).shape == (3, 7)


def test_small_cnn_cost_and_model_cost_restores_modes():
    m = SmallCNN(2, 10).train()
    m.bn.eval()  # a frozen part: model_cost must give back each module's own mode, not one for all
    assert model_cost(m) == {"params": 141_034, "flops": 58_395_136}  # 0.14M parameters, 0.058 GFLOP
    assert m.training and m.head.training and not m.bn.training


def test_normalisation_lives_inside_the_model():
    m = WideResNet(10, 1, 10).eval()
    x = torch.rand(2, 3, 32, 32)
    m2 = WideResNet(10, 1, 10, mean=None, std=None).eval()
    m2.load_state_dict(m.state_dict())
    assert not torch.allclose(m(x), m2(x))  # same weights, different input scaling
    assert "mean" not in m.state_dict()  # fixed buffers are not weights


def test_checkpoint_round_trip(tmp_path):
    m = WideResNet(10, 2, 10)
    with torch.no_grad():
        m.head.bias.add_(1.0)
    m.final_bn.running_mean.add_(0.5)
    save_checkpoint(m, tmp_path / "m.pt", budget=8)
    rebuilt = load_model(tmp_path / "m.pt")
    assert isinstance(rebuilt, WideResNet) and rebuilt.kwargs == m.kwargs
    for (k, a), (_, b) in zip(m.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), k
    into = load_model(tmp_path / "m.pt", WideResNet(10, 2, 10))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(into.eval()(x), m.eval()(x))


@pytest.mark.parametrize("model", [WideResNet(10, 1, 10), SmallCNN(1, 10)], ids=["wrn-10-1", "cnn-1"])
def test_state_dict_keys_are_the_checkpoints(model):
    """Saved checkpoints (results/, runs/) name the final BN "bn" and the classifier "head"; the final_bn
    accessor must not add keys, or every existing checkpoint would stop loading."""
    keys = set(model.state_dict())
    assert {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "head.weight", "head.bias"} <= keys
    assert not any(k.startswith("final_bn") or k.startswith("normalize") for k in keys)
    assert model.final_bn is model.bn


def test_checkpoint_into_wrong_network_is_a_clear_error(tmp_path):
    save_checkpoint(WideResNet(10, 2, 10), tmp_path / "m.pt")
    with pytest.raises(CheckpointMismatchError, match=r"widen_factor=2.*widen_factor=1"):
        load_model(tmp_path / "m.pt", WideResNet(10, 1, 10))
    with pytest.raises(CheckpointMismatchError, match="PreActResNet18"):
        load_model(tmp_path / "m.pt", PreActResNet18(10))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an afs model checkpoint"):
        load_model(tmp_path / "other.pt")


def test_bad_arguments():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=12)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model(ModelConfig(arch="vit"), 10)
