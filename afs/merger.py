"""Training the linear merger of a stack (Eq. 5), with the same checkpoint/resume/log as extractors.

    min_{W,b}  E_(x,y) [ alpha · CE(z(x), y) + (1 - alpha) · max_{|x̂ - x|_inf <= eps} CE(z(x̂), y) ]

x̂ is PGD (``attack_steps`` steps of ``attack_step_size`` at ``eps``, 8/255 in the paper) against the
**whole stacked model**, regenerated for every batch with the current merger. Two modes:

* ``paired`` (default): Eq. 5 as written, both terms on the same samples of each batch;
* ``split``: the authors' released code: the first ``floor(alpha·B)`` samples of a batch stay clean, the
  rest are replaced by adversarial examples, and one mean cross-entropy is taken over the batch.

Only the merger's parameters receive gradients: the extractors are frozen, so the features are computed
under ``no_grad`` and the merger is trained on them (the backward pass never enters the extractors).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from afs.attacks import PGD
from afs.config import MergerMode, Profile
from afs.data import DeviceLoader
from afs.io import SEEDING, atomic_torch_save, derive_seed, load_torch, state_hash
from afs.runs import RunDir, autocast_for, configure_numerics, fit, iterate, lr_schedule
from afs.stacking import StackedModel
from afs.training import TrainData, stage_data, validation_accuracy

__all__ = ["MergerMode", "train_merger", "split_count", "save_merger", "load_merger"]


def split_count(alpha: float, batch: int) -> int:
    """Clean samples in a ``split``-mode batch: ``floor(alpha · B)`` (the authors' code)."""
    return int(math.floor(alpha * batch + 1e-9))  # 1e-9: 0.3 * 10 must give 3, not 2


def save_merger(stack: StackedModel, path: str | Path, **extra: object) -> None:
    # Only W and b are stored (the members are their own stages' checkpoints), with the feature layout
    # (d_i per member) and the members' budgets, which load_merger checks before loading.
    atomic_torch_save({"format": "afs-merger/1", "feature_dims": list(stack.feature_dims),
                       "budgets": list(stack.budgets or ()), "state_dict": stack.merger.state_dict(),
                       "extra": dict(extra)}, Path(path))


def load_merger(stack: StackedModel, path: str | Path) -> StackedModel:
    """Load merger weights into ``stack``; the checkpoint must describe the same feature blocks."""
    payload = load_torch(path, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != "afs-merger/1":
        raise ValueError(f"{path} is not an afs merger checkpoint")
    if tuple(payload["feature_dims"]) != stack.feature_dims:
        raise ValueError(f"merger checkpoint {path} was trained on feature blocks {payload['feature_dims']}, "
                         f"this stack has {list(stack.feature_dims)}")
    if payload["budgets"] and stack.budgets is not None and tuple(payload["budgets"]) != tuple(stack.budgets):
        raise ValueError(f"merger checkpoint {path} belongs to members {payload['budgets']}, "
                         f"this stack has {list(stack.budgets)}")
    stack.merger.load_state_dict(payload["state_dict"])
    return stack


def merger_identity(config: Profile, data: TrainData, stack: StackedModel, alpha: float, mode: str) -> dict[str, Any]:
    """Everything a merger's training depends on (its ``config.json``): alpha, mode, the merger settings (the
    profile's default stack, alpha and mode aside: this stage's own are recorded), the data by content, and
    each member by the content hash of its weights, so a retrained member makes the old merger unusable."""
    # The profile's default stack, alpha and mode are not this stage's: a sweep point records its own.
    mc = {k: v for k, v in dataclasses.asdict(config.merger).items() if k not in ("stack", "alpha", "mode")}
    return {"stage": "merger", "alpha": alpha, "mode": mode, "budgets": list(stack.budgets or ()),
            "feature_dims": list(stack.feature_dims), "members": [state_hash(m) for m in stack.extractors],
            "merger": mc, "data": stage_data(config, data), "seed": config.seed, "seeding": SEEDING,
            "precision": config.precision, "deterministic": config.deterministic,
            "compile_attacks": config.compile_attacks}


def train_merger(
    stack: StackedModel,
    config: Profile,
    data: TrainData,
    alpha: float | None = None,
    mode: str | MergerMode | None = None,
    *,
    run_dir: str | Path,
    device: torch.device | str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> StackedModel:
    """Train ``stack.merger`` by Eq. 5 and return the stack with the early-stopped merger (eval mode).

    ``alpha`` and ``mode`` default to the profile's. ``alpha = 1`` trains on clean data only (no attack
    is run); ``alpha = 0`` on adversarial data only.

    Epoch selection: the epoch with the best validation value of Eq. 5's own objective,
    ``alpha * clean + (1 - alpha) * pgd`` accuracy, on the held-out split. Selecting every alpha by the
    same ``clean + pgd`` would pull the alpha sweep (Table II) toward its middle: an alpha = 0 merger would be
    kept at the epoch where it is least robust-only. The authors' code keeps the last epoch; with a schedule
    that decays to ~0 the two agree once the merger has converged (its loss curve is in ``log.jsonl``).
    """
    mc = config.merger
    alpha = mc.alpha if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha weighs the clean term of Eq. 5 and must lie in [0, 1], got {alpha}")
    try:
        mode = MergerMode(mc.mode if mode is None else mode)
    except ValueError:
        raise ValueError(f"unknown merger mode {mode!r}; valid: {[m.value for m in MergerMode]}") from None
    if not isinstance(stack, StackedModel):
        raise TypeError(f"train_merger needs an afs.stacking.StackedModel, got {type(stack).__name__}")
    # Arguments are checked before anything is trained or loaded; the stage runs on the stack's device.
    device = torch.device(device) if device is not None else next(stack.parameters()).device
    stack = stack.to(device)
    run = RunDir(run_dir)
    identity = merger_identity(config, data, stack, alpha, mode.value)
    run.check(identity)  # first: a merger over other members, settings or data is never handed back
    if run.is_complete():
        return load_merger(stack, run.best).eval()
    run.start(identity, device)
    configure_numerics(config.precision, config.deterministic, device)

    # One stream per (profile seed, alpha, mode): the merger's init, its batch order and its attack starts.
    seed = derive_seed("merger", config.seed, round(alpha * 1000), mode.value)
    torch.manual_seed(seed)
    stack.merger.reset_parameters()  # W (K, sum d_i), b (K,): a fresh linear layer for every alpha
    # The paper's merger recipe (Section III): SGD, lr 0.1 -> 0.01 at epoch 3 of 5, momentum 0.9, weight decay
    # 5e-4, batch 100; the profile holds the numbers. Only W and b are optimised.
    params = list(stack.merger.parameters())
    optimizer = torch.optim.SGD(params, lr=mc.lr, momentum=mc.momentum, weight_decay=mc.weight_decay)
    loader = DeviceLoader(data.train.images, data.train.labels, mc.batch_size, shuffle=True,
                          augment=config.data.augment, drop_last=True, seed=seed, device=device)
    scheduler, per_batch = lr_schedule(optimizer, mc.lr_schedule, epochs=mc.epochs, batches_per_epoch=len(loader),
                                       milestones=mc.lr_milestones, gamma=mc.lr_gamma)
    # Eq. 5's inner max: PGD against z = merger(G(x)) with the *current* W, b (an adaptive attack: the
    # examples follow the merger as it trains). eps is 8/255 in the paper, whatever the members' budgets.
    attack = PGD(stack, eps=mc.eps, step_size=mc.attack_step_size, steps=mc.attack_steps,
                 compile=config.compile_attacks)

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        # x (B, 3, 32, 32) -> G(x) (B, sum d_i), the members' pooled features side by side -> logits (B, K).
        # Under bf16 autocast the merger's Linear runs in bf16 like every layer; W and b stay fp32 (autocast
        # casts per op), so SGD updates them at full precision.
        with torch.no_grad():  # frozen extractors: no graph through them
            feats = stack.features(x)
        return stack.merger(feats.float())

    def train_epoch(epoch: int) -> dict[str, float]:
        stack.train()
        loader.set_epoch(epoch)
        n = loss_sum = 0.0
        # The loss curve: mean loss over each tenth of the epoch (log.jsonl's train_loss_trace), so a plot
        # of it shows whether the merger has converged, not just one number per epoch.
        trace, chunk, chunk_n = [], 0.0, 0
        every = max(1, len(loader) // 10)
        for i, (x, y) in enumerate(iterate(loader, f"merger a={alpha} {mode.value} epoch {epoch + 1}", progress)):
            s = derive_seed("train", seed, epoch, i)  # this batch's attack starts, whatever ran before
            with autocast_for(device, config.precision):
                if mode is MergerMode.PAIRED:
                    # Eq. 5 on the same B samples: alpha * CE(z(x), y) + (1 - alpha) * CE(z(x_adv), y); the
                    # term whose weight is 0 is skipped, so alpha = 1 runs no attack at all.
                    loss = 0.0
                    if alpha > 0:
                        loss = alpha * F.cross_entropy(logits_of(x), y)
                    if alpha < 1:
                        x_adv = attack(x, y, seed=s)  # against the whole stack, with the current merger
                        loss = loss + (1 - alpha) * F.cross_entropy(logits_of(x_adv), y)
                else:
                    # The released code: one CE over a batch of floor(alpha*B) clean and B - k adversarial
                    # samples, i.e. Eq. 5's weighting in expectation, not per sample.
                    k = split_count(alpha, len(y))
                    x_mix = x.clone()
                    if k < len(y):
                        x_mix[k:] = attack(x[k:], y[k:], seed=s)
                    loss = F.cross_entropy(logits_of(x_mix), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # reaches W and b only: the features were computed under no_grad
            optimizer.step()
            if per_batch:  # one-cycle steps per batch; the paper's step schedule per epoch (in fit)
                scheduler.step()
            # Epoch mean weighted by batch size (drop_last makes every batch B, but the mean is honest anyway).
            n += len(y)
            loss_sum += loss.item() * len(y)
            chunk, chunk_n = chunk + loss.item(), chunk_n + 1
            if chunk_n == every or i == len(loader) - 1:
                trace.append(chunk / chunk_n)
                chunk, chunk_n = 0.0, 0
        return {"train_loss": loss_sum / n, "train_loss_trace": trace}

    def validate(epoch: int) -> dict[str, float]:
        # Eq. 5 at alpha = 1 has no robust term: nothing to select on, so no attack (the training one otherwise).
        # Same seed every epoch: the epochs are compared on the same validation starts.
        return validation_accuracy(stack, data.val, attack if alpha < 1 else None, seed=seed, device=device,
                                   precision=config.precision, batch_size=256)

    # fit() keeps the epoch that maximises this (see the docstring: each alpha selected by its own objective).
    def objective(val: dict[str, float]) -> float:
        return alpha * val["clean"] + (1 - alpha) * val.get("pgd", 0.0)  # Eq. 5's weighting, as accuracies

    t0 = time.time()
    result = fit(run, model=stack.merger, optimizer=optimizer, scheduler=scheduler, epochs=mc.epochs,
                 train_epoch=train_epoch, validate=validate, score=objective,
                 save_best=lambda p: save_merger(stack, p, alpha=alpha, mode=mode.value),
                 stop_after=stop_after, per_batch_schedule=per_batch)
    if len(result.history) < mc.epochs:  # stopped early on purpose (stop_after): resumable, not finished
        return stack.eval()
    # The returned merger is the selected epoch's, not the last one's; metrics.json records which and why.
    best = result.history[result.best_epoch]
    load_merger(stack, run.best)
    run.finish({"alpha": alpha, "mode": mode.value, "budgets": list(stack.budgets or ()),
                "best_epoch": result.best_epoch, "epochs": mc.epochs,
                "val": {k[4:]: v for k, v in best.items() if k.startswith("val_")},
                "importance_ratio": stack.importance_ratio().tolist(),
                "train_seconds_this_call": time.time() - t0})
    return stack.eval()
