"""Scale-out through PyTorch's own stack: ``torchrun`` process groups and exact data parallelism (the grid
of stages runs on submitit, `afs.grid`).

Nothing here launches processes: ``torchrun`` (or SLURM + ``torchrun``) does, and this module reads the
environment it sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``).

* **Process group** (`init_distributed`, `rank`, `world_size`, `is_main`, `barrier`, `all_reduce_sums`,
  `same_on_all_ranks`): a group with a finite timeout, so a rank that dies or hangs makes the others fail
  loudly instead of waiting forever. Without torchrun every helper gives the single-process answer, so
  library code calls them unconditionally.
* **Exact data parallelism** (`CrossRankBatchNorm2d`, `convert_sync_batchnorm`, `global_batch_start`,
  `scale_profile`): a DDP run of one extractor computes what one process computes with the same global
  batch, up to floating-point summation order, so a run may resume on another number of GPUs. The loader
  gives rank r the rows ``r::w`` of every global batch (`afs.data.DeviceLoader`), batch norm uses the
  statistics of the *global* batch, and each rank's PGD random start is its slice of the start one
  process would draw for the whole batch. Sharded evaluation is a mode of `afs.evaluation.evaluate`.

Batch norm in DDP training is synchronised across ranks (torch's ``SyncBatchNorm`` on CUDA;
`CrossRankBatchNorm2d` elsewhere, where ``SyncBatchNorm`` does not run). Per-rank BN would normalise over
``B / world`` samples (16 per GPU for the paper's 128 on 8 GPUs), a noisier recipe that changes with the
GPU count. The cost is small: PGD-AT spends ~10/11 of its passes in the eval-mode attack, where BN uses
running statistics; only the one train-mode forward/backward per step synchronises.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

import afs_kernels
from afs_kernels import Choice

__all__ = ["Backend", "DEFAULT_TIMEOUT_S", "launched_by_torchrun", "env_world_size", "init_distributed",
           "bind_local_device", "shutdown", "is_distributed", "rank", "world_size", "is_main", "local_device",
           "barrier", "all_reduce_sums", "same_on_all_ranks", "CrossRankBatchNorm2d", "convert_sync_batchnorm",
           "global_batch_start", "scale_profile"]

log = logging.getLogger("afs.distributed")

# A collective that waits longer than this raises (gloo) or tears the process down (NCCL's watchdog,
# TORCH_NCCL_ASYNC_ERROR_HANDLING defaults to 3), so a dead peer cannot hang a job for hours. Ten minutes
# covers the longest legitimate wait in our loops: rank 0 writing a WRN-28-10 checkpoint, or a stage's
# validation on ranks that finished their shard early.
DEFAULT_TIMEOUT_S = 600.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Backend(Choice):
    """Collective backend. Accepts ``Backend("nccl")`` or ``Backend.NCCL`` (any case)."""

    NCCL = "nccl"  # CUDA tensors, one GPU per process
    GLOO = "gloo"  # CPU tensors; what the tests use on localhost


# --- The process group ---


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its rendezvous variables are in the environment)."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"environment variable {name} must be >= 0, got {value}")
    return value


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 outside torchrun), before any process group exists."""
    return _env_int("WORLD_SIZE") if launched_by_torchrun() else 1


