"""bf16 crafting keeps the attack's strength: on a trained network, PGD crafted under bf16 autocast and
scored in fp32 (what `evaluate(craft_precision="bf16")` reports) leaves the accuracy within 0.5 point of PGD
crafted in fp32, at a budget where the attack neither always nor never succeeds (so the check can fail)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from afs.evaluation import evaluate
from afs.runs import AutocastModel, resolve_precision
from toys import make_data, trained_tiny_net

N_TEST = 1000


def trained_cnn():
    """The toy task's trained network (tests/toys.py: ~100% clean, broken near its template amplitude)."""
    return trained_tiny_net()


def test_bf16_crafted_pgd_is_as_strong_as_fp32():
    model = trained_cnn()
    x, y = make_data(N_TEST)
    clean = evaluate(model, x, y, ("clean",), progress=False).accuracy["clean"]
    assert clean > 90  # trained: the check below is about a real decision boundary
    # The smallest budget of a short scan at which fp32 PGD-10 leaves between 20% and 80%: there a weaker
    # bf16 attack would show as a higher accuracy.
    for eps in (0.004, 0.008, 0.012, 0.016, 0.02):
        fp32 = evaluate(model, x, y, ("pgd10",), eps=eps, step_size=eps / 4, progress=False)
        if 20 <= fp32.accuracy["pgd10"] <= 80:
            break
    else:
        pytest.fail(f"no budget of the scan leaves fp32 PGD-10 between 20% and 80% (last {fp32.accuracy})")
    bf16 = evaluate(model, x, y, ("pgd10",), eps=eps, step_size=eps / 4, progress=False, craft_precision="bf16")
    a32, a16 = fp32.accuracy["pgd10"], bf16.accuracy["pgd10"]
    assert abs(a16 - a32) <= 0.5, f"bf16-crafted PGD-10 {a16:.1f}% vs fp32 {a32:.1f}% at eps {eps}"


def test_bf16_crafting_scores_in_fp32():
    """Clean accuracy under craft_precision="bf16" is the fp32 network's own, to the sample."""
    model = trained_cnn()
    x, y = make_data(256)
    a = evaluate(model, x, y, ("clean",), progress=False, craft_precision="bf16").correct["clean"]
    with torch.no_grad():
        assert torch.equal(a, model(x).argmax(1) == y)
    with pytest.raises(ValueError, match="craft_precision"):
        evaluate(model, x, y, ("clean",), progress=False, craft_precision="fp16")


def test_autocast_view_is_bf16_inside_fp32_out():
    model = trained_cnn()
    x, _ = make_data(8)
    out = AutocastModel(model, "cpu")(x)
    assert out.dtype == torch.float32
    with torch.no_grad():
        assert (out - model(x)).abs().max() < 0.5  # bf16's ~3 significant digits, not another function
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
