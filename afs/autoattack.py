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

from afs_kernels import Norm
from afs_kernels import Choice
from afs.attacks import check_images, check_labels, eval_mode, model_device

__all__ = ["AAVersion", "AutoAttackWarning", "AutoAttackResult", "autoattack"]


class AAVersion(Choice):
    """AutoAttack's preset attack ensembles (``pyautoattack.AutoAttack(version=...)``)."""

    STANDARD = "standard"  # APGD-CE, APGD-T, FAB-T, Square: the leaderboard protocol (Table IV/V)
    PLUS = "plus"  # more restarts and untargeted FAB/APGD-DLR; much slower
    RAND = "rand"  # for randomised defences: APGD-CE/DLR with EoT
    CUSTOM = "custom"  # the attacks named in ``attacks=``



# --------------------------------------------------------------------------------------------------------
class AutoAttackWarning(UserWarning):
    """A warning AutoAttack's own checks raised (randomised output, zero gradients, Square beating the
    white-box attacks, ...): the evaluation may be unreliable. See pyautoattack's flags documentation."""


@dataclass(frozen=True)
class AutoAttackResult:
    """Outcome of :func:`autoattack`."""

    robust_accuracy: float  # percent of all N samples still correctly classified after every attack
    robust: torch.Tensor  # bool [N] on the CPU: AutoAttack's own per-sample robust flags (see autoattack)
    clean_accuracy: float  # percent, measured by AutoAttack's initial pass

    @property
    def n(self) -> int:
        return int(self.robust.numel())


class _WarningBridge(logging.Handler):
    """Re-emits the 'auto-attack' logger's WARNING records as Python warnings (AutoAttackWarning).

    pyautoattack reports its sanity checks (checks.py) through ``logger.warning``; without a configured
    logging setup they would reach stderr at best, and never ``warnings.catch_warnings``/``pytest.warns``.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        warnings.warn(f"AutoAttack: {record.getMessage()}", AutoAttackWarning, stacklevel=2)


@contextlib.contextmanager
def _aa_logging(verbose: bool) -> Iterator[None]:
    """Route pyautoattack's logger for one evaluation: warnings -> AutoAttackWarning; progress -> stderr
    when ``verbose``. Level and handlers are restored afterwards."""
    logger = logging.getLogger("auto-attack")
    old_level = logger.level
    handlers: list[logging.Handler] = [_WarningBridge()]
    if verbose:
        stream = logging.StreamHandler()  # stderr
        stream.setLevel(logging.DEBUG)
        stream.addFilter(lambda r: r.levelno < logging.WARNING)  # warnings go through the bridge only
        stream.setFormatter(logging.Formatter("[autoattack] %(message)s"))
        handlers.append(stream)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    for h in handlers:
        logger.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
        logger.setLevel(old_level)


def _attacks_of(version: AAVersion, attacks: Sequence[str] | None) -> list[str] | None:
    if version is AAVersion.CUSTOM:
        if not attacks:
            raise ValueError("version='custom' needs attacks=[...] (e.g. ['apgd-ce', 'apgd-t', 'fab-t', 'square'])")
        valid = {"apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"}
        bad = [a for a in attacks if a not in valid]
        if bad:
            raise ValueError(f"unknown AutoAttack attack(s) {bad}; valid: {sorted(valid)}")
        return list(attacks)
    if attacks is not None:
        raise ValueError(f"attacks= is only used with version='custom' (version={version.value!r} fixes its attacks)")
    return None


def _read_state(path: Path, n: int, expected: set[str]) -> dict[str, Any] | None:
    """Load an AutoAttack state file; None if it holds no clean pass yet (then the run starts afresh).

    pyautoattack 0.2.0 writes the attack set with ``json.dump(default=str)``, i.e. as the *string*
    ``"{'apgd-ce', ...}"``, so its own ``EvaluationState.from_disk`` can never match it on resume (it
    raises "different set of attacks"), and a resumed run would also hit an unbound ``y_adv``. This reader
    accepts that string form and a list, and the resume itself is done by :func:`autoattack`.
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
        raise ValueError(
            f"the AutoAttack state file {path} was made for attacks {sorted(stored)}, this run uses "
            f"{sorted(expected)}; use another state_path or delete the file"
        )
    if d.get("_robust_flags") is None:
        return None
    flags = torch.tensor(d["_robust_flags"], dtype=torch.bool)
    if flags.shape != (n,):
        raise ValueError(f"the AutoAttack state file {path} holds {flags.numel()} samples, this run has {n}")
    run = set(d.get("_run_attacks", []))
    clean = float(d.get("_clean_accuracy", math.nan))
    if math.isnan(clean) and not run:
        # pyautoattack writes the clean flags and then the clean accuracy: stopped in between, the flags
        # are still exactly the clean pass.
        clean = flags.float().mean().item()
    return {"flags": flags, "run": run, "clean": clean}


