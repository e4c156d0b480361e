"""PGD adversarial training of one feature extractor (Eq. 3-4), with early stopping and exact resume.

For every mini-batch the inner maximisation of Eq. 3 is solved by the project's one PGD (`afs.attacks.PGD`),
then the network takes one SGD step on the adversarial batch; budget 0 is standard training. The epoch with
the best *validation* robust accuracy is kept (Rice et al. 2020); the test set is never looked at. Under
``torchrun`` this trains data-parallel and equals the one-process run up to summation order
(`afs.distributed`); only rank 0 writes run files, every rank resumes from ``state.pt``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from afs import distributed
from afs.attacks import PGD, eval_mode
from afs.config import ModelConfig, Profile
from afs.data import DeviceLoader, ImageData
from afs.io import SEEDING, derive_seed
from afs.models import build_model, load_model, save_checkpoint
from afs.runs import RunDir, autocast_for, configure_numerics, fit, iterate, lr_schedule

__all__ = ["TrainData", "train_extractor", "budget_name", "validation_accuracy", "stage_data"]


@dataclass(frozen=True)
class TrainData:
    """The training split and the held-out validation split carved from it (never the test set)."""

    train: ImageData
    val: ImageData


def budget_name(eps: float | tuple[float, float]) -> str:
    """A run-directory name: ``eps8`` for 8/255, ``eps3-8`` for a random budget in [3/255, 8/255]."""
    if isinstance(eps, tuple):
        return f"eps{round(eps[0] * 255)}-{round(eps[1] * 255)}"
    return f"eps{round(eps * 255)}"


def _check_eps(eps: Any) -> tuple[float, float] | float:
    # eps is the L-inf radius of Eq. 3's ball in [0, 1] pixel units; a (low, high) pair is Table VI's random budget.
    if isinstance(eps, tuple):
        lo, hi = map(float, eps)
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"a random budget range must satisfy 0 <= low <= high <= 1, got {eps}")
        return lo, hi
    eps = float(eps)
    if not 0 <= eps <= 1:
        raise ValueError(f"eps is an L-inf radius in [0, 1] pixel units (8/255 = {8 / 255:.4f}), got {eps}")
    return eps


@torch.no_grad()  # PGD turns gradients back on for its own steps
def validation_accuracy(model: nn.Module, val: ImageData, attack: PGD | None, *, seed: int, device: torch.device,
                        precision: str, batch_size: int) -> dict[str, float]:
    """Clean and (with ``attack``) PGD accuracy in percent on the validation split: the one accuracy loop
    of model selection (extractors' early stopping, the merger's best epoch), in eval mode."""
    # Unlike `afs.evaluation.evaluate` it counts every image the attack leaves right: selection needs a
    # score, not the protocol's per-sample flags. Batch i's attack is seeded by derive_seed("val", seed, i).
    loader = DeviceLoader(val.images, val.labels, batch_size, shuffle=False, device=device)
    rank, world = distributed.rank(), distributed.world_size()
    clean = robust = 0.0
    with eval_mode(model):
        for i, (x, y) in enumerate(loader):
            # Under a process group rank r takes batches r, r + w, ..., each with its index's seed, so the
            # summed counts equal a single process's.
            if i % world != rank:
                continue
            with autocast_for(device, precision):
                clean += (model(x).argmax(1) == y).sum().item()
                if attack is not None:
                    x_adv = attack(x, y, seed=derive_seed("val", seed, i))
                    robust += (model(x_adv).argmax(1) == y).sum().item()
    clean, robust = distributed.all_reduce_sums([clean, robust])
    # Percent of the whole validation split (every rank returns the same numbers).
    out = {"clean": 100 * clean / len(val)}
    if attack is not None:
        out["pgd"] = 100 * robust / len(val)
    return out


def train_extractor(
    config: Profile,
    data: TrainData,
    eps: float | tuple[float, float],
    *,
    run_dir: str | Path,
    device: torch.device | str | None = None,
    model_config: ModelConfig | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> nn.Module:
    """PGD-AT one extractor at L-inf budget ``eps`` (pixel units, e.g. ``8/255``) and return the
    early-stopped network (eval mode). ``eps=(lo, hi)`` draws a budget uniformly from [lo, hi] for every
    batch (Table VI's 'Rand. pert.' ablation). A finished run directory is loaded, not retrained; an
    interrupted one resumes from its last epoch. ``model_config`` overrides the profile's network
    (Table VI's wider model). ``stop_after`` stops after that many epochs (for kill-and-resume tests).
    Under a process group of w ranks ``config``'s batch is the global batch and must be divisible by w
    (`afs.distributed.scale_profile` scales it instead).
    """
    eps = _check_eps(eps)
    ddp = distributed.is_distributed()
    world, rank = distributed.world_size(), distributed.rank()
    if device is not None:
        device = torch.device(device)
    elif ddp:
        device = distributed.local_device()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if ddp and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # init_distributed set it to LOCAL_RANK
    progress = progress and rank == 0  # one progress bar per job, not one per rank
    ec = config.extractor
    if ec.batch_size % world:
        raise ValueError(f"the global batch {ec.batch_size} cannot be split evenly over {world} ranks; use a world "
                         f"size that divides it, or scale the batch with the ranks (afs train-extractor --scale-batch)")
    per_rank = ec.batch_size // world  # B / w images per rank and step
    model_config = model_config or config.model
    run = RunDir(run_dir)
    identity = extractor_identity(config, data, eps, model_config)
    run.check(identity)  # first: a finished stage made with other settings or data is never handed back
    if distributed.same_on_all_ranks(run.is_complete(), f"{run.metrics} exists"):
        return _ready(load_model(run.best, map_location=device), device)

    run.start(identity, device)
    configure_numerics(config.precision, config.deterministic, device)
    # One stream per (profile seed, budget in 1/255; a random-budget range by its ends).
    seed = derive_seed("extractor", config.seed, *[round(e * 255) for e in (eps if isinstance(eps, tuple) else (eps,))])
    torch.manual_seed(seed)  # weight initialisation
    model = _ready(build_model(model_config, len(data.train.classes)), device).train()
    net: nn.Module = model  # what the training forward runs: the DDP wrapper under a process group
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        # Global-batch BN statistics (afs.distributed explains the choice), then DDP (gradient averaging).
        model = distributed.convert_sync_batchnorm(model, device)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if rank == 0:
            print(f"{budget_name(eps)}: data-parallel over {world} ranks, global batch {ec.batch_size} "
                  f"({per_rank} per rank), lr {ec.lr:g}, synchronised batch norm", file=sys.stderr, flush=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=ec.lr, momentum=ec.momentum, weight_decay=ec.weight_decay)
    # drop_last: every rank runs the same number of steps (DDP needs it); rank r gets rows r::w of each batch,
    # in an order seeded per epoch (exact resume).
    loader = DeviceLoader(data.train.images, data.train.labels, per_rank, shuffle=True,
                          augment=config.data.augment, drop_last=True, seed=seed, device=device,
                          rank=rank, world_size=world)
    scheduler, per_batch = lr_schedule(optimizer, ec.lr_schedule, epochs=ec.epochs, batches_per_epoch=len(loader),
                                       milestones=ec.lr_milestones, gamma=ec.lr_gamma)
    eps_max = eps[1] if isinstance(eps, tuple) else eps

    def pgd(e: float, steps: int) -> PGD:
        # Eq. 4: uniform random start, `steps` signed steps, projection onto the eps-ball and the [0, 1] box.
        # The step is attack_step_ratio * e when the config sets a ratio (Madry et al.'s 2.5 * eps / steps),
        # else the fixed attack_step_size. PGD runs on the unwrapped network: no DDP hooks or gradient sync.
        step = ec.attack_step_size if ec.attack_step_ratio is None else ec.attack_step_ratio * e
        return PGD(model, eps=e, step_size=step, steps=steps, compile=config.compile_attacks)

    attack = pgd(eps_max, ec.attack_steps)

    def train_epoch(epoch: int) -> dict[str, float]:
        net.train()
        loader.set_epoch(epoch)
        total = correct = loss_sum = 0.0
        t0 = time.time()
        for i, (x, y) in enumerate(iterate(loader, f"{budget_name(eps)} epoch {epoch + 1}/{ec.epochs}", progress)):
            # x (B/w, 3, 32, 32) float in [0, 1], y (B/w,); s seeds this batch's attack (and random budget).
            s = derive_seed("train", seed, epoch, i)
            with autocast_for(device, config.precision):
                if eps_max > 0:
                    atk = attack
                    if isinstance(eps, tuple):  # one budget per batch, drawn reproducibly
                        g = torch.Generator().manual_seed(s)
                        atk = pgd(eps[0] + (eps[1] - eps[0]) * torch.rand((), generator=g).item(), ec.attack_steps)
                    # Under DDP each rank starts from its rows of the one-process start (same seed).
                    x0 = distributed.global_batch_start(x, atk.eps, s, rank, world) if ddp else None
                    # The attack runs in eval mode (BN uses its running statistics, not updated by attack
                    # passes), as in TRADES' code, and PGD restores train mode after: the attack is a pure
                    # function of the weights. Madry's and Rice et al.'s code attack in train mode instead.
                    x = atk(x, y, seed=s, start_from=x0)
                logits = net(x)
                loss = F.cross_entropy(logits, y)  # Eq. 3 outer minimisation (DDP: mean of the rank means)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if per_batch:
                scheduler.step()
            total += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
        # Metrics are summed over ranks: every rank logs the global batch's numbers.
        total, correct, loss_sum = distributed.all_reduce_sums([total, correct, loss_sum])
        out = {"train_loss": loss_sum / total, "train_adv_acc": 100 * correct / total, "epoch_time_s": time.time() - t0}
        if ddp:  # the log says how the global batch was split
            out.update(world_size=world, global_batch=ec.batch_size, per_rank_batch=per_rank)
        return out

    def validate(epoch: int) -> dict[str, float]:
        # Early stopping (Rice et al. 2020) measures PGD at the extractor's own training budget on the
        # validation split carved from the training set (clean accuracy only for budget 0).
        return validation_accuracy(model, data.val, pgd(eps_max, ec.val_attack_steps) if eps_max > 0 else None,
                                   seed=seed, device=device, precision=config.precision,
                                   batch_size=max(ec.batch_size, 256))

    def score(val: dict[str, float]) -> float:
        # Robustness at the training budget first; clean accuracy breaks ties (and decides for budget 0).
        return val.get("pgd", 0.0) + 1e-3 * val["clean"] if eps_max > 0 else val["clean"]

    t0 = time.time()
    # The whole schedule is trained; fit keeps the best-scoring epoch's weights as best.pt.
    result = fit(run, model=model, optimizer=optimizer, scheduler=scheduler, epochs=ec.epochs,
                 train_epoch=train_epoch, validate=validate, score=score if ec.early_stopping else None,
                 save_best=lambda path: save_checkpoint(model, path, eps=eps_max),
                 stop_after=stop_after, per_batch_schedule=per_batch)
    if len(result.history) < ec.epochs:  # stopped early on request: not complete, resumable
        return model.eval()
    best = result.history[result.best_epoch]
    run.finish({
        "eps": eps, "budget": budget_name(eps), "best_epoch": result.best_epoch, "epochs": ec.epochs,
        "val": {k[4:]: v for k, v in best.items() if k.startswith("val_")},
        "train_seconds_this_call": time.time() - t0,
        "model": model_config.__dict__,
    })
    return _ready(load_model(run.best, map_location=device), device)


def stage_data(config: Profile, data: TrainData) -> dict[str, Any]:
    """The data a training stage reads, by content: which images and labels (hashes), and whether augmented."""
    return {"name": data.train.name, "augment": config.data.augment, "train": data.train.sha, "val": data.val.sha}


def extractor_identity(config: Profile, data: TrainData, eps: float | tuple[float, float],
                       model_config: ModelConfig) -> dict[str, Any]:
    # Everything one extractor's training depends on (its config.json): the budget, the network, the
    # extractor settings (the grid's budget list aside), the data by content, seed and precision policy.
    # A run folder is reused only for the same identity (RunDir.check).
    ec = {k: v for k, v in dataclasses.asdict(config.extractor).items() if k != "budgets"}
    return {"stage": "extractor", "eps": eps, "model": dataclasses.asdict(model_config), "extractor": ec,
            "data": stage_data(config, data), "seed": config.seed, "seeding": SEEDING, "precision": config.precision,
            "deterministic": config.deterministic, "compile_attacks": config.compile_attacks}


def _ready(model: nn.Module, device: torch.device) -> nn.Module:
    # channels_last weights: convolutions then run NHWC, faster on CPUs (oneDNN) and GPUs (tensor cores)
    # alike, with no change of arithmetic precision.
    return model.to(device=device, memory_format=torch.channels_last).eval()
