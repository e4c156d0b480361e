"""Run directories and the one epoch loop that extractor and merger training share.

A run directory holds everything a result needs to be trusted and resumed::

    config.json     the profile (and stage arguments) that made it
    manifest.json   git SHA, library versions, device, date
    log.jsonl       one JSON line per epoch
    state.pt        full training state after the last finished epoch (model, optimiser, scheduler,
                    epoch, RNG states, best-so-far), written atomically
    best.pt         the selected model (early stopping), an `afs.models` / merger checkpoint
    metrics.json    written last: its presence marks the stage complete

Resume repeats the run: each epoch's data order and augmentation come from ``(seed, epoch)`` and each
batch's attack noise from ``(seed, epoch, batch)``, so on the CPU a run killed anywhere and resumed from
``state.pt`` ends with exactly the weights of an uninterrupted run (tested). On CUDA that holds bit for bit
only with ``Profile.deterministic`` (`configure_numerics`); without it cuDNN's non-deterministic weight
gradients make two runs, resumed or not, differ in the last bits.

Under a process group (DDP, see `afs.distributed`) every rank runs the same loop, only rank 0 writes
files, and every rank resumes from the same ``state.pt``; a barrier after the writes that other ranks read
(``config.json`` at the start, ``best.pt``/``metrics.json`` at the end) makes them read complete files.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from afs import distributed
from afs import progress as stage_progress  # the terminal's epoch lines (afs reproduce)
from afs.io import atomic_torch_save, atomic_write_json, load_torch, manifest, read_json

__all__ = ["RunDir", "RunConfigMismatchError", "StageBusyError", "fit", "batch_seed", "autocast_for", "FitResult", "PRECISIONS", "lr_schedule",
           "resolve_precision", "AutocastModel", "cpu_bf16_support", "configure_numerics", "cuda_rng_state",
           "restore_cuda_rng"]


class RunConfigMismatchError(RuntimeError):
    """A run directory already holds a run made with a different configuration."""


class StageBusyError(RuntimeError):
    """Another process holds the stage's lock (it is training or evaluating that stage now)."""


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Rank 0 of a process group (or a lone process) writes; the other ranks only read.
        self.main = distributed.is_main()

    # files
    config = property(lambda self: self.path / "config.json")
    log_file = property(lambda self: self.path / "log.jsonl")
    state = property(lambda self: self.path / "state.pt")
    best = property(lambda self: self.path / "best.pt")
    metrics = property(lambda self: self.path / "metrics.json")

    def is_complete(self) -> bool:
        return self.metrics.is_file()

    def read_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics)

    def check(self, config: dict[str, Any]) -> None:
        """Raise `RunConfigMismatchError` if this folder holds a stage made by anything other than ``config``
        (the stage's identity: the settings it reads, its data's and inputs' content hashes). Called before a
        finished stage is reused, so a changed seed, schedule, data subset or retrained member never gets
        the old result back silently."""
        if not self.config.is_file():
            return
        old = read_json(self.config)
        if _canonical(old) != _canonical(config):
            diffs = sorted(_diff_keys(old, config))
            shown = "; ".join(f"{k}: {_short(_at(old, k))} -> {_short(_at(config, k))}" for k in diffs[:4])
            more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
            era = " by an earlier version of afs" if "stage" not in old or "profile" in old else ""
            raise RunConfigMismatchError(
                f"{self.path} holds a stage made{era} with other settings ({shown}{more}). Its result is not "
                f"this configuration's, so it is not reused. To go on: delete {self.path} to redo the stage, or "
                f"run with another --out (or undo the change)")

    @contextmanager
    def lock(self, wait: bool = True) -> Iterator[None]:
        """Hold this stage's lock (``lock`` in the folder, `filelock`): one process trains or evaluates a stage
        at a time. Another holder makes this wait (saying who holds it) or, with ``wait=False``, raise
        `StageBusyError` naming its pid and host. The ranks of one data-parallel job are one trainer: only
        rank 0 takes the lock."""
        if not self.main:
            yield
            return
        from filelock import FileLock, Timeout

        self.path.mkdir(parents=True, exist_ok=True)
        lock, holder = FileLock(str(self.path / "lock")), self.path / "lock.json"
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = _holder(holder)
            if not wait:
                raise StageBusyError(f"{self.path} is held by {who}: that process is training or evaluating this "
                                     f"stage now; wait for it, or stop it") from None
            print(f"afs: waiting for {self.path}, held by {who}", file=sys.stderr, flush=True)
            lock.acquire()
        try:
            atomic_write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(),
                                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})
            yield
        finally:
            holder.unlink(missing_ok=True)
            lock.release()

    def start(self, config: dict[str, Any], device: Any = None) -> None:
        """Create the folder, or check that an existing run was made with the same ``config``."""
        # Every rank checks (so all raise the same error together); only rank 0 writes.
        if self.config.is_file():
            self.check(config)
        elif self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.config, config)
        if self.main:
            atomic_write_json(self.path / "manifest.json", manifest(device))
        self.sync()

    def sync(self) -> None:
        """Wait until every rank is here (no-op in one process): files rank 0 wrote before are complete."""
        distributed.barrier()

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_log(self, last_epoch: int) -> None:
        """Drop log lines of epochs after ``last_epoch`` (written before a kill, redone on resume)."""
        if not self.main or not self.log_file.is_file():
            return
        keep = [ln for ln in self.log_file.read_text().splitlines() if ln and json.loads(ln).get("epoch", -1) <= last_epoch]
        self.log_file.write_text("".join(ln + "\n" for ln in keep))

    def finish(self, metrics: dict[str, Any]) -> None:
        if self.main:
            atomic_write_json(self.metrics, metrics)
        self.sync()


