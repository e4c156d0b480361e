"""Analyses behind the paper's figures that are not accuracies: features and t-SNE (Fig. 3), classifier and
merger weights (Fig. 5), input gradients (Fig. 6), model costs (Table VI), and the plotting helpers that
keep the notebooks' cells short.

Nothing here trains or attacks; models come in trained (``afs.report.pipeline(...)``) and are only read.
Every function that runs a model puts it in eval mode and restores every submodule's mode afterwards, and
takes gradients with respect to the input only, so no parameter's ``.grad`` is written.

Fig. 6's transform, exactly (`input_gradient_maps`): for each image, ``g = |dCE/dx|`` reduced over the
colour channels by their maximum, ``g <- g / max(g)`` (so the map lies in [0, 1] and its largest pixel is
1), then ``m = log(1 + k*g) / log(1 + k)`` with ``k = 100``; ``m`` lies in [0, 1] again (0 -> 0, 1 -> 1)
and the log lifts the small gradients that a linear colour scale would show as black.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afs.attacks import eval_mode, model_device, on_model_device

__all__ = [
    "features_of",
    "tsne_embedding",
    "knn_accuracy",
    "input_gradient_maps",
    "classifier_weights",
    "weight_concentration",
    "member_blocks",
    "model_costs",
    "plot_tsne",
    "plot_weight_histogram",
    "plot_gradient_grid",
    "plot_curves",
    "plot_importance",
    "plot_budget_sweep",
    "plot_accuracy_plane",
]

LOG_K = 100.0  # the k of Fig. 6's log transform log(1 + k*g) / log(1 + k)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------
def _as_unit_images(x: Any, name: str = "images") -> Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1]; float images must already lie in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div(255.0)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be uint8 (0..255) or float in [0, 1], got {x.dtype}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(f"float {name} must lie in [0, 1], got [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    return x


def _check_extractor(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module) or not hasattr(model, "features"):
        raise TypeError(f"expected an afs extractor or stack with features(x), got {type(model).__name__}")
    return model


# ----------------------------------------------------------------------------------------------------
# Fig. 3: features and their t-SNE embedding
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def features_of(model: nn.Module, images: Tensor, batch_size: int = 500,
                device: torch.device | str | None = None) -> Tensor:
    """Penultimate features ``g(x)`` (Eq. 2) of a network, or the concatenation ``G(x)`` of a stack.

    Args:
        model: an ``afs.models`` network or an ``afs.stacking.StackedModel`` (anything with ``features``).
        images: (N, 3, H, W) uint8 (as stored by ``afs.data``) or float in [0, 1]; any device.
        batch_size: images per forward pass.
        device: where the model runs (default: its parameters' device).

    Returns (N, feature_dim) float32 on the CPU.
    """
    model = _check_extractor(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    dev = torch.device(device) if device is not None else model_device(model)
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-D batch (N, C, H, W), got shape {tuple(images.shape)}")
    out = []
    with eval_mode(model):
        for i in range(0, images.shape[0], batch_size):
            xb = _as_unit_images(images[i:i + batch_size].to(dev))
            out.append(model.features(xb).float().cpu())  # (b, feature_dim)
    if not out:
        return torch.zeros(0, int(getattr(model, "feature_dim", 0)))
    return torch.cat(out)


def tsne_embedding(features: Tensor | np.ndarray, seed: int = 0, perplexity: float = 30.0,
                   max_iter: int = 1000) -> np.ndarray:
    """2-D t-SNE of ``features`` (N, d), deterministic for a seed (Fig. 3).

    PCA initialisation and ``random_state=seed`` make repeated calls return the same embedding. The
    features are standardised per dimension first, so that a concatenation of two networks' features
    (Fig. 3c) is not dominated by whichever network has the larger activations. ``perplexity`` is capped
    at ``(N - 1) / 3`` so that small test sets (the smoke profile) still work. ``max_iter`` (>= 250) is
    sklearn's number of optimisation steps.
    """
    from sklearn.manifold import TSNE

    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d), got shape {x.shape}")
    if x.shape[0] < 5:
        raise ValueError(f"t-SNE needs at least 5 samples, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    x = x.astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)  # per-dimension standardisation
    perp = float(min(perplexity, (x.shape[0] - 1) / 3.0))
    if max_iter < 250:
        raise ValueError(f"max_iter must be >= 250 (sklearn's minimum), got {max_iter}")
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, learning_rate="auto",
                max_iter=max_iter)
    return tsne.fit_transform(x).astype(np.float32)  # (N, 2)


def knn_accuracy(features: Tensor | np.ndarray, labels: Tensor | np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (percent) of ``features``: a number for what Fig. 3 shows
    by eye ("features separated well"). Euclidean distance on standardised features, majority vote,
    ties to the nearest neighbour's class."""
    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need features (N, d) and labels (N,), got {x.shape} and {y.shape}")
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, N-1] = [1, {x.shape[0] - 1}], got {k}")
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None, :] - 2.0 * x @ x.T  # (N, N) squared distances
    np.fill_diagonal(d, np.inf)  # leave one out
    nn_idx = np.argsort(d, axis=1)[:, :k]  # (N, k), nearest first
    votes = y[nn_idx]
    pred = np.empty_like(y)
    for i, v in enumerate(votes):
        counts = np.bincount(v)
        best = np.flatnonzero(counts == counts.max())
        pred[i] = v[0] if v[0] in best else best[0]  # tie: the nearest neighbour's class
    return float(100.0 * (pred == y).mean())


