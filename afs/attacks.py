"""PGD in [0, 1] pixel space: the paper's attack (Eq. 4), its FGSM special case and the authors' variant.

One object, the paper's defaults, one call (torchattacks style)::

    attack = PGD(model)                   # L-inf, eps = 8/255, step 2/255, 10 steps, uniform start
    x_adv = attack(x, y, seed=0)          # a seed makes the call repeat exactly

Eq. 4 of the paper (Madry et al.'s inner maximisation), as run here::

    x^0     = clamp(x + U(-eps, eps)^D, 0, 1)                                    (start="uniform")
    x^{t+1} = clamp(Proj_{B(x, eps)}(x^t + step_size * sign(grad_x L(f(x^t), y))), 0, 1)

``start="authors"`` is the authors' release (DESIGN.md, "Standard PGD here"): a triangular start
``x + (U - U') * eps``, steps projected onto the ball only, and one clamp to [0, 1] after the loop.
``start="none"`` starts at ``x``; FGSM is ``PGD(model, eps, step_size=eps, steps=1, start="none")``.
"""

# The start is drawn by afs_kernels.random_start and every step runs in afs_kernels.pgd_loop (eager or
# torch.compile'd): this module validates the inputs once per call, then calls the kernels without
# re-checking. step_size is PGD's step; Eq. 5's mixing weight alpha lives in afs.merger.

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn

import afs_kernels
from afs_kernels import Choice

__all__ = ["Start", "Loss", "margin_loss", "PGD", "fgsm", "eval_mode", "model_device", "on_model_device",
           "check_images", "check_labels"]

# eps / step_size: a Python number, or a per-sample tensor of shape [B] (Table VI's random budget).
Budget = Union[float, torch.Tensor]


class Start(Choice):
    """PGD's first iterate."""

    UNIFORM = "uniform"  # Madry et al.: uniform in the eps-ball; box clamp after the start and every step
    NONE = "none"  # x itself (FGSM; a deterministic PGD)
    AUTHORS = "authors"  # the authors' release: (U - U') * eps, a triangular density; one box clamp at the end


class Loss(Choice):
    """The objective PGD ascends."""

    CE = "ce"  # cross-entropy (Madry et al.; the paper's PGD)
    MARGIN = "margin"  # Carlini-Wagner margin: a second loss for the robustness audit (notebook 08)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin summed over the batch: ``sum_i max_{j != y_i} z_ij - z_i,y_i`` (> 0 iff misclassified)."""
    # Unlike cross-entropy it does not saturate on confident logits, so a model whose CE gradients vanish
    # (one sign of gradient masking) still gives PGD a direction.
    z = logits.float()
    true = z.gather(1, y[:, None]).squeeze(1)  # (B,)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)  # (B,)
    return (other - true).sum()


# ------------------------------------------------------------------------------------------------------------
# Model mode and device: the one helper of each for the whole library
# ------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every submodule's own flag restored afterwards."""
    # Per submodule, not model.train(previous): a stack in training has frozen extractors in eval mode and
    # a merger in train mode, and must come back that way (also when the block raises).
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
    """``tensors`` moved to ``model``'s device (one in, one out; several in, a tuple)."""
    # THE place where data meets a model (evaluation, analysis, notebooks). Attacks do not move data: a
    # mismatch there is the caller's bug and an error.
    moved = tuple(t.to(model_device(model), non_blocking=True) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


# ------------------------------------------------------------------------------------------------------------
# Input checks (also used by afs.evaluation and afs.autoattack): each names the problem, before any work
# ------------------------------------------------------------------------------------------------------------
def check_images(x: Any, name: str = "x") -> torch.Tensor:
    """A float (B, C, H, W) tensor with values in [0, 1], else a TypeError/ValueError naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor in [0, 1], got dtype {x.dtype} "
                        "(uint8 images: divide by 255, or use afs.evaluation.evaluate which converts them)")
    if x.dtype == torch.float64:
        raise TypeError(f"{name} is float64; the networks hold float32 weights, so give float32 images "
                        "(x.float()); bf16 runs through autocast, not through the input's dtype")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() > 0:
        lo, hi = (v.item() for v in torch.aminmax(x.detach()))  # one reduction (a host sync on CUDA)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name} contains non-finite values (NaN or Inf)")
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} must lie in the [0, 1] pixel box, got values in [{lo:.4g}, {hi:.4g}] "
                             "(attacks work on unnormalised pixels; put any mean/std normalisation inside the model)")
    return x


def check_labels(y: Any, batch: int, device: torch.device, n_classes: int | None = None,
                 name: str = "y") -> torch.Tensor:
    """Integer class labels of shape [batch] on ``device``, in [0, n_classes); returned as int64."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 labels, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels (int64), got dtype {y.dtype}")
    if y.shape != (batch,):
        raise ValueError(f"{name} must have shape [B]=[{batch}] to match the images, got {tuple(y.shape)}")
    if y.device != device:
        raise ValueError(f"device mismatch: {name} is on {y.device}, the images on {device}")
    y = y.long()  # what cross_entropy and gather index with
    if batch > 0:
        lo, hi = (v.item() for v in torch.aminmax(y))
        if lo < 0:
            raise ValueError(f"{name} has a negative label ({lo}); labels are class indices >= 0")
        if n_classes is not None and hi >= n_classes:
            raise ValueError(f"{name} has label {hi} but the model outputs {n_classes} classes")
    return y