def _holder(path: Path) -> str:
    try:
        h = read_json(path)
        return f"pid {h['pid']} on host {h['host']} (since {h['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def _short(v: Any) -> str:
    """A value as the mismatch message shows it: whole if short, else its kind (a dict of 12 keys ...)."""
    text = repr(v)
    if len(text) <= 40:
        return text
    return f"<{type(v).__name__} of {len(v)}>" if isinstance(v, (dict, list, tuple)) else text[:37] + "..."


def _at(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _canonical(d: Any) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys |= _diff_keys(va, vb, f"{prefix}{k}.")
        elif _canonical(va) != _canonical(vb):
            keys.add(prefix + k)
    return keys


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """A distinct, reproducible seed for each (run, epoch, batch): attack noise independent of resume."""
    return (seed * 1_000_003 + epoch * 10_007 + batch) % (2**31 - 1)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA generator state of the one GPU this process trains on (None off CUDA). Only that device's:
    saving every visible GPU's state (``get_rng_state_all``) made a resume on fewer GPUs fail, and under
    torchrun each rank owns one GPU anyway."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_cuda_rng(state: Any, device: torch.device) -> None:
    """Restore `cuda_rng_state` onto ``device``; accepts the older per-GPU list (takes this GPU's entry,
    if it was saved). Off CUDA, or with no saved state, nothing happens."""
    if state is None or device.type != "cuda":
        return
    if isinstance(state, (list, tuple)):  # runs written before the fix: one state per visible GPU
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(state):
            return
        state = state[index]
    torch.cuda.set_rng_state(state, device)


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_bf16_support() -> dict[str, bool]:
    """What this CPU offers bf16 matrix arithmetic with: AVX512-BF16 instructions and AMX tiles (oneDNN
    uses either for bf16 convolutions and matmuls; without them bf16 autocast is emulated and slower)."""
    cpu = getattr(torch, "cpu", None)
    probe = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return {k: bool(getattr(cpu, fn, lambda: False)()) for k, fn in probe.items()}


def resolve_precision(precision: str, device: torch.device) -> str:
    """A profile's ``precision`` on ``device``. ``"auto"`` is bf16 autocast on CUDA and on a CPU with native
    bf16 arithmetic (`cpu_bf16_support`: AVX512-BF16 or AMX), and fp32 elsewhere. Training and validation
    (early stopping) run under it; test evaluation *crafts* its attacks under it and scores every reported
    accuracy with an fp32 forward (`afs.evaluation.evaluate`, ``craft_precision``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if device.type == "cpu" and any(cpu_bf16_support().values()) else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str) -> Any:
    """bf16 autocast where the profile's precision resolves to bf16 (`resolve_precision`); else exact fp32."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class AutocastModel(nn.Module):
    """``model`` run under bf16 autocast, logits returned in fp32: what evaluation crafts its attacks on
    under a bf16 profile (PGD, curves, audit, AutoAttack only ever call ``model(x)``). The wrapped model's parameters
    and modes are its own (``eval_mode`` and ``model_device`` see through the wrapper)."""

    def __init__(self, model: nn.Module, device_type: str) -> None:
        super().__init__()
        self.model, self.device_type = model, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


def configure_numerics(precision: str, deterministic: bool, device: torch.device) -> dict[str, Any]:
    """Set the process-wide numerics a profile asks for, explicitly, and return them for provenance.

    * TF32 off for matmuls and cuDNN convolutions: a number labelled fp32 is fp32 (cuDNN's default allows
      TF32 convolutions, i.e. a 10-bit mantissa, without saying so); under bf16 autocast the convolutions
      are bf16 anyway and the remaining fp32 ops stay exact.
    * ``deterministic``: cuDNN's deterministic algorithms, no autotuning, ``use_deterministic_algorithms``
      (and the cuBLAS workspace setting it needs). Without it, a CUDA run with the same seed gives the same
      data order, augmentation and attack noise, but weight gradients may differ in the last bits (cuDNN's
      non-deterministic reductions), so weights and accuracies differ slightly between runs; on the CPU the
      same seed gives the same weights either way.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    out = {"precision": resolve_precision(precision, device), "requested": precision, "tf32": False,
           "deterministic": bool(deterministic)}
    if device.type == "cpu":
        out["cpu_bf16"] = cpu_bf16_support()  # why "auto" chose what it chose on this CPU
    return out


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, *, epochs: int, batches_per_epoch: int,
                milestones: Iterable[int] = (), gamma: float = 0.1) -> tuple[Any, bool]:
    """The learning-rate schedule a config names, and whether it is stepped per batch (else per epoch).

    ``"step"``: ``MultiStepLR`` at epoch ``milestones`` (the paper's). ``"onecycle"``: torch's ``OneCycleLR``,
    linear warm-up from lr/25 to the optimiser's lr over the first quarter of all batches, then linear decay
    to ~0, momentum left alone; it reaches a given accuracy in far fewer epochs than a step schedule.
    """
    if kind == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=gamma), False
    if kind == "onecycle":
        peak = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=epochs * batches_per_epoch,
                                                   pct_start=0.25, anneal_strategy="linear",
                                                   cycle_momentum=False), True
    raise ValueError(f"unknown lr schedule {kind!r}; valid: ['step', 'onecycle']")


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict[str, Any]]


def fit(
    run: RunDir,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epochs: int,
    train_epoch: Callable[[int], dict[str, float]],
    validate: Callable[[int], dict[str, float]],
    score: Callable[[dict[str, float]], float] | None,
    save_best: Callable[[Path], None],
    stop_after: int | None = None,
    per_batch_schedule: bool = False,
) -> FitResult:
    """Run ``epochs`` epochs with checkpoint/resume and best-by-``score`` selection.

    ``train_epoch(e)`` trains one epoch and returns its metrics; ``validate(e)`` evaluates on held-out
    data; the epoch with the highest ``score(val)`` is written to ``best.pt`` by ``save_best`` (Rice et al.
    early stopping: train the whole schedule, keep the best epoch; never select on the test set).
    ``score=None`` keeps the last epoch instead (early stopping off).
    ``stop_after`` ends the call after that many epochs *of this call* (used to test kill-and-resume).
    ``per_batch_schedule``: ``train_epoch`` steps ``scheduler`` after every batch itself (`lr_schedule`);
    it is then not stepped here, only saved and restored with the rest.
    Under a process group ``train_epoch``/``validate`` must return metrics already reduced over ranks
    (the same on every rank), so that every rank selects the same best epoch.
    """
    start, best_epoch, best_score, history = 0, -1, -math.inf, []
    if distributed.same_on_all_ranks(run.state.is_file(), f"{run.state} exists"):
        state = load_torch(run.state, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        restore_cuda_rng(state.get("rng_cuda"), _device_of(model))
        start, best_epoch, best_score = state["epoch"] + 1, state["best_epoch"], state["best_score"]
        history = list(state["history"])
        run.truncate_log(state["epoch"])
    done_here = 0
    for epoch in range(start, epochs):
        if stop_after is not None and done_here >= stop_after:
            break
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        train_metrics = train_epoch(epoch)
        if not per_batch_schedule:
            scheduler.step()
        val = validate(epoch)
        record = {"epoch": epoch, "lr": lr, **train_metrics,
                  **{f"val_{k}": v for k, v in val.items()}}
        s = float(epoch) if score is None else score(val)
        if s > best_score:
            best_epoch, best_score = epoch, s
            if run.main:
                save_best(run.best)
        record["best_epoch"] = best_epoch
        history.append(record)
        run.log(record)
        stage_progress.epoch(epoch + 1, epochs, val)
        done_here += 1
        if not run.main:
            continue
        # Everything needed to continue exactly from here; atomic, so a kill leaves the previous epoch's.
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_epoch": best_epoch,
                "best_score": best_score,
                "history": history,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": cuda_rng_state(_device_of(model)),
            },
            run.state,
        )
    run.sync()  # best.pt and state.pt complete before any rank reads them
    return FitResult(best_epoch, best_score, history)


def iterate(loader: Iterable, desc: str, progress: bool) -> Iterable:
    """A tqdm progress bar over ``loader`` (or the bare loader when ``progress`` is off)."""
    if not progress:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
