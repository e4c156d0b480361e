"""Attacks in [0, 1] pixel space: PGD (standard and the authors' variant), FGSM, and an AutoAttack wrapper.

``PGD`` is an object with the paper's defaults and one call (torchattacks style)::

    attack = PGD(model, eps=8/255, alpha=2/255, steps=10)
    x_adv = attack(x, y)

It only *orchestrates*: the random start comes from :func:`afs_kernels.random_start` (or, for the authors'
variant, from the triangular draw below), and every gradient step runs in :func:`afs_kernels.pgd_loop`,
the single PGD loop of the project (or its ``torch.compile``d form). ``FGSM`` is the one-step, no-start
case of the same machinery; there is no second gradient loop anywhere in ``afs``.

Two PGD variants (DESIGN.md, "Standard PGD here"):

* standard (default): uniform start in the eps-ball, clamp to [0, 1] after the start and after every step;
* authors' release (``init="triangular", clamp="end"``): start ``x + (U - U')*eps`` (the difference of
  two uniforms, a triangular density on [-eps, eps] peaked at 0), steps only projected onto the eps-ball,
  one clamp to [0, 1] after the loop.

:func:`autoattack` runs the ``pyautoattack`` package (the AutoAttack authors' release) with a fixed seed,
an explicit device, the model in eval mode, resumable through a state file, and its warnings surfaced.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

import afs_kernels
from afs_kernels._common import LenientStrEnum
from afs_kernels import Norm

__all__ = [
    "Norm",
    "Init",
    "Clamp",
    "AAVersion",
    "Loss",
    "margin_loss",
    "PGD",
    "FGSM",
    "AutoAttackWarning",
    "AutoAttackResult",
    "autoattack",
    "eval_mode",
    "model_device",
    "on_model_device",
    "check_images",
    "check_labels",
]

# eps / alpha: a Python number, or a per-sample tensor of shape [B] (the random-budget ablation).
Budget = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# Behaviour-choosing strings
# --------------------------------------------------------------------------------------------------------
# One lenient str-Enum base for the whole project (defined in afs_kernels so that it imports alone).
_StrEnum = LenientStrEnum


class Init(_StrEnum):
    """Distribution of PGD's random start inside the eps-ball."""

    UNIFORM = "uniform"  # Madry et al.: uniform in the ball (afs_kernels.random_start)
    TRIANGULAR = "triangular"  # the authors' release: (U - U')*eps, density peaked at delta = 0


class Clamp(_StrEnum):
    """When PGD clamps its iterates to the [0, 1] image box."""

    STEP = "step"  # after the start and after every step (standard)
    END = "end"  # once, after the loop (the authors' release; intermediate iterates may leave [0, 1])


class Loss(_StrEnum):
    """The objective PGD ascends."""

    CE = "ce"  # cross-entropy (Madry et al.; the paper's PGD)
    MARGIN = "margin"  # Carlini-Wagner margin max_{j != y} z_j - z_y: a second loss for the robustness audit


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin summed over the batch: ``sum_i max_{j != y_i} z_ij - z_i,y_i`` (> 0 iff misclassified).

    Unlike cross-entropy it does not saturate on confident logits, so a model whose CE gradients vanish
    (one sign of gradient masking) still gives PGD a direction."""
    z = logits.float()
    true = z.gather(1, y[:, None]).squeeze(1)  # (B,)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)  # (B,)
    return (other - true).sum()


class AAVersion(_StrEnum):
    """AutoAttack's preset attack ensembles (``pyautoattack.AutoAttack(version=...)``)."""

    STANDARD = "standard"  # APGD-CE, APGD-T, FAB-T, Square: the leaderboard protocol (Table IV/V)
    PLUS = "plus"  # more restarts and untargeted FAB/APGD-DLR; much slower
    RAND = "rand"  # for randomised defences: APGD-CE/DLR with EoT
    CUSTOM = "custom"  # the attacks named in ``attacks=``


def _parse_norm(norm: Any) -> Norm:
    try:
        return Norm(norm)
    except ValueError:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(repr(m.value) for m in Norm)}") from None


