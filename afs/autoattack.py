"""AutoAttack (Croce & Hein 2020) through the ``pyautoattack`` package, the AutoAttack authors' release.

:func:`autoattack` runs it with a fixed seed (inside a forked RNG, so the caller's RNG is untouched), an
explicit device, the model in eval mode, resumable through a state file, and its own sanity checks
surfaced as :class:`AutoAttackWarning`. Table IV/V's robust accuracies come from here.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from afs_kernels import Choice
from afs.attacks import check_images, check_labels, eval_mode, model_device

__all__ = ["AAVersion", "AutoAttackWarning", "AutoAttackResult", "autoattack"]

_ATTACKS = {"apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"}  # what version="custom" can run


class AAVersion(Choice):
    """AutoAttack's preset attack ensembles (``pyautoattack.AutoAttack(version=...)``)."""

    STANDARD = "standard"  # APGD-CE, APGD-T, FAB-T, Square: the leaderboard protocol (Table IV/V)
    PLUS = "plus"  # more restarts and untargeted FAB/APGD-DLR; much slower
    RAND = "rand"  # for randomised defences: APGD-CE/DLR with EoT
    CUSTOM = "custom"  # the attacks named in ``attacks=``


class AutoAttackWarning(UserWarning):
    """A warning AutoAttack's own checks raised (randomised output, zero gradients, Square beating the
    white-box attacks, ...): the evaluation may be unreliable. See pyautoattack's flags documentation."""


@dataclass(frozen=True)
class AutoAttackResult:
    """Outcome of :func:`autoattack`."""

    robust_accuracy: float  # percent of all N samples still correctly classified after every attack
    robust: torch.Tensor  # bool [N] on the CPU: AutoAttack's own per-sample robust flags (see autoattack)
    clean_accuracy: float  # percent, measured by AutoAttack's initial pass


class _WarningBridge(logging.Handler):
    # pyautoattack reports its sanity checks (checks.py) through logger.warning; re-emitted as
    # AutoAttackWarning they reach warnings.catch_warnings / pytest.warns, not just stderr.
    def emit(self, record: logging.LogRecord) -> None:
        warnings.warn(f"AutoAttack: {record.getMessage()}", AutoAttackWarning, stacklevel=2)


@contextlib.contextmanager
def _aa_warnings() -> Iterator[None]:
    # pyautoattack's logger for one evaluation: its warnings become AutoAttackWarning, its progress is dropped.
    logger, bridge = logging.getLogger("auto-attack"), _WarningBridge(logging.WARNING)
    old_level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(bridge)
    try:
        yield
    finally:
        logger.removeHandler(bridge)
        logger.setLevel(old_level)


def _read_state(path: Path, n: int, expected: set[str]) -> dict[str, Any] | None:
    """An AutoAttack state file's flags, finished attacks and clean accuracy; None before its clean pass.

    pyautoattack 0.2.0 writes the attack set with ``json.dump(default=str)``, i.e. as the *string*
    ``"{'apgd-ce', ...}"``, so its own ``EvaluationState.from_disk`` never matches it on resume (and a
    resumed run would hit an unbound ``y_adv``): this reader takes that string or a list, and
    :func:`autoattack` does the resume itself.
    """
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the AutoAttack state file {path}: {e}") from None
    raw = d.get("_attacks_to_run")
    try:
        stored = set(ast.literal_eval(raw)) if isinstance(raw, str) else set(raw)
    except (ValueError, SyntaxError, TypeError):
        raise ValueError(f"the AutoAttack state file {path} has an unreadable attack set {raw!r}") from None
    if stored != expected:
        raise ValueError(f"the AutoAttack state file {path} was made for attacks {sorted(stored)}, this run uses "
                         f"{sorted(expected)}; use another state_path or delete the file")
    if d.get("_robust_flags") is None:
        return None
    flags = torch.tensor(d["_robust_flags"], dtype=torch.bool)
    if flags.shape != (n,):
        raise ValueError(f"the AutoAttack state file {path} holds {flags.numel()} samples, this run has {n}")
    run, clean = set(d.get("_run_attacks", [])), float(d.get("_clean_accuracy", math.nan))
    if math.isnan(clean) and not run:
        # pyautoattack writes the clean flags, then the clean accuracy: stopped in between, the flags are
        # still exactly the clean pass.
        clean = flags.float().mean().item()
    return {"flags": flags, "run": run, "clean": clean}


