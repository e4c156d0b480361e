"""Analyses behind the paper's figures that are not accuracies: features and t-SNE (Fig. 3), classifier and
merger weights (Fig. 5), input gradients (Fig. 6), model costs (Table VI), and the notebooks' plotting helpers.

Nothing here trains or attacks: trained models are only read, in eval mode with every submodule's mode
restored, and gradients are taken w.r.t. the input only (no parameter's ``.grad`` is written).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afs.attacks import check_images, eval_mode, on_model_device
from afs.report import yerr

LOG_K = 100.0  # the k of Fig. 6's log transform log(1 + k*g) / log(1 + k)


def _unit_images(x: Any, name: str = "images") -> Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1]; float images must already lie in [0, 1]."""
    return check_images(x.float().div(255.0) if isinstance(x, Tensor) and x.dtype == torch.uint8 else x, name)


def _numpy(a: Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)


# --- Fig. 3: features and their t-SNE embedding -------------------------------------------------------------
@torch.no_grad()
def features_of(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """Penultimate features ``g(x)`` (Eq. 2) of a network, or the concatenation ``G(x)`` of a stack (anything
    with ``features``), of (N, 3, H, W) uint8 or [0, 1] float images on any device. Returns (N, feature_dim)
    float32 on the CPU."""
    if not isinstance(model, nn.Module) or not hasattr(model, "features"):
        raise TypeError(f"expected an afs extractor or stack with features(x), got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    with eval_mode(model):
        out = [model.features(_unit_images(on_model_device(model, images[i:i + batch_size]))).float().cpu()
               for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, int(getattr(model, "feature_dim", 0)))


def tsne_embedding(features: Tensor | np.ndarray, seed: int = 0, max_iter: int = 1000) -> np.ndarray:
    """2-D t-SNE of ``features`` (N, d) for Fig. 3, deterministic for a seed (PCA initialisation). Features are
    standardised per dimension, so a concatenation of two networks' (Fig. 3c) is not dominated by the larger
    activations; the perplexity, 30, is capped at ``(N - 1) / 3`` for small test sets; sklearn checks ``max_iter``
    (>= 250) and refuses NaN or inf."""
    from sklearn.manifold import TSNE

    x = _numpy(features).astype(np.float64)
    if x.ndim != 2 or x.shape[0] < 5:
        raise ValueError(f"features must be 2-D (N, d) with N >= 5 for t-SNE, got shape {x.shape}")
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)  # per-dimension standardisation
    tsne = TSNE(n_components=2, perplexity=float(min(30.0, (x.shape[0] - 1) / 3.0)), init="pca",
                random_state=seed, learning_rate="auto", max_iter=max_iter)
    return tsne.fit_transform(x).astype(np.float32)  # (N, 2)


def knn_accuracy(features: Tensor | np.ndarray, labels: Tensor | np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy (%) of ``features``, a number for what Fig. 3 shows by eye ("features
    separated well"): Euclidean distance on standardised features, majority vote, ties to the nearest's class."""
    x, y = _numpy(features), _numpy(labels)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need features (N, d) and labels (N,), got {x.shape} and {y.shape}")
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, N-1] = [1, {x.shape[0] - 1}], got {k}")
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None, :] - 2.0 * x @ x.T  # (N, N) squared distances
    np.fill_diagonal(d, np.inf)  # leave one out
    pred = np.empty_like(y)
    for i, v in enumerate(y[np.argsort(d, axis=1)[:, :k]]):  # (k,) neighbours' labels, nearest first
        counts = np.bincount(v)
        best = np.flatnonzero(counts == counts.max())
        pred[i] = v[0] if v[0] in best else best[0]  # tie: the nearest neighbour's class
    return float(100.0 * (pred == y).mean())


# --- Fig. 6: input-gradient maps; Fig. 5: classifier and merger weights; Table VI: costs --------------------
def input_gradient_maps(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Fig. 6: per image, ``g = max_c |dCE/dx|`` normalised by its maximum (so the map's largest pixel is 1),
    then ``log(1 + k*g) / log(1 + k)`` with ``k = LOG_K``: still in [0, 1], the log lifting the small gradients
    a linear colour scale would show as black.

    ``model``: any network returning logits (a stack too: the gradient flows through every member, as in an
    attack on it); ``x``: (N, C, H, W) uint8 or float images in [0, 1]; ``y``: (N,) integer labels (the loss
    is the true label's cross-entropy). Returns (N, H, W) float32 on the CPU (0 where the gradient vanishes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module returning logits, got {type(model).__name__}")
    xu = on_model_device(model, _unit_images(x, "x")).detach().clone().requires_grad_(True)
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != xu.shape[0] or y.is_floating_point():
        raise ValueError(f"y must be integer labels of shape ({xu.shape[0]},), got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    with eval_mode(model), torch.enable_grad():
        # Summed CE: each image's gradient is its own loss's (images do not interact in eval mode), and the
        # per-image normalisation below makes the scale irrelevant anyway.
        loss = F.cross_entropy(model(xu).float(), on_model_device(model, y), reduction="sum")
        (grad,) = torch.autograd.grad(loss, xu)
    g = grad.detach().abs().amax(dim=1).float().cpu()  # (N, H, W): strongest channel per pixel
    g = g / g.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny).view(-1, 1, 1)  # max 1 per image
    return (torch.log1p(LOG_K * g) / math.log1p(LOG_K)).clamp_(0.0, 1.0)


def classifier_weights(model: nn.Module) -> np.ndarray:
    """Fig. 5: a stack's ``merger`` (classes x n*feature_dim) or a network's ``head`` weight, flat float64."""
    for name in ("merger", "head"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            return layer.weight.detach().cpu().double().numpy().ravel()
    raise TypeError(f"{type(model).__name__} has neither a 'merger' nor a 'head' nn.Linear")


def weight_concentration(weights: np.ndarray | Tensor, top: float = 0.05) -> float:
    """Share of the total ``|w|`` held by the largest ``top`` fraction of entries (in [top, 1]), Fig. 5's reading
    in a number: high for a head that "heavily depends on a few key features", about ``top`` if evenly spread."""
    w = np.abs(_numpy(weights)).ravel()
    if w.size == 0:
        raise ValueError("weights is empty")
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must be in (0, 1], got {top}")
    total = w.sum()
    if total == 0:
        return float(top)  # all-zero weights: perfectly even
    return float(np.sort(w)[::-1][:max(1, int(round(top * w.size)))].sum() / total)


def model_costs(depth: int, widen_factor: int, members: int = 1) -> dict[str, float]:
    """Table VI's parameters (M) and forward cost (GFLOP, GMAC per image) of a WRN-depth-widen network or a stack
    of ``members`` of them plus one merger, on CIFAR-10: `afs.cost.network_cost` (counted on the meta device)."""
    from afs.config import ModelConfig
    from afs.cost import network_cost

    c = network_cost(ModelConfig(depth=depth, widen_factor=widen_factor), 10, members)
    return {k: c[k] for k in ("params_M", "flops_G", "macs_G")}


# --- Plotting helpers (matplotlib imported on use) ----------------------------------------------------------
def _labels(ax: Any, title: str, xlabel: str, ylabel: str, grid: float | None = 0.3) -> None:
    """Title and axis labels; with ``grid`` (its alpha), a grid and a legend too."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if grid is not None:
        ax.grid(alpha=grid)
        ax.legend(fontsize=8)


def plot_tsne(ax: Any, embedding: np.ndarray, labels: Tensor | np.ndarray, classes: Sequence[str],
              title: str) -> None:
    """One t-SNE panel of Fig. 3: points coloured by class, no ticks (t-SNE units are arbitrary)."""
    import matplotlib

    y, cmap = _numpy(labels), matplotlib.colormaps["tab10"]
    for c, name in enumerate(classes):
        pts = embedding[y == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(c % 10), label=name, alpha=0.8, linewidths=0)
    _labels(ax, title, "t-SNE 1 (arbitrary units)", "t-SNE 2 (arbitrary units)", grid=None)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_weight_histogram(ax: Any, weights: np.ndarray, title: str) -> None:
    """One Fig. 5 panel: the histogram of a linear layer's weights, as a density (the layers differ in size)."""
    ax.hist(weights, bins=60, density=True, color="tab:blue", alpha=0.85)
    _labels(ax, title, "weight value", "density (1 / weight unit)", grid=None)


def plot_gradient_grid(images: Tensor, maps: Mapping[str, Tensor], labels: Sequence[str] | None = None) -> Any:
    """Fig. 6 layout: one row per image, the image and then each model's map (columns: ``maps``' keys)."""
    import matplotlib.pyplot as plt

    x = _unit_images(images).cpu()
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


def plot_curves(ax: Any, budgets_255: Sequence[float], curves: Mapping[str, Sequence[float]], title: str, *,
                intervals: Mapping[str, Sequence[Sequence[float]]] | None = None,
                ylabel: str = "accuracy under PGD-10 (%)") -> None:
    """Fig. 4a: PGD accuracy (%) against the test budget (1/255), one line per model, AFS bold; ``intervals``
    (e.g. a summary's ``curves["ci95"]``): per model, one 95% interval per budget, drawn as error bars."""
    span = (max(budgets_255) - min(budgets_255)) or 1.0
    for i, (name, acc) in enumerate(curves.items()):
        bold = name.startswith("AFS")
        (line,) = ax.plot(budgets_255, acc, marker="o", ms=3, lw=2.5 if bold else 1.2, color="k" if bold else None,
                          label=name, zorder=3 if bold else 2)
        ci = (intervals or {}).get(name)
        if ci is not None:
            # Each model's bars sit a hair to the side of the budget, so bars at one budget do not hide each other.
            dx = (i - (len(curves) - 1) / 2) * 0.012 * span
            ax.errorbar([b + dx for b in budgets_255], acc, yerr=yerr(acc, ci), fmt="none", elinewidth=1,
                        capsize=2, ecolor=line.get_color(), zorder=line.get_zorder())
    _labels(ax, title, "test perturbation budget eps (x/255, L-inf)", ylabel)


def plot_importance(ax: Any, members: Sequence[int], ratios: Mapping[str, Sequence[float]], title: str) -> None:
    """Fig. 4b: importance ratio ``sum|W_i| / sum|W|`` of each stacked network, one line per alpha."""
    for name, r in ratios.items():
        ax.plot(range(len(members)), r, marker="o", label=name)
    ax.set_xticks(range(len(members)))
    ax.set_xticklabels([f"#{b}\n({b}/255)" for b in members], fontsize=8)
    _labels(ax, title, "stacked network (training budget)", "importance ratio (fraction of merger |W|)")


def plot_budget_sweep(ax: Any, budgets_255: Sequence[float], series: Mapping[str, Sequence[float]], title: str, *,
                      intervals: Mapping[str, Sequence[Sequence[float] | None]] | None = None) -> None:
    """Table I as a plot: single networks' accuracy (%) against their training budget, one line per metric;
    ``intervals``: per metric, one 95% interval per budget, drawn as error bars."""
    for name, values in series.items():
        ax.errorbar(budgets_255, values, yerr=yerr(values, (intervals or {}).get(name)), marker="o", ms=4,
                    capsize=2, label=name)
    _labels(ax, title, "training budget eps_i (x/255, L-inf)", "test accuracy (%)")


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_accuracy_plane(ax: Any, groups: Mapping[str, Mapping[str, tuple[float, float]]], title: str, *,
                        xlabel: str = "robust accuracy, PGD-20 at 8/255 (%)", ylabel: str = "clean accuracy (%)",
                        intervals: Mapping[str, Mapping[str, tuple[Any, Any]]] | None = None) -> None:
    """Accuracy against robustness (paper Fig. 1): ``groups`` maps a legend entry (one marker each) to
    ``{point label: (robust %, clean %)}``; dashed grey lines join points of equal mean(clean, robust), the
    paper's trade-off. ``intervals``: ``{group: {point label: (robust (lo, hi), clean (lo, hi))}}``, drawn as
    error bars (`afs.report.plane_points` builds both from records); None or missing: no bar."""
    xs = [p[0] for g in groups.values() for p in g.values()]
    ys = [p[1] for g in groups.values() for p in g.values()]
    # The view covers every point and both ends of every interval, with a 5-point margin.
    cis = [c for g in (intervals or {}).values() for c in g.values()]
    xs_view = xs + [v for c in cis if c[0] is not None for v in c[0]]
    ys_view = ys + [v for c in cis if c[1] is not None for v in c[1]]
    if xs:
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
            ax.errorbar(gx, gy, xerr=yerr(gx, xci), yerr=yerr(gy, yci), fmt="none", lw=0.8, capsize=2,
                        ecolor=sc.get_facecolor()[0], zorder=2)
        # Labels alternate above/below their point, and every other group labels to the left, so that
        # neighbours in a cluster (the published methods of Fig. 1) overlap less.
        left = k % 2 == 1
        for i, (name, (px, py)) in enumerate(pts.items()):
            ax.annotate(name, (px, py), textcoords="offset points", xytext=(-5 if left else 4, 3 if i % 2 == 0 else -9),
                        fontsize=7, ha="right" if left else "left")
    _labels(ax, title, xlabel, ylabel, grid=0.2)