# --------------------------------------------------------------------------------------------------------
# Model helpers: mode and device
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block and restore every submodule's own flag afterwards.

    Restoring per submodule (not ``model.train(previous)``) keeps mixed states intact: a stacked model in
    training has frozen extractors in eval mode and a merger in train mode, and must come back that way.
    Restores also when the block raises.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def on_model_device(model: nn.Module, *tensors: torch.Tensor) -> Any:
    """``tensors`` moved to ``model``'s device: THE place where data meets a model (evaluation, analysis,
    notebooks). One tensor in, one out; several in, a tuple out. Attacks themselves do not move data: a
    mismatch there is the caller's bug and an error."""
    dev = model_device(model)
    moved = tuple(t.to(dev, non_blocking=True) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
    return model


def _check_same_device(model: nn.Module, x: torch.Tensor) -> None:
    dev = model_device(model)
    if next(model.parameters(), None) is not None and dev != x.device:
        raise ValueError(f"device mismatch: the model's parameters are on {dev}, the images on {x.device}")


# --------------------------------------------------------------------------------------------------------
# Input validation (shared with afs.evaluation)
# --------------------------------------------------------------------------------------------------------
def check_images(x: Any, name: str = "x") -> torch.Tensor:
    """A float (B, C, H, W) tensor with values in [0, 1], else a TypeError/ValueError naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating tensor in [0, 1], got dtype {x.dtype} "
            "(uint8 images: divide by 255, or use afs.evaluation.evaluate which converts them)"
        )
    if x.dtype == torch.float64:
        raise TypeError(f"{name} is float64; the networks hold float32 weights, so give float32 images "
                        "(x.float()); bf16 runs through autocast, not through the input's dtype")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() > 0:
        lo, hi = torch.aminmax(x.detach())
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            raise ValueError(f"{name} contains non-finite values (NaN or Inf)")
        if bool(lo < 0) or bool(hi > 1):
            raise ValueError(
                f"{name} must lie in the [0, 1] pixel box, got values in [{lo.item():.4g}, {hi.item():.4g}] "
                "(attacks work on unnormalised pixels; put any mean/std normalisation inside the model)"
            )
    return x


def check_labels(y: Any, batch: int, device: torch.device, n_classes: int | None = None, name: str = "y") -> torch.Tensor:
    """Integer class labels of shape [batch] on ``device``, in [0, n_classes); returned as int64."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 labels, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels (int64), got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape [B]=[{batch}] to match the images, got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"device mismatch: {name} is on {y.device}, the images on {device}")
    y = y.long()
    if batch > 0:
        lo, hi = torch.aminmax(y)
        if bool(lo < 0):
            raise ValueError(f"{name} has a negative label ({lo.item()}); labels are class indices >= 0")
        if n_classes is not None and bool(hi >= n_classes):
            raise ValueError(f"{name} has label {hi.item()} but the model outputs {n_classes} classes")
    return y


def _check_budget(value: Any, name: str, batch: int | None, device: torch.device | None, *, upper: float | None) -> Budget:
    """A float, or a tensor [B]/[] (moved to ``device`` when given), finite, >= 0 and <= ``upper``.

    ``batch=None`` skips the per-sample shape check (used at construction, before a batch is seen).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a per-sample tensor of shape [B], got {type(value).__name__}")
    bound = f" and <= {upper}" if upper is not None else ""
    if not isinstance(value, torch.Tensor):
        v = float(value)
        if not math.isfinite(v) or v < 0 or (upper is not None and v > upper):
            raise ValueError(f"{name} must be finite, >= 0{bound} (pixel units, e.g. 8/255), got {v}")
        return v
    if not value.is_floating_point():
        raise TypeError(f"{name} tensor must be floating point, got dtype {value.dtype}")
    if value.dim() > 1 or (batch is not None and value.dim() == 1 and value.shape[0] != batch):
        want = f"[B]=[{batch}]" if batch is not None else "[B]"
        raise ValueError(f"per-sample {name} must have shape {want} (or be 0-d), got {tuple(value.shape)}")
    t = value.detach().to(device=device if device is not None else value.device, dtype=torch.float32)
    if t.numel() > 0:
        bad = ~torch.isfinite(t) | (t < 0)
        if upper is not None:
            bad |= t > upper
        if bool(bad.any()):
            raise ValueError(f"{name} must be finite, >= 0{bound}; got values in [{t.min().item()}, {t.max().item()}]")
    return t


def _fmt_budget(v: Budget) -> str:
    """``0.0314 (8/255)`` for floats, a short summary for per-sample tensors."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 0:
            return "tensor[0]"
        return f"tensor[{v.numel()}] in [{v.min().item():.4f}, {v.max().item():.4f}]"
    return f"{v:.4f} ({round(v * 255, 3):g}/255)"


# --------------------------------------------------------------------------------------------------------
# Random starts
# --------------------------------------------------------------------------------------------------------
def _per_sample(t: Budget, ndim: int) -> Budget:
    """View a [B] budget as (B, 1, 1, 1) so it broadcasts over images; floats pass through."""
    return t.reshape(-1, *([1] * (ndim - 1))) if isinstance(t, torch.Tensor) and t.dim() == 1 else t


def _project_l2(delta: torch.Tensor, eps: Budget) -> torch.Tensor:
    """Scale each sample's delta by min(1, eps/||delta||_2): the projection onto the L2 ball."""
    n = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-12)  # (B,)
    eps_t = eps if isinstance(eps, torch.Tensor) else torch.tensor(eps, device=delta.device, dtype=delta.dtype)
    return delta * _per_sample((eps_t.to(delta.dtype) / n).clamp(max=1.0), delta.dim())