def _write_state(path: Path, attacks: list[str], run: set[str], flags: torch.Tensor, clean: float) -> None:
    """Write a state file in pyautoattack's layout (the attack set as a proper JSON list), atomically."""
    from afs.io import atomic_write_text

    d = {
        "_attacks_to_run": sorted(attacks),
        "path": str(path),
        "_run_attacks": sorted(run),
        "_robust_flags": flags.cpu().tolist(),
        "_last_saved": str(datetime.now()),
        "_SAVE_TIMEOUT": 60,
        "_clean_accuracy": clean,
    }
    atomic_write_text(path, json.dumps(d))


def _run_aa(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: Norm, version: AAVersion,
    attacks: list[str] | None, only: list[str], batch_size: int, seed: int, device: torch.device,
    state_path: Path | None,
) -> tuple[torch.Tensor, float]:
    """One ``run_standard_evaluation`` over ``(x, y)`` running the attacks ``only``; returns AutoAttack's
    robust flags (bool [n], CPU) and clean accuracy (fraction), read back from its state file.

    ``state_path`` (must not exist yet) receives pyautoattack's progress as it goes (flags after every
    batch); ``None`` uses a temporary file.
    """
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, attacks=attacks, device=device, eps=eps, norm=norm.value, seed=seed, version=version.value)
    # Keep the preset's hyper-parameters (restarts, targets, queries) and run only the attacks not done yet.
    aa.attacks_to_run = list(only)
    with tempfile.TemporaryDirectory(prefix="afs-aa-") as tmp:
        state = state_path if state_path is not None else Path(tmp) / "state.json"
        aa.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state)
        d = json.loads(state.read_text())
    return torch.tensor(d["_robust_flags"], dtype=torch.bool), float(d["_clean_accuracy"])


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 8 / 255,
    norm: Norm | str = "Linf",
    version: AAVersion | str = "standard",
    attacks: Sequence[str] | None = None,
    batch_size: int = 500,
    seed: int = 0,
    device: torch.device | str | None = None,
    state_path: str | os.PathLike | None = None,
    verbose: bool = False,
) -> AutoAttackResult:
    """AutoAttack (Croce & Hein) via ``pyautoattack``: robust accuracy and per-sample robust flags.

    Args:
        model: returns logits for [0, 1] images; in eval mode during the run, its modes restored after.
        x: float (N, C, H, W) in [0, 1] (any device; batches are moved to ``device``). y: int labels [N].
        eps: L-inf/L2 radius (float in [0, 1]); per-sample budgets are not supported by AutoAttack.
        version: ``"standard"`` (the paper's protocol), ``"plus"``, ``"rand"`` or ``"custom"`` with
            ``attacks=[...]`` (e.g. ``["apgd-ce"]`` for a quick check).
        seed: fixed seed for every attack (pyautoattack's default is the wall clock). AutoAttack seeds
            torch's global RNG with it; that is done inside ``torch.random.fork_rng`` so the caller's RNG
            state is unchanged.
        device: where the attacks run; default the model's parameters' device.
        state_path: a JSON state file (str or Path). A run records its progress there (flags after every
            batch, finished attacks); calling again with the same file resumes: finished attacks are not
            rerun, and a finished evaluation returns its flags without any computation. The file is in
            pyautoattack's layout, but resuming is done here (pyautoattack 0.2.0 cannot read its own
            state back, see ``_read_state``): the remaining attacks run on the still-robust samples only,
            which is what AutoAttack does anyway. The file does not record eps/norm/seed: one file per setting.
        verbose: stream AutoAttack's progress log to stderr.

    Returns:
        ``AutoAttackResult``. ``robust`` holds AutoAttack's *own* flags (its EvaluationState): a sample is
        robust iff it was correctly classified clean and no attack of the ensemble found a misclassified
        point. They are not recomputed from the adversarial examples (which, after a resume, pyautoattack
        only returns for the current run's attacks, and which a randomised model could classify anew).

    AutoAttack's warnings (randomised or probability outputs, zero gradients, Square beating the
    white-box attacks, too few classes, ...) are re-emitted as :class:`AutoAttackWarning`.
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
    if not (math.isfinite(eps) and 0.0 <= eps <= 1.0):
        raise ValueError(f"eps must be finite, >= 0 and <= 1.0 (pixel units, e.g. 8/255), got {eps}")
    if eps == 0.0:
        raise ValueError("eps must be > 0 for AutoAttack (eps = 0 is clean accuracy: evaluate(..., ('clean',)))")
    norm_ = Norm.parse(norm, "norm")
    version_ = AAVersion.parse(version, "AutoAttack version")
    custom = _attacks_of(version_, attacks)
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

    # The attack list of this version, as pyautoattack defines it (a cheap object; nothing runs yet).
    from pyautoattack import AutoAttack

    order = list(AutoAttack(model, attacks=custom, device=dev, eps=eps, norm=norm_.value, seed=seed,
                            version=version_.value).attacks_to_run)
    path = Path(state_path) if state_path is not None else None
    if path is not None:
        if path.is_dir():
            raise ValueError(f"state_path must be a file path (JSON), got the directory {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
    state = None
    if path is not None and path.exists():
        state = _read_state(path, n, set(order))
        if state is None:
            path.unlink()  # stopped before the clean pass was recorded: nothing to resume, start afresh
    if state is not None and state["run"] >= set(order):
        # A finished evaluation: its flags, no computation.
        flags, clean = state["flags"], state["clean"]
    else:
        kw = dict(eps=eps, norm=norm_, version=version_, attacks=custom, batch_size=batch_size, seed=seed, device=dev)
        with eval_mode(model), _aa_logging(verbose), _forked_rng(dev):
            if state is None:
                # Fresh: pyautoattack writes its progress straight into state_path.
                flags, clean = _run_aa(model, x, y, only=order, state_path=path, **kw)  # type: ignore[arg-type]
            else:
                # Resume: the attacks not finished yet, on the samples still robust (AutoAttack's own rule:
                # an attack only ever runs on points no earlier attack broke). Its progress is recorded
                # when it finishes.
                remaining = [a for a in order if a not in state["run"]]
                flags, clean = state["flags"].clone(), state["clean"]
                idx = flags.nonzero().flatten()
                if idx.numel() > 0:
                    sub, _ = _run_aa(model, x[idx.to(x.device)], y[idx.to(y.device)], only=remaining,
                                     state_path=None, **kw)  # type: ignore[arg-type]
                    flags[idx] = sub
        if path is not None:
            # pyautoattack's layout, with the attack set as a JSON list (its own writer makes it a string).
            _write_state(path, order, set(order), flags, clean)
    return AutoAttackResult(
        robust_accuracy=100.0 * flags.float().mean().item(), robust=flags.cpu(), clean_accuracy=100.0 * clean
    )


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Fork torch's CPU RNG (and ``device``'s CUDA RNG): AutoAttack calls ``torch.manual_seed``."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield
