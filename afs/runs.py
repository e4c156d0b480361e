"""Run directories, the precision policy, and the one epoch loop that extractor and merger training share.

A stage's folder: ``config.json`` (its identity: the settings it reads, its data's and inputs' content hashes),
``manifest.json`` (provenance), ``log.jsonl`` (a line per epoch), ``state.pt`` (everything to resume after the
last finished epoch, atomic), ``best.pt`` (the selected model) and ``metrics.json``, written last: its
presence marks the stage complete. Data order and augmentation come from ``(seed, epoch)``, attack noise from
``(seed, epoch, batch)``, so on the CPU a run killed anywhere and resumed ends with the weights of an
uninterrupted one (tested); on CUDA only with ``Profile.deterministic``. Under a process group
(`afs.distributed`) every rank runs the loop and resumes from the same ``state.pt``; rank 0 alone writes,
and a barrier after each write that other ranks read makes them read complete files.
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
from afs.config import Precision
from afs.io import atomic_torch_save, atomic_write_json, load_torch, manifest, read_json


class RunConfigMismatchError(RuntimeError):
    """A run directory already holds a run made with a different configuration."""


class StageBusyError(RuntimeError):
    """Another process holds the stage's lock (it is training or evaluating that stage now)."""


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.main = distributed.is_main()  # rank 0 (or a lone process) writes; the other ranks only read
        self.config, self.log_file, self.state, self.best, self.metrics = (
            self.path / f for f in ("config.json", "log.jsonl", "state.pt", "best.pt", "metrics.json"))

    def is_complete(self) -> bool:
        return self.metrics.is_file()

    def check(self, config: dict[str, Any]) -> None:
        """Raise `RunConfigMismatchError` if this folder holds a stage made by anything other than ``config``,
        so a changed seed, schedule, data subset or retrained member never gets the old result back."""
        if not self.config.is_file():
            return
        old = read_json(self.config)
        if _canonical(old) == _canonical(config):
            return
        diffs = sorted(_diffs(old, config))
        shown = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs[:4])
        more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        era = " by an earlier version of afs" if "stage" not in old or "profile" in old else ""
        raise RunConfigMismatchError(
            f"{self.path} holds a stage made{era} with other settings ({shown}{more}). Its result is not "
            f"this configuration's, so it is not reused. To go on: delete {self.path} to redo the stage, or "
            f"run with another --out (or undo the change)")

    @contextmanager
    def lock(self, wait: bool = True) -> Iterator[None]:
        """Hold this stage's lock (``lock``, `filelock`): one process trains or evaluates a stage at a time.
        Another holder makes this wait, saying who holds it (``lock.json``), or with ``wait=False`` raise
        `StageBusyError`. The ranks of one data-parallel job are one trainer: only rank 0 locks."""
        if not self.main:
            yield
            return
        from filelock import FileLock, Timeout

        self.path.mkdir(parents=True, exist_ok=True)
        lock, holder = FileLock(str(self.path / "lock")), self.path / "lock.json"
        try:
            lock.acquire(timeout=0)
        except Timeout:
            try:
                h = read_json(holder)
                who = f"pid {h['pid']} on host {h['host']} (since {h['since']})"
            except (OSError, ValueError, KeyError):
                who = "another process"
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
        self.check(config)  # on every rank, so all raise together
        if self.main:
            if not self.config.is_file():
                atomic_write_json(self.config, config)
            atomic_write_json(self.path / "manifest.json", manifest(device))
        distributed.barrier()

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_log(self, last_epoch: int) -> None:
        """Drop log lines of epochs after ``last_epoch`` (written before a kill, redone on resume)."""
        if self.main and self.log_file.is_file():
            keep = [ln for ln in self.log_file.read_text().splitlines()
                    if ln and json.loads(ln).get("epoch", -1) <= last_epoch]
            self.log_file.write_text("".join(ln + "\n" for ln in keep))

    def finish(self, metrics: dict[str, Any]) -> None:
        if self.main:
            atomic_write_json(self.metrics, metrics)
        distributed.barrier()


def _short(v: Any) -> str:
    """A value as the mismatch message shows it: whole if short, else its kind (a dict of 12 keys ...)."""
    text = repr(v)
    if len(text) <= 40:
        return text
    return f"<{type(v).__name__} of {len(v)}>" if isinstance(v, (dict, list, tuple)) else text[:37] + "..."