def _start_delta(x: torch.Tensor, eps: Budget, norm: Norm, init: Init, gen: torch.Generator | None) -> torch.Tensor:
    """A random perturbation inside the eps-ball, NOT clamped to the box (the caller decides).

    Triangular (the authors' release): ``(U - U')*eps`` per coordinate, then (L2 only) projected onto the
    ball. Uniform: the same distribution as :func:`afs_kernels.random_start` (whose output is always
    box-clamped, which is why ``clamp="end"`` draws it here): L-inf ``(2U - 1)*eps``, L2 a uniform point of
    the ball (Gaussian direction, radius ``eps * U^(1/D)``).
    """
    e = _per_sample(eps, x.dim())
    if init is Init.TRIANGULAR:
        u1 = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        u2 = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        delta = (u1 - u2) * e  # triangular on [-eps, eps]: mean |delta| = eps/3 (uniform: eps/2)
        return _project_l2(delta, eps) if norm is Norm.L2 else delta
    if norm is Norm.LINF:
        return (2.0 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1.0) * e
    z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    zn = torch.linalg.vector_norm(z.flatten(1), dim=1).clamp_min(1e-12)  # (B,)
    u = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype)
    radius = u.pow(1.0 / max(x[0].numel(), 1))  # (B,) in units of eps; density ~ r^(D-1)
    return z * _per_sample(radius / zn, x.dim()) * e


# --------------------------------------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------------------------------------
class PGD:
    """Projected gradient descent (Madry et al.) on the cross-entropy, in [0, 1] pixel space.

    Args:
        model: any ``nn.Module`` mapping (B, C, H, W) images in [0, 1] to logits (B, K), including a whole
            stacked model (attacks on AFS target the stack, Section III).
        eps: radius of the threat model; a float in [0, 1] or a per-sample tensor [B]. Paper: 8/255.
        alpha: step size (float or [B] tensor). Paper: 2/255.
        steps: gradient steps (0: the start itself).
        norm: ``"Linf"`` (sign steps) or ``"L2"`` (normalised-gradient steps).
        random_start: start from a random point of the ball (``init``) instead of ``x``.
        restarts: independent random starts; per sample the worst final iterate is kept (a misclassified
            iterate beats a correct one; among equals the higher loss wins).
        seed: seeds one ``torch.Generator`` (on the data's device) per call, so a call repeats exactly;
            ``None`` draws from torch's global RNG.
        init: ``"uniform"`` (standard) or ``"triangular"`` (authors' release).
        clamp: ``"step"`` (standard) or ``"end"`` (authors' release: box clamp only after the loop; the
            start is not box-clamped either).
        compile: run the ``torch.compile``d loop (:func:`afs_kernels.compiled_pgd_loop`); same results within
            float noise, faster on a GPU after the first call.
        compile_backend: ``torch.compile`` backend (``"inductor"``; tests use ``"aot_eager"``).
        loss: ``"ce"`` (cross-entropy, the paper's) or ``"margin"`` (CW margin, :func:`margin_loss`; eager
            loop only). Restarts still keep, per sample, a misclassified iterate over a correct one.

    The model is in eval mode during the attack and every submodule's mode is restored afterwards (also on
    an exception); gradients are taken w.r.t. the input only, so no parameter gets a ``.grad``.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: Budget = 8 / 255,
        alpha: Budget = 2 / 255,
        steps: int = 10,
        norm: Norm | str = "Linf",
        random_start: bool = True,
        restarts: int = 1,
        seed: int | None = None,
        *,
        init: Init | str = "uniform",
        clamp: Clamp | str = "step",
        compile: bool = False,
        compile_backend: str = "inductor",
        loss: Loss | str = "ce",
    ) -> None:
        self.model = _check_model(model)
        # Values checked now; per-sample shapes and devices again per call, against the batch.
        _check_budget(eps, "eps", None, None, upper=1.0)
        _check_budget(alpha, "alpha", None, None, upper=None)
        self.eps, self.alpha = eps, alpha
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
        if restarts > 1 and not random_start:
            raise ValueError("restarts > 1 needs random_start=True: without a random start every restart is identical")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        self.steps, self.restarts, self.seed = steps, restarts, seed
        self.norm = _parse_norm(norm)
        if not isinstance(random_start, bool):  # bool("no") is True: a string would silently mean "yes"
            raise TypeError(f"random_start must be True or False, got {random_start!r}")
        self.random_start = random_start
        self.init = Init.parse(init, "init")
        self.clamp = Clamp.parse(clamp, "clamp")
        self.compile, self.compile_backend = bool(compile), compile_backend
        self.loss = Loss.parse(loss, "loss")
        if self.loss is Loss.MARGIN and self.compile:
            raise ValueError("loss='margin' runs in the eager loop only; use compile=False")
        self._n_classes: int | None = None  # learnt from the model on the first call ...
        self._probed: nn.Module | None = None  # ... of this model (a swapped-in model is probed again)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={_fmt_budget(self.eps)}, alpha={_fmt_budget(self.alpha)}, steps={self.steps}, "
            f"norm={self.norm}, random_start={self.random_start}, restarts={self.restarts}, init={self.init}, "
            f"clamp={self.clamp}, seed={self.seed}, compile={self.compile}, loss={self.loss})"
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: same shape/dtype/device as ``x``, in [0, 1] and the ball."""
        return self.perturb(x, y, seed=self.seed)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None,
                start: torch.Tensor | None = None) -> torch.Tensor:
        """``attack(x, y)`` with an explicit seed for this call (``afs.evaluation`` seeds per batch).

        ``start``: continue an earlier run of this threat model from its final iterate instead of drawing a
        random start (one restart only). The loop is a function of its current iterate, so PGD-10's output
        plus 10 more steps *is* PGD-20 from the same start, bit for bit: `afs.evaluation.evaluate` runs
        PGD-10 and PGD-20 as one 20-step run this way.
        """
        x = check_images(x)
        batch, device = x.shape[0], x.device
        y = check_labels(y, batch, device)
        eps = _check_budget(self.eps, "eps", batch, device, upper=1.0)
        alpha = _check_budget(self.alpha, "alpha", batch, device, upper=None)
        _check_same_device(self.model, x)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        x = x.detach()
        if start is not None:
            if self.restarts != 1:
                raise ValueError(f"start= continues one run; this attack has restarts={self.restarts}")
            start = check_images(start, "start")
            if start.shape != x.shape or start.device != x.device:
                raise ValueError(f"start must match x's shape {tuple(x.shape)} and device {x.device}, got "
                                 f"{tuple(start.shape)} on {start.device}")
            start = start.detach()
        if batch == 0:
            return x.clone()
        with eval_mode(self.model):
            if self._n_classes is None or self._probed is not self.model:
                # One-sample probe, once per attack object (not per batch: training calls this every step):
                # the class count, to check y before the loop.
                with torch.no_grad():
                    probe = self.model(x[:1])
                if not isinstance(probe, torch.Tensor) or probe.dim() != 2:
                    got = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
                    raise ValueError(f"the model must return logits of shape (B, n_classes), got {got}")
                self._n_classes, self._probed = int(probe.shape[1]), self.model
            check_labels(y, batch, device, n_classes=self._n_classes)
            # One generator per call, on the data's device, so a seed fixes every draw of every restart.
            gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
            best = best_loss = best_wrong = None
            for _ in range(self.restarts):
                x_adv = self._run_once(x, y, eps, alpha, gen, start)
                if self.restarts == 1:
                    return x_adv
                with torch.no_grad():
                    logits = self.model(x_adv).float()
                    loss = F.cross_entropy(logits, y, reduction="none")  # (B,)
                    wrong = logits.argmax(1) != y  # (B,)
                if best is None:
                    best, best_loss, best_wrong = x_adv, loss, wrong
                    continue
                # Worst case per sample: misclassified beats correct; among equals, higher loss wins.
                better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
                best = torch.where(_per_sample(better, x.dim()), x_adv, best)
                best_loss = torch.where(better, loss, best_loss)
                best_wrong = torch.where(better, wrong, best_wrong)
            return best

    # The pieces of one restart ----------------------------------------------------------------------
    def _start(self, x: torch.Tensor, eps: Budget, gen: torch.Generator | None) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        if self.init is Init.UNIFORM and self.clamp is Clamp.STEP:
            # The fused kernel on CUDA (counter-based RNG seeded from gen), the torch reference elsewhere.
            return afs_kernels.random_start(x, eps, self.norm, generator=gen)
        start = x + _start_delta(x, eps, self.norm, self.init, gen)
        return start.clamp(0.0, 1.0) if self.clamp is Clamp.STEP else start

    def _loop(self) -> Any:
        """``pgd_loop`` bound to the model: eager, or the cached compiled form (built on first use)."""
        if self.compile:
            return afs_kernels.compiled_pgd_loop(self.model, backend=self.compile_backend)
        return functools.partial(afs_kernels.pgd_loop, self.model)

    def _run_once(self, x: torch.Tensor, y: torch.Tensor, eps: Budget, alpha: Budget, gen: torch.Generator | None,
                  start: torch.Tensor | None = None) -> torch.Tensor:
        start = self._start(x, eps, gen) if start is None else start
        # THE PGD loop (afs_kernels): input gradients only, summed CE; with clamp_box_each_step=False it
        # projects onto the ball each step and clamps to [0, 1] once after the loop (also for steps=0).
        kw = {"loss_fn": margin_loss} if self.loss is Loss.MARGIN else {}
        return self._loop()(
            x, y, start, eps, alpha, self.steps, self.norm, clamp_box_each_step=self.clamp is Clamp.STEP, **kw
        )


class FGSM(PGD):
    """Fast gradient sign method: ``clamp(x + eps*sign(grad), 0, 1)``.

    Exactly the one-step, no-random-start PGD with step ``eps`` (the projection is then a no-op), so it
    shares PGD's loop, mode handling and validation instead of a second gradient loop.
    """

    def __init__(self, model: nn.Module, eps: Budget = 8 / 255, *, compile: bool = False, compile_backend: str = "inductor") -> None:
        super().__init__(
            model, eps=eps, alpha=eps, steps=1, norm="Linf", random_start=False, restarts=1,
            compile=compile, compile_backend=compile_backend,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"FGSM(eps={_fmt_budget(self.eps)}, compile={self.compile})"


# --------------------------------------------------------------------------------------------------------
# AutoAttack (pyautoattack)
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
    model = _check_model(model)
    x = check_images(x)
    y = check_labels(y, x.shape[0], x.device)
    if isinstance(eps, torch.Tensor):
        raise TypeError("autoattack takes one float eps; AutoAttack has no per-sample budgets")
    eps = float(_check_budget(eps, "eps", x.shape[0], x.device, upper=1.0))  # type: ignore[arg-type]
    if eps == 0.0:
        raise ValueError("eps must be > 0 for AutoAttack (eps = 0 is clean accuracy: evaluate(..., ('clean',)))")
    norm_ = _parse_norm(norm)
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