def _run_aa(aa: Any, x: torch.Tensor, y: torch.Tensor, only: list[str], batch_size: int,
            state_path: Path | None) -> tuple[torch.Tensor, float]:
    # One run_standard_evaluation of the attacks `only` (the preset's restarts, targets and queries kept):
    # AutoAttack's robust flags (bool [n], CPU) and clean accuracy (fraction), read back from its state file.
    # state_path (not existing yet) receives its progress as it goes; None: a temporary file.
    aa.attacks_to_run = list(only)
    with tempfile.TemporaryDirectory(prefix="afs-aa-") as tmp:
        state = state_path if state_path is not None else Path(tmp) / "state.json"
        aa.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state)
        d = json.loads(state.read_text())
    return torch.tensor(d["_robust_flags"], dtype=torch.bool), float(d["_clean_accuracy"])


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255,
               version: AAVersion | str = "standard", attacks: Sequence[str] | None = None, batch_size: int = 500,
               seed: int = 0, device: torch.device | str | None = None,
               state_path: str | os.PathLike | None = None) -> AutoAttackResult:
    """AutoAttack via ``pyautoattack``: robust accuracy and AutoAttack's *own* per-sample robust flags (its
    EvaluationState, not recomputed from adversarial examples, which a resume does not return and a
    randomised model could classify anew); its warnings are re-emitted as :class:`AutoAttackWarning`.

    Args:
        model: returns logits for [0, 1] images; in eval mode during the run, its modes restored after.
        x: float (N, C, H, W) in [0, 1] (any device; batches are moved to ``device``). y: int labels [N].
        eps: the L-inf radius, in (0, 1] (AutoAttack has no per-sample budgets).
        version: ``"standard"`` (the paper's protocol), ``"plus"``, ``"rand"`` or ``"custom"`` with
            ``attacks=[...]`` (e.g. ``["apgd-ce"]`` for a quick check).
        seed: fixed seed for every attack (pyautoattack's default is the wall clock); AutoAttack seeds
            torch's global RNG with it, inside ``torch.random.fork_rng`` here.
        device: where the attacks run; default the model's parameters' device.
        state_path: a JSON file recording the progress (flags after every batch, finished attacks); called
            again with it, a run resumes: the attacks not finished run on the still-robust samples, a
            finished evaluation returns its flags. It does not record eps or seed: one file per setting.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
    x = check_images(x)
    y = check_labels(y, x.shape[0], x.device)
    if isinstance(eps, torch.Tensor):
        raise TypeError("autoattack takes one float eps; AutoAttack has no per-sample budgets")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and 0.0 < eps <= 1.0):  # eps = 0 is clean accuracy: evaluate(..., ("clean",))
        raise ValueError(f"eps must be finite, > 0 and <= 1.0 for AutoAttack (pixel units, e.g. 8/255), got {eps}")
    version_ = AAVersion.parse(version, "AutoAttack version")
    if version_ is AAVersion.CUSTOM and not attacks:
        raise ValueError("version='custom' needs attacks=[...] (e.g. ['apgd-ce', 'apgd-t', 'fab-t', 'square'])")
    if version_ is not AAVersion.CUSTOM and attacks is not None:
        raise ValueError(f"attacks= is only used with version='custom' (version={version_.value!r} fixes its attacks)")
    if attacks and set(attacks) - _ATTACKS:
        raise ValueError(f"unknown AutoAttack attack(s) {sorted(set(attacks) - _ATTACKS)}; valid: {sorted(_ATTACKS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if seed is None or isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0 (AutoAttack's default seed is the wall clock), got {seed!r}")
    dev = torch.device(device) if device is not None else model_device(model)
    if next(model.parameters(), None) is not None and model_device(model).type != dev.type:
        raise ValueError(f"device mismatch: the model's parameters are on {model_device(model)}, device={dev}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x is empty: nothing to evaluate")

    from pyautoattack import AutoAttack

    # The attack list of this version as pyautoattack defines it (a cheap object; nothing runs yet).
    aa = AutoAttack(model, attacks=list(attacks) if attacks else None, device=dev, eps=eps, norm="Linf",
                    seed=seed, version=version_.value)
    order = list(aa.attacks_to_run)
    path = Path(state_path) if state_path is not None else None
    state = None
    if path is not None:
        if path.is_dir():
            raise ValueError(f"state_path must be a file path (JSON), got the directory {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        state = _read_state(path, n, set(order)) if path.exists() else None
        if state is None and path.exists():
            path.unlink()  # stopped before the clean pass was recorded: nothing to resume, start afresh
    if state is not None and state["run"] >= set(order):
        flags, clean = state["flags"], state["clean"]  # a finished evaluation: its flags, no computation
    else:
        # AutoAttack calls torch.manual_seed: fork torch's CPU RNG (and the device's CUDA RNG) around it.
        cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with eval_mode(model), _aa_warnings(), torch.random.fork_rng(devices=cuda):
            if state is None:  # fresh: pyautoattack writes its progress straight into state_path
                flags, clean = _run_aa(aa, x, y, order, batch_size, path)
            else:
                # Resume: the attacks not finished yet, on the samples still robust (an attack only ever
                # runs on points no earlier attack broke); the progress is recorded when it finishes.
                flags, clean = state["flags"].clone(), state["clean"]
                idx = flags.nonzero().flatten()
                if idx.numel() > 0:
                    remaining = [a for a in order if a not in state["run"]]
                    flags[idx] = _run_aa(aa, x[idx.to(x.device)], y[idx.to(y.device)], remaining, batch_size, None)[0]
        if path is not None:
            # pyautoattack's layout, with the attack set as a JSON list (its own writer makes it a string).
            from afs.io import atomic_write_text

            atomic_write_text(path, json.dumps({
                "_attacks_to_run": sorted(order), "path": str(path), "_run_attacks": sorted(order),
                "_robust_flags": flags.cpu().tolist(), "_last_saved": str(datetime.now()), "_SAVE_TIMEOUT": 60,
                "_clean_accuracy": clean}))
    return AutoAttackResult(robust_accuracy=100.0 * flags.float().mean().item(), robust=flags.cpu(),
                            clean_accuracy=100.0 * clean)