def init_distributed(backend: Backend | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes; returns whether a group of two or more ranks exists.

    Outside torchrun, or with ``WORLD_SIZE=1``, nothing is created (False). ``backend``: NCCL with CUDA, else
    gloo. ``timeout_s`` bounds every collective (`DEFAULT_TIMEOUT_S`). Calling it again is a no-op."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if _joined():
        return is_distributed()
    if not launched_by_torchrun():
        return False
    world, rnk, _local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")  # all three must parse
    if world < 1 or rnk >= world:
        raise ValueError(f"inconsistent torchrun environment: RANK={rnk}, WORLD_SIZE={world}")
    if world == 1:
        return False
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"torchrun environment incomplete, missing {missing} (launch with torchrun)")
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; install a build with distributed support")
    be = Backend(backend) if backend is not None else (Backend.NCCL if torch.cuda.is_available() else Backend.GLOO)
    if be is Backend.NCCL:
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA GPUs; use backend 'gloo' on CPUs")
        bind_local_device()  # NCCL binds each process to its own GPU (cuda:LOCAL_RANK)
    dist.init_process_group(be.value, init_method="env://", timeout=timedelta(seconds=float(timeout_s)))
    if is_main():
        log.info("process group: %d ranks, backend %s, timeout %.0f s", world, be.value, timeout_s)
    return True


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group (if any); safe to call always, e.g. in a ``finally``."""
    if _joined():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _joined() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if _joined() else 1


def is_distributed() -> bool:
    """Whether this process is one of two or more ranks of an initialised process group."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0, the one rank that writes run files; True in a single process."""
    return rank() == 0


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` with GPUs (one GPU per process), else the CPU."""
    if torch.cuda.is_available():
        index = _env_int("LOCAL_RANK") if launched_by_torchrun() else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={index} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                             f"--nproc-per-node must not exceed the GPUs per node")
        return torch.device("cuda", index)
    return torch.device("cpu")


def bind_local_device() -> torch.device:
    """`local_device`, made the *current* CUDA device when there is one. Every torchrun path calls it,
    process group or not: else each rank's default device (its allocator, its launches) is GPU 0."""
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _comm_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    if dist.get_backend() == Backend.NCCL.value:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op in a single process); raises once the group's timeout has passed."""
    if is_distributed():
        dist.barrier()


def all_reduce_sums(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks of per-rank metric sums (counts, loss sums), in float64."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def same_on_all_ranks(flag: bool, what: str) -> bool:
    """``flag`` after checking every rank sees the same value; differing values raise RuntimeError.

    Ranks decide on their own whether a run is complete or resumable; a node that cannot see rank 0's
    files would train something else and deadlock. This makes that an immediate, explained failure."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag)), -int(bool(flag))], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # [max(flag), -min(flag)]
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise RuntimeError(f"ranks disagree on whether {what}: the run directory must be on a file system every "
                           f"node sees (a shared file system for multi-node jobs)")
    return bool(hi)


# --- Exact data parallelism: global-batch BN statistics and rank-independent attack noise ---


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: the backward of an all-reduce is the same all-reduce (torch's own
    differentiable one, ``torch.distributed.nn``, is deprecated, its replacement private)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    backward = forward  # (ctx, upstream gradient) -> its sum over ranks


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch across all ranks.

    A device-agnostic ``SyncBatchNorm`` (which runs on CUDA only): the per-channel sum, then the sum of
    squared deviations from the global mean, are all-reduced by `_AllReduceSum`, so the input gradient is
    that of the global-batch loss. Two passes rather than ``E[x^2] - E[x]^2`` avoid cancellation. In eval
    mode, or without a process group, it is ``BatchNorm2d``; same parameters and buffers (checkpoints load
    into a plain ``BatchNorm2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = (0, 2, 3)  # reduce over batch and space, one statistic per channel
        c = x.shape[1]
        local_n = x.shape[0] * x.shape[2] * x.shape[3]
        # (C + 1,): channel sums and the element count, one all-reduce for both.
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_full((1,), float(local_n))]))
        n = sums[c].detach()
        if float(n) < 2:
            raise ValueError(f"batch norm needs more than one value per channel over the global batch, got {int(n)}")
        mean = sums[:c] / n  # (C,)
        centred = x - mean.view(1, c, 1, 1)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n  # (C,) biased, for normalisation
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum=None means a cumulative average, as in BatchNorm2d.
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                # Running variance is unbiased (n / (n-1)), as BatchNorm2d keeps it.
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module`` with every ``BatchNorm2d`` synchronised across ranks: torch's ``SyncBatchNorm`` on CUDA,
    `CrossRankBatchNorm2d` elsewhere. Weights and running statistics are kept; call before wrapping in DDP."""
    device = torch.device(device)
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:  # exact type: an already converted layer is left alone
            m.__class__ = CrossRankBatchNorm2d  # same parameters, buffers and flags; only forward differs
    return module


def global_batch_start(x: Tensor, eps: float, seed: int, rank: int, world_size: int) -> Tensor:
    """PGD's uniform start for this rank's rows of a global batch: the rows a single process would draw.

    Rank ``r`` of ``w`` holds rows ``r::w`` of each global batch (`afs.data.DeviceLoader`). The start is
    drawn from the batch's shared seed for a global-size batch in which this rank's rows hold its images
    (the others placeholders: the noise depends on positions, not pixels), and this rank's rows are kept,
    for ``PGD(...)(x, y, start_from=...)``. Only the start's random numbers are drawn ``w`` times."""
    rows = slice(rank, None, world_size)
    full = x.new_full((x.shape[0] * world_size, *x.shape[1:]), 0.5)  # (w*b, C, H, W) placeholders
    full[rows] = x.detach()
    gen = torch.Generator(device=x.device).manual_seed(seed)  # as PGD seeds its own generator per call
    return afs_kernels.random_start(full, eps, "Linf", generator=gen)[rows]


def scale_profile(profile: Any, ranks: int) -> Any:
    """The profile with the extractor's global batch and learning rate multiplied by ``ranks``.

    Not scaling keeps the paper's recipe on any number of GPUs (each rank takes ``batch / ranks``). Scaling
    keeps the per-rank batch and raises the learning rate linearly (Goyal et al. 2017): faster per epoch,
    but a different recipe, recorded as such in the stage's ``config.json``."""
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an int >= 1, got {ranks!r}")
    ec = profile.extractor
    return profile.replace(extractor=dataclasses.replace(ec, batch_size=ec.batch_size * ranks, lr=ec.lr * ranks))