def _check_budget(value: Any, name: str, upper: float | None) -> Budget:
    # A number, or a 0-d/[B] float tensor, finite, >= 0 and <= upper (the [B] shape is checked per call).
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a per-sample tensor of shape [B], got {type(value).__name__}")
    if isinstance(value, torch.Tensor) and (not value.is_floating_point() or value.dim() > 1):
        raise ValueError(f"{name} as a tensor must be a float 0-d or per-sample [B] tensor, got dtype "
                         f"{value.dtype}, shape {tuple(value.shape)}")
    t = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64)
    if t.numel() > 0 and bool((~torch.isfinite(t) | (t < 0) | (t > (math.inf if upper is None else upper))).any()):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be finite, >= 0{bound} (pixel units, e.g. 8/255), got values in "
                         f"[{t.min().item()}, {t.max().item()}]")
    return t if isinstance(value, torch.Tensor) else float(value)


def _fmt_budget(v: Budget) -> str:
    # ``0.0314 (8/255)`` for numbers, a short summary for per-sample tensors.
    if isinstance(v, torch.Tensor):
        return f"tensor[{v.numel()}]" + (f" in [{v.min().item():.4f}, {v.max().item():.4f}]" if v.numel() else "")
    return f"{v:.4f} ({round(v * 255, 3):g}/255)"