# ----------------------------------------------------------------------------------------------------
# Fig. 6: input-gradient maps
# ----------------------------------------------------------------------------------------------------
def input_gradient_maps(model: nn.Module, x: Tensor, y: Tensor, k: float = LOG_K) -> Tensor:
    """Fig. 6: ``log(1 + k*g) / log(1 + k)`` of the per-image normalised ``g = max_c |dCE/dx|``.

    Args:
        model: any network returning logits (a single net or a whole stack: the gradient flows through
            every member, as in an attack on the stack).
        x: (N, C, H, W) uint8 or float images in [0, 1].
        y: (N,) integer labels (the loss is the cross-entropy of the true label).
        k: strength of the log transform (> 0).

    Returns (N, H, W) float32 in [0, 1] on the CPU, each image's maximum equal to 1 (0 everywhere if the
    gradient vanishes). The model is in eval mode for the pass and its modes are restored; the gradient
    is taken w.r.t. ``x`` only (``torch.autograd.grad``), so no parameter's ``.grad`` is touched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module returning logits, got {type(model).__name__}")
    if not (isinstance(k, (int, float)) and k > 0):
        raise ValueError(f"k must be a positive number, got {k!r}")
    xu = on_model_device(model, _as_unit_images(x, "x")).detach().clone().requires_grad_(True)
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != xu.shape[0] or y.is_floating_point():
        raise ValueError(f"y must be integer labels of shape ({xu.shape[0]},), got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    with eval_mode(model), torch.enable_grad():
        logits = model(xu)
        # Summed CE: each image's gradient is its own loss's gradient (the images do not interact in
        # eval mode), and the per-image normalisation below makes the scale irrelevant anyway.
        loss = F.cross_entropy(logits.float(), on_model_device(model, y), reduction="sum")
        (grad,) = torch.autograd.grad(loss, xu)
    g = grad.detach().abs().amax(dim=1).float().cpu()  # (N, H, W): strongest channel per pixel
    peak = g.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny).view(-1, 1, 1)
    g = g / peak  # [0, 1], max 1 per image
    return (torch.log1p(k * g) / math.log1p(k)).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Fig. 5: classifier and merger weights
# ----------------------------------------------------------------------------------------------------
def classifier_weights(model: nn.Module) -> np.ndarray:
    """The weight matrix of a model's final linear layer as a flat float64 array (Fig. 5): a single
    network's ``head`` (classes x feature_dim) or a stack's ``merger`` (classes x n*feature_dim)."""
    layer = getattr(model, "merger", None)
    if not isinstance(layer, nn.Linear):
        layer = getattr(model, "head", None)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(model).__name__} has neither a 'merger' nor a 'head' nn.Linear")
    return layer.weight.detach().cpu().double().numpy().ravel()


def weight_concentration(weights: np.ndarray | Tensor, top: float = 0.05) -> float:
    """Share of the total ``|w|`` mass held by the largest ``top`` fraction of entries (in [top, 1]).

    Fig. 5's reading in a number: a head that "heavily depends on a few key features" has a high share;
    an evenly spread merger has a share close to ``top``.
    """
    w = np.abs(weights.detach().cpu().numpy() if isinstance(weights, Tensor) else np.asarray(weights)).ravel()
    if w.size == 0:
        raise ValueError("weights is empty")
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must be in (0, 1], got {top}")
    n_top = max(1, int(round(top * w.size)))
    total = w.sum()
    if total == 0:
        return float(top)  # all-zero weights: perfectly even
    return float(np.sort(w)[::-1][:n_top].sum() / total)


def member_blocks(stack: nn.Module) -> list[np.ndarray]:
    """The merger's weight split into each member's block ``W_i`` (classes x feature_dim_i), flat; the
    blocks whose ``sum|W_i| / sum|W|`` is Fig. 4b's importance ratio."""
    if not hasattr(stack, "merger") or not hasattr(stack, "feature_dims"):
        raise TypeError(f"expected an afs StackedModel, got {type(stack).__name__}")
    w = stack.merger.weight.detach().cpu().double()
    return [blk.numpy().ravel() for blk in w.split(list(stack.feature_dims), dim=1)]