def _canonical(d: Any) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def _diffs(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) of every leaf where ``a`` and ``b`` differ."""
    out = []
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diffs(va, vb, f"{prefix}{k}.")
        elif _canonical(va) != _canonical(vb):
            out.append((prefix + k, va, vb))
    return out


def cuda_rng_state(device: torch.device) -> torch.Tensor | None:
    """The CUDA generator state of the one GPU this process trains on (None off CUDA): saving every GPU's
    (``get_rng_state_all``) made a resume on fewer GPUs fail, and under torchrun each rank owns one GPU."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_cuda_rng(state: Any, device: torch.device) -> None:
    """Restore `cuda_rng_state` onto ``device`` (nothing off CUDA or without a saved state); the older
    per-GPU list gives this GPU's entry, if it was saved."""
    if state is None or device.type != "cuda":
        return
    if isinstance(state, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(state):
            return
        state = state[index]
    torch.cuda.set_rng_state(state, device)


def cpu_bf16_support() -> dict[str, bool]:
    """Whether this CPU has AVX512-BF16 and AMX tiles (oneDNN's native bf16; without them bf16 is emulated)."""
    probe = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return {k: bool(getattr(torch.cpu, fn, lambda: False)()) for k, fn in probe.items()}


def resolve_precision(precision: str, device: torch.device) -> str:
    """A profile's ``precision`` on ``device``: ``"auto"`` is bf16 on CUDA and on a CPU with native bf16
    (`cpu_bf16_support`), else fp32. Training and validation run under it; test evaluation crafts its attacks
    under it and scores with an fp32 forward (`afs.evaluation.evaluate`)."""
    precision = Precision.parse(precision, "precision").value
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and any(cpu_bf16_support().values())) else "fp32"


def autocast_for(device: torch.device, precision: str) -> Any:
    """bf16 autocast where ``precision`` resolves to bf16 on ``device``; else exact fp32."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class AutocastModel(nn.Module):
    """``model`` under bf16 autocast, logits in fp32: what a bf16 profile's evaluation crafts attacks on.
    Parameters and modes are the wrapped model's (``eval_mode`` and ``model_device`` see through it)."""

    def __init__(self, model: nn.Module, device_type: str) -> None:
        super().__init__()
        self.model, self.device_type = model, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


def configure_numerics(precision: str, deterministic: bool, device: torch.device) -> dict[str, Any]:
    """Set the process-wide numerics a profile asks for and return them for provenance.

    TF32 is switched off: a number labelled fp32 is fp32 (cuDNN's default runs convolutions in TF32 silently).
    ``deterministic`` selects cuDNN's deterministic algorithms and ``use_deterministic_algorithms``; without
    it a CUDA run with the same seed has the same data order and noise, but weights differ in the last bits.
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

    ``"step"``: ``MultiStepLR`` at ``milestones`` (the paper's). ``"onecycle"``: linear warm-up from lr/25 over
    the first quarter of all batches, then linear decay to ~0 (far fewer epochs to a given accuracy)."""
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


def fit(run: RunDir, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epochs: int,
        train_epoch: Callable[[int], dict[str, float]], validate: Callable[[int], dict[str, float]],
        score: Callable[[dict[str, float]], float] | None, save_best: Callable[[Path], None],
        stop_after: int | None = None, per_batch_schedule: bool = False) -> FitResult:
    """Run ``epochs`` epochs with checkpoint/resume and best-by-``score`` selection.

    The epoch with the highest ``score(validate(e))`` goes to ``best.pt`` through ``save_best`` (Rice et al.
    early stopping: train the whole schedule, keep the best epoch; never select on the test set);
    ``score=None`` keeps the last epoch. ``stop_after`` ends the call after that many epochs of this call
    (kill-and-resume tests). ``per_batch_schedule``: ``train_epoch`` steps ``scheduler`` itself. Under a
    process group the metrics must already be reduced over ranks, so every rank selects the same epoch.
    """
    device = next(model.parameters(), torch.empty(0)).device
    start, best_epoch, best_score, history = 0, -1, -math.inf, []
    if distributed.same_on_all_ranks(run.state.is_file(), f"{run.state} exists"):
        state = load_torch(run.state, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        restore_cuda_rng(state.get("rng_cuda"), device)
        start, best_epoch, best_score = state["epoch"] + 1, state["best_epoch"], state["best_score"]
        history = list(state["history"])
        run.truncate_log(state["epoch"])
    stop = epochs if stop_after is None else min(epochs, start + stop_after)
    for epoch in range(start, stop):
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        train_metrics = train_epoch(epoch)
        if not per_batch_schedule:
            scheduler.step()
        val = validate(epoch)
        s = float(epoch) if score is None else score(val)
        if s > best_score:
            best_epoch, best_score = epoch, s
            if run.main:
                save_best(run.best)
        record = {"epoch": epoch, "lr": lr, **train_metrics, **{f"val_{k}": v for k, v in val.items()},
                  "best_epoch": best_epoch}
        history.append(record)
        run.log(record)
        stage_progress.epoch(epoch + 1, epochs, val)
        if run.main:  # everything needed to continue exactly from here; atomic, a kill leaves the last epoch's
            atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "best_epoch": best_epoch,
                "best_score": best_score, "history": history, "rng_cpu": torch.get_rng_state(),
                "rng_cuda": cuda_rng_state(device)}, run.state)
    distributed.barrier()  # best.pt and state.pt complete before any rank reads them
    return FitResult(best_epoch, best_score, history)


def iterate(loader: Iterable, desc: str, progress: bool) -> Iterable:
    """A tqdm progress bar over ``loader`` (or the bare loader when ``progress`` is off)."""
    if not progress:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