# ------------------------------------------------------------------------------------------------------------
# PGD
# ------------------------------------------------------------------------------------------------------------
class PGD:
    """L-inf projected gradient ascent on the loss (Eq. 4), in [0, 1] pixel space (arguments below)."""

    # model: any nn.Module mapping (B, C, H, W) images in [0, 1] to logits (B, K), a whole StackedModel
    #     included (attacks on AFS target the stack, Section III).
    # eps: the ball's radius, a number in [0, 1] or a per-sample tensor [B] (Table VI). Paper: 8/255.
    # step_size: PGD's step (a number or a [B] tensor). Paper: 2/255.
    # steps: gradient steps (0: the start itself).
    # start: "uniform" (standard), "none" (from x) or "authors" (see the module text).
    # restarts: independent random starts; per sample the worst final iterate is kept.
    # loss: "ce" (the paper's) or "margin" (margin_loss).
    # compile: torch.compile each step, True (Inductor) or a dict of torch.compile options: the same attack
    #     within afs_kernels.COMPILED_PIXEL_TOLERANCE (the profiles set it from Profile.compile_attacks).
    def __init__(self, model: nn.Module, eps: Budget = 8 / 255, step_size: Budget = 2 / 255, steps: int = 10, *,
                 start: Start | str = "uniform", restarts: int = 1, loss: Loss | str = "ce",
                 compile: bool | dict[str, Any] = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
        for name, value, low in (("steps", steps, 0), ("restarts", restarts, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.start = Start.parse(start, "start")
        if restarts > 1 and self.start is Start.NONE:
            raise ValueError("restarts > 1 needs a random start: from start='none' every restart is identical")
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be True/False or a dict of torch.compile options, got {compile!r}")
        self.model, self.steps, self.restarts, self.compile = model, steps, restarts, compile
        self.eps, self.step_size = _check_budget(eps, "eps", 1.0), _check_budget(step_size, "step_size", None)
        self.loss = Loss.parse(loss, "loss")
        # (model probed, its class count): the label range check probes each model once, not every call.
        self._classes: tuple[nn.Module, int] | None = None

    def __repr__(self) -> str:
        return (f"PGD(eps={_fmt_budget(self.eps)}, step_size={_fmt_budget(self.step_size)}, steps={self.steps}, "
                f"start={self.start}, restarts={self.restarts}, loss={self.loss}, compile={self.compile})")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None = None,
                 start_from: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``: ``x``'s shape, dtype and device, in [0, 1] and the eps-ball.
        ``seed`` seeds one generator on the data's device (``None``: torch's global RNG); ``start_from`` is
        the first iterate instead of a random start (one restart only)."""
        # start_from: the loop is a function of its current iterate, so PGD-10's output plus 10 more steps
        # *is* PGD-20 from the same start, bit for bit; afs.evaluation runs PGD-10 and PGD-20 as one chain.
        # Every check runs here, once per call; the kernels below are called with check=False.
        x = check_images(x).detach()
        y = check_labels(y, x.shape[0], x.device)
        eps, step_size = self._budget(self.eps, "eps", x), self._budget(self.step_size, "step_size", x)
        # Attacks do not move data (on_model_device does): a model elsewhere is the caller's bug.
        first = next(self.model.parameters(), None)
        if first is not None and first.device != x.device:
            raise ValueError(f"device mismatch: the model's parameters are on {first.device}, the images on {x.device}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
        if start_from is not None:
            if self.restarts != 1:
                raise ValueError(f"start_from continues one run; this attack has restarts={self.restarts}")
            start_from = check_images(start_from, "start_from").detach()
            if start_from.shape != x.shape or start_from.device != x.device:
                raise ValueError(f"start_from must match x's shape {tuple(x.shape)} and device {x.device}, got "
                                 f"{tuple(start_from.shape)} on {start_from.device}")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("PGD needs autograd for the input gradient; call it outside torch.inference_mode()")
        if x.shape[0] == 0:  # an empty batch: nothing to attack, and no probe of the model
            return x.clone()
        # Eval mode during the attack (every submodule's mode restored afterwards, also on an exception);
        # gradients are taken w.r.t. the input only, so no parameter gets a .grad.
        with eval_mode(self.model):
            check_labels(y, x.shape[0], x.device, n_classes=self._n_classes(x))
            # One generator per call, on the data's device: a seed fixes every draw of every restart.
            gen = torch.Generator(device=x.device).manual_seed(seed) if seed is not None else None
            best = best_loss = best_wrong = None
            for _ in range(self.restarts):
                x0 = self._start(x, eps, gen) if start_from is None else start_from
                # Eq. 4's steps; the authors' variant projects onto the ball only and clamps once at the end.
                x_adv = afs_kernels.pgd_loop(
                    self.model, x, y, x0, eps, step_size, self.steps,
                    clamp_box_each_step=self.start is not Start.AUTHORS,
                    loss_fn=margin_loss if self.loss is Loss.MARGIN else None,
                    compile=None if self.compile is False else ({} if self.compile is True else self.compile),
                    check=False)
                if self.restarts == 1:
                    return x_adv
                # Restarts: score each final iterate by misclassification, then by cross-entropy.
                with torch.no_grad():
                    logits = self.model(x_adv).float()
                    ce, wrong = F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y  # (B,) each
                if best is None:
                    best, best_loss, best_wrong = x_adv, ce, wrong
                    continue
                # The worst case per sample: misclassified beats correct; among equals, higher loss wins.
                better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (ce > best_loss))
                best = torch.where(better[:, None, None, None], x_adv, best)
                best_loss, best_wrong = torch.where(better, ce, best_loss), torch.where(better, wrong, best_wrong)
            return best

    @staticmethod
    def _budget(value: Budget, name: str, x: torch.Tensor) -> Budget:
        # A per-sample budget must have x's batch size and lives on x's device.
        if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] != x.shape[0]:
            raise ValueError(f"per-sample {name} must have shape [B]=[{x.shape[0]}], got {tuple(value.shape)}")
        return value.to(x.device) if isinstance(value, torch.Tensor) else value

    def _n_classes(self, x: torch.Tensor) -> int:
        # The model's class count, from a one-sample probe once per model (training calls PGD every batch).
        if self._classes is None or self._classes[0] is not self.model:
            with torch.no_grad():
                probe = self.model(x[:1])
            if not isinstance(probe, torch.Tensor) or probe.dim() != 2:
                got = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
                raise ValueError(f"the model must return logits of shape (B, n_classes), got {got}")
            self._classes = (self.model, int(probe.shape[1]))
        return self._classes[1]

    def _start(self, x: torch.Tensor, eps: Budget, gen: torch.Generator | None) -> torch.Tensor:
        if self.start is Start.NONE:
            return x.clone()
        if self.start is Start.UNIFORM:
            # Eq. 4's x^0: the fused kernel on CUDA (counter-based RNG seeded from gen), torch.rand elsewhere.
            return afs_kernels.random_start(x, eps, "Linf", generator=gen, check=False)
        # The authors' start: the difference of two uniforms, triangular on [-eps, eps] (mean |delta| eps/3,
        # uniform's is eps/2), not clamped to the box (their loop clamps once, after the last step).
        e = eps[:, None, None, None] if isinstance(eps, torch.Tensor) and eps.dim() == 1 else eps
        u1 = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        u2 = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return x + (u1 - u2) * e


def fgsm(model: nn.Module, eps: Budget = 8 / 255, **kwargs: Any) -> PGD:
    """FGSM, ``clamp(x + eps * sign(grad), 0, 1)``: one PGD step of size eps from ``x`` (the projection is
    then a no-op), so it shares PGD's loop, mode handling and checks. ``kwargs``: ``compile``."""
    return PGD(model, eps=eps, step_size=eps, steps=1, start="none", **kwargs)