# ----------------------------------------------------------------------------------------------------
# Table VI at the paper's scale, without allocating the weights
# ----------------------------------------------------------------------------------------------------
def model_costs(depth: int, widen_factor: int, members: int = 1, num_classes: int = 10) -> dict[str, float]:
    """Parameters (M) and forward cost (GFLOP and GMAC per 1x3x32x32 image) of a WRN-depth-widen network,
    or of a stack of ``members`` of them plus one merger, counted on the ``meta`` device (no memory, so
    WRN-28-30 with its 328M parameters is free to count). FLOPs from ``torch.utils.flop_counter`` via
    `afs.models.model_cost`; one multiply-accumulate is two FLOPs (the paper's "Flops" are MACs)."""
    from afs.models import WideResNet, model_cost

    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    with torch.device("meta"):
        net = WideResNet(depth, widen_factor, num_classes)
    cost = model_cost(net)
    params, flops = cost["params"], cost["flops"]
    if members > 1:
        # Members' heads are not used by the stack; the merger reads n * feature_dim features.
        head = sum(p.numel() for p in net.head.parameters())
        params = members * (params - head) + (members * net.feature_dim + 1) * num_classes
        flops = members * (flops - 2 * net.feature_dim * num_classes) + 2 * members * net.feature_dim * num_classes
    return {"params_M": params / 1e6, "flops_G": flops / 1e9, "macs_G": flops / 2e9}


