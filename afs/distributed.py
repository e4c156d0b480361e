"""Scale-out through PyTorch's own stack: ``torchrun`` process groups and exact DDP helpers (the grid of
stages runs on submitit, `afs.grid`).

Nothing here launches processes: ``torchrun`` (or SLURM + ``torchrun``) does, and this module reads the
environment it sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Three parts:

* **Process group** (`init_distributed`, `rank`, `world_size`, `is_main`, `barrier`, `all_reduce_sums`,
  `broadcast_object`, `same_on_all_ranks`): a group with a finite timeout, so a rank that dies or hangs
  makes the others fail loudly instead of waiting forever. Without torchrun every helper is the trivial
  single-process answer, so library code calls them unconditionally.
* **Exact data parallelism** (`CrossRankBatchNorm2d`, `convert_sync_batchnorm`, `global_batch_start`,
  `scale_profile`): a DDP run of one extractor computes what a single process computes with the same
  global batch, up to floating-point summation order. Three things make it so: the loader gives rank r
  the rows ``r::w`` of every global batch (`afs.data.DeviceLoader`), batch norm uses the statistics of
  the *global* batch, and each rank's PGD random start is the slice of the start a single process would
  draw for the whole batch. A run may therefore be resumed on a different number of GPUs.
Sharded evaluation is a mode of `afs.evaluation.evaluate`: under a process group it splits the test set
across the ranks by whole batches and gathers the per-sample results back (identical to one process's).

Batch-norm choice: in DDP training batch norm is synchronised across ranks (torch's ``SyncBatchNorm`` on
CUDA; `CrossRankBatchNorm2d`, an all-reduce implementation, on other devices, where ``SyncBatchNorm``
does not run). Plain per-rank BN would normalise over ``B / world`` samples (16 per GPU for the paper's
128 on 8 GPUs), a different and noisier recipe that changes with the GPU count. The cost is small here:
PGD-AT spends ~10/11 of its passes in the eval-mode attack, where BN uses running statistics and does
not communicate; only the one train-mode forward/backward per step synchronises.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

import afs_kernels
from afs_kernels import Choice

__all__ = [
    "Backend",
    "DEFAULT_TIMEOUT_S",
    "launched_by_torchrun",
    "env_world_size",
    "init_distributed",
    "bind_local_device",
    "shutdown",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "local_device",
    "barrier",
    "all_reduce_sums",
    "broadcast_object",
    "same_on_all_ranks",
    "CrossRankBatchNorm2d",
    "convert_sync_batchnorm",
    "global_batch_start",
    "scale_profile",
]

log = logging.getLogger("afs.distributed")
T = TypeVar("T")

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


# ----------------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------------


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

    Outside torchrun, or with ``WORLD_SIZE=1``, nothing is created and ``False`` is returned: every helper
    in this module then answers for one process. ``backend`` defaults to NCCL when CUDA is available, else
    gloo. ``timeout_s`` bounds every collective (see `DEFAULT_TIMEOUT_S`). Calling it again is a no-op.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched_by_torchrun():
        return False
    world, rnk, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
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
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                             f"--nproc-per-node must not exceed the GPUs per node")
        torch.cuda.set_device(local)  # NCCL binds each process to its own GPU
    dist.init_process_group(be.value, init_method="env://", timeout=timedelta(seconds=float(timeout_s)))
    if is_main():
        log.info("process group: %d ranks, backend %s, timeout %.0f s", world, be.value, timeout_s)
    return True


def shutdown() -> None:
    """Leave the process group (if any); safe to call always, e.g. in a ``finally``."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process is one of two or more ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, the one rank that writes run files; True in a single process."""
    return rank() == 0


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` with GPUs (one GPU per process), else the CPU."""
    if torch.cuda.is_available():
        index = _env_int("LOCAL_RANK") if launched_by_torchrun() else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={index} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    return torch.device("cpu")


def bind_local_device() -> torch.device:
    """`local_device`, made the *current* CUDA device (``torch.cuda.set_device``) when there is one. Every
    torchrun path calls it, process group or not:
    without it each rank's default device, and so its caching allocator and any launch that follows the
    current device, is GPU 0."""
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


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (picklable objects; identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def same_on_all_ranks(flag: bool, what: str) -> bool:
    """``flag`` after checking every rank sees the same value; differing values raise RuntimeError.

    Ranks decide on their own whether a run is complete or has a checkpoint to resume from; if one node
    cannot see the files rank 0 wrote, the ranks would train different things and deadlock. This turns
    that into an immediate, explained failure.
    """
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag)), -int(bool(flag))], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # [max(flag), -min(flag)]
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise RuntimeError(f"ranks disagree on whether {what}: the run directory must be on a file system every "
                           f"node sees (a shared file system for multi-node jobs)")
    return bool(hi)


# ----------------------------------------------------------------------------------------------------
# Exact data parallelism: global-batch BN statistics and rank-independent attack noise
# ----------------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: d(sum over ranks)/d(local input) is the sum over ranks of the
    upstream gradients, so the backward pass is the same all-reduce (torch's own differentiable
    all-reduce in ``torch.distributed.nn`` is deprecated, its replacement private)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch across all ranks.

    A device-agnostic ``SyncBatchNorm`` (which runs on CUDA only): the per-channel sum, then the sum of
    squared deviations from the global mean, are all-reduced by `_AllReduceSum`, whose
    backward all-reduces the gradients, so the input gradient
    is the gradient of the global-batch loss. Two passes (mean, then centred squares) rather than
    ``E[x^2] - E[x]^2`` avoid cancellation. In eval mode, or without a process group, it is exactly
    ``BatchNorm2d``. Same parameters and buffers, so checkpoints load into a plain ``BatchNorm2d``.
    """

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
    if type(module) is nn.BatchNorm2d:  # exact type: an already converted layer is left alone
        new = CrossRankBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats, device=device)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(module, name, converted)
    return module


def global_batch_start(x: Tensor, eps: float, seed: int, rank: int, world_size: int) -> Tensor:
    """PGD's uniform start for this rank's rows of a global batch: the rows a single process would draw.

    Rank ``r`` of ``w`` holds rows ``r::w`` of each global batch (`afs.data.DeviceLoader` sharding). The
    start is drawn, from the batch's shared seed, for a batch of the global size in which this rank's rows
    hold its images (the others hold placeholders: the noise stream depends on positions, not on pixel
    values), and this rank's rows are kept; the caller passes them as ``PGD(...)(x, y, start_from=...)``.
    The gradient steps then run on the local rows only, so only the start's random numbers are drawn ``w``
    times, and a w-rank run of an extractor equals the one-process run up to summation order.
    """
    rows = slice(rank, None, world_size)
    full = x.new_full((x.shape[0] * world_size, *x.shape[1:]), 0.5)  # (w*b, C, H, W) placeholders
    full[rows] = x.detach()
    gen = torch.Generator(device=x.device).manual_seed(seed)  # as PGD seeds its own generator per call
    return afs_kernels.random_start(full, eps, "Linf", generator=gen)[rows]


def scale_profile(profile: Any, ranks: int) -> Any:
    """The profile with the extractor's global batch and learning rate multiplied by ``ranks``.

    The default keeps the profile's global batch (each rank takes ``batch / ranks``), which is the
    paper's recipe on any number of GPUs. Scaling keeps the per-rank batch instead and raises the learning
    rate linearly (Goyal et al. 2017): faster per epoch on many GPUs, but a different recipe, recorded as
    such in the stage's ``config.json``.
    """
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an int >= 1, got {ranks!r}")
    ec = profile.extractor
    return profile.replace(extractor=dataclasses.replace(ec, batch_size=ec.batch_size * ranks, lr=ec.lr * ranks))