# ----------------------------------------------------------------------------------------------------
# Plotting helpers (matplotlib imported on use)
# ----------------------------------------------------------------------------------------------------
def plot_tsne(ax: Any, embedding: np.ndarray, labels: Tensor | np.ndarray, classes: Sequence[str],
              title: str) -> None:
    """One t-SNE panel of Fig. 3: points coloured by class, a legend-free axis (t-SNE units are arbitrary)."""
    y = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    cmap = _cmap("tab10")
    for c, name in enumerate(classes):
        pts = embedding[y == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(c % 10), label=name, alpha=0.8, linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("t-SNE 1 (arbitrary units)")
    ax.set_ylabel("t-SNE 2 (arbitrary units)")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_weight_histogram(ax: Any, weights: np.ndarray, title: str, bins: int = 60) -> None:
    """One Fig. 5 panel: the histogram of a linear layer's weights, as a density (the layers differ in size)."""
    ax.hist(weights, bins=bins, density=True, color="tab:blue", alpha=0.85)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("weight value")
    ax.set_ylabel("density (1 / weight unit)")


def plot_gradient_grid(images: Tensor, maps: Mapping[str, Tensor], labels: Sequence[str] | None = None) -> Any:
    """Fig. 6 layout: one row per image; the image, then each model's gradient map (columns named by
    ``maps``' keys). Returns the figure."""
    import matplotlib.pyplot as plt

    x = _as_unit_images(images).cpu()
    n, names = x.shape[0], list(maps)
    fig, axes = plt.subplots(n, 1 + len(names), figsize=(1.6 * (1 + len(names)) + 1.2, 1.6 * n + 0.4),
                             squeeze=False, layout="constrained")
    im = None
    for i in range(n):
        axes[i, 0].imshow(x[i].permute(1, 2, 0).numpy())
        axes[i, 0].set_ylabel(labels[i] if labels is not None else "", fontsize=8)
        for j, name in enumerate(names):
            im = axes[i, j + 1].imshow(maps[name][i].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(["image"] + names):
        axes[0, j].set_title(name, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label=f"log(1+{LOG_K:g}·|∂CE/∂x|/max) / log(1+{LOG_K:g})")
    return fig


def _yerr(values: Sequence[float], intervals: Sequence[Sequence[float] | None] | None) -> list[list[float]] | None:
    """matplotlib ``yerr`` (2 x n: below, above) from one 95% interval ``(lo, hi)`` per value (None: no bar)."""
    if intervals is None:
        return None
    below = [0.0 if ci is None else max(0.0, v - ci[0]) for v, ci in zip(values, intervals)]
    above = [0.0 if ci is None else max(0.0, ci[1] - v) for v, ci in zip(values, intervals)]
    return [below, above]


def plot_curves(ax: Any, budgets_255: Sequence[float], curves: Mapping[str, Sequence[float]], title: str, *,
                intervals: Mapping[str, Sequence[Sequence[float]]] | None = None,
                ylabel: str = "accuracy under PGD-10 (%)") -> None:
    """Fig. 4a: PGD accuracy (%) against the test budget (in 1/255), one line per model; AFS drawn bold.
    ``intervals`` (e.g. a summary's ``curves["ci95"]``): per model, one 95% interval ``[lo, hi]`` per budget,
    drawn as error bars."""
    span = (max(budgets_255) - min(budgets_255)) or 1.0
    for i, (name, acc) in enumerate(curves.items()):
        bold = name.startswith("AFS")
        (line,) = ax.plot(budgets_255, acc, marker="o", ms=3, lw=2.5 if bold else 1.2, color="k" if bold else None,
                          label=name, zorder=3 if bold else 2)
        ci = (intervals or {}).get(name)
        if ci is not None:
            # Each model's bars sit a hair to the side of the budget, so bars at one budget do not hide each other.
            dx = (i - (len(curves) - 1) / 2) * 0.012 * span
            ax.errorbar([b + dx for b in budgets_255], acc, yerr=_yerr(acc, ci), fmt="none", elinewidth=1,
                        capsize=2, ecolor=line.get_color(), zorder=line.get_zorder())
    ax.set_xlabel("test perturbation budget eps (x/255, L-inf)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_importance(ax: Any, members: Sequence[int], ratios: Mapping[str, Sequence[float]], title: str) -> None:
    """Fig. 4b: importance ratio ``sum|W_i| / sum|W|`` of each stacked network, one line per alpha."""
    for name, r in ratios.items():
        ax.plot(range(len(members)), r, marker="o", label=name)
    ax.set_xticks(range(len(members)))
    ax.set_xticklabels([f"#{b}\n({b}/255)" for b in members], fontsize=8)
    ax.set_xlabel("stacked network (training budget)")
    ax.set_ylabel("importance ratio (fraction of merger |W|)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_budget_sweep(ax: Any, budgets_255: Sequence[float], series: Mapping[str, Sequence[float]], title: str, *,
                      intervals: Mapping[str, Sequence[Sequence[float] | None]] | None = None) -> None:
    """Table I as a plot: accuracy (%) of single networks against their training budget, one line per metric;
    ``intervals``: per metric, one 95% interval ``(lo, hi)`` per budget, drawn as error bars."""
    for name, values in series.items():
        ax.errorbar(budgets_255, values, yerr=_yerr(values, (intervals or {}).get(name)), marker="o", ms=4,
                    capsize=2, label=name)
    ax.set_xlabel("training budget eps_i (x/255, L-inf)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_accuracy_plane(ax: Any, groups: Mapping[str, Mapping[str, tuple[float, float]]], title: str, *,
                        xlabel: str = "robust accuracy, PGD-20 at 8/255 (%)", ylabel: str = "clean accuracy (%)",
                        iso_tradeoff: bool = True,
                        intervals: Mapping[str, Mapping[str, tuple[Any, Any]]] | None = None) -> None:
    """Accuracy against robustness (the plane of paper Fig. 1): ``groups`` maps a legend entry to
    ``{point label: (robust %, clean %)}``; each group gets one marker. Dashed grey lines join points of
    equal mean(clean, robust), the paper's trade-off score, so "up and to the right" is visibly better.
    ``intervals``: ``{group: {point label: (robust (lo, hi), clean (lo, hi))}}``, 95% intervals drawn as
    error bars in both directions (`afs.report.plane_points` builds both from summary records); a group or
    point without one, or a None interval, gets no bar (the paper's own numbers have none)."""
    xs = [p[0] for g in groups.values() for p in g.values()]
    ys = [p[1] for g in groups.values() for p in g.values()]
    # The view covers every point and both ends of every interval, with a 5-point margin.
    cis = [c for g in (intervals or {}).values() for c in g.values()]
    xs_view = xs + [v for c in cis if c[0] is not None for v in c[0]]
    ys_view = ys + [v for c in cis if c[1] is not None for v in c[1]]
    if iso_tradeoff and xs:
        x0, x1, y0, y1 = min(xs_view) - 5, max(xs_view) + 5, min(ys_view) - 5, max(ys_view) + 5
        t = np.array([x0, x1])
        # One line every 5 points of trade-off, y = 2c - x, for every c whose line crosses the view.
        for c in np.arange(5 * math.floor((x0 + y0) / 10), 5 * math.ceil((x1 + y1) / 10) + 0.1, 5.0):
            ax.plot(t, 2 * c - t, ls="--", lw=0.6, color="0.75", zorder=1)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    for k, (group, pts) in enumerate(groups.items()):
        gx = [p[0] for p in pts.values()]
        gy = [p[1] for p in pts.values()]
        sc = ax.scatter(gx, gy, marker=_MARKERS[k % len(_MARKERS)], s=40, label=group, zorder=3)
        ci = (intervals or {}).get(group)
        if ci:
            xci = [ci.get(name, (None, None))[0] for name in pts]
            yci = [ci.get(name, (None, None))[1] for name in pts]
            ax.errorbar(gx, gy, xerr=_yerr(gx, xci), yerr=_yerr(gy, yci), fmt="none", lw=0.8, capsize=2,
                        ecolor=sc.get_facecolor()[0], zorder=2)
        for i, (name, (px, py)) in enumerate(pts.items()):
            # Labels alternate above/below their point, and every other group labels to the left, so that
            # neighbours in a cluster (the published methods of Fig. 1) overlap less.
            left = k % 2 == 1
            ax.annotate(name, (px, py), textcoords="offset points", xytext=(-5 if left else 4, 3 if i % 2 == 0 else -9),
                        fontsize=7, ha="right" if left else "left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.2)
    ax.legend(fontsize=8, loc="best")


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]
