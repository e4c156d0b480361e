"""THE PGD loop of the project (Eq. 4), eager or ``torch.compile``d: :func:`pgd_loop`.

``afs.attacks.PGD`` (and through it training, the merger and evaluation) runs every gradient step here.
"""

# Nobody else writes a PGD loop: the authors' release had three copies that drifted apart. The loop does not
# choose the start (pass ``x_start``, e.g. from ``random_start``) nor touch ``model.train()/eval()``.
#
# Gradients are taken w.r.t. the input only. Eager: ``torch.autograd.grad(loss, x)`` runs only the nodes on
# the path to ``x`` (a convolution's backward computes grad_input only) and never writes a ``.grad``.
# Compiled: ``torch.func.grad`` (traced by Dynamo without a graph break) with the parameters frozen for the
# call, so forward, input-gradient backward and update become one inference graph per step.

from __future__ import annotations

import types
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ._common import Budget, as_budget, check_box, check_tensor
from .pgd_step import _dispatch, _math

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# How far the compiled loop may drift from the eager one: the share of pixels whose final values differ.
# Inductor reorders float reductions (and on CUDA picks its own convolution algorithms), so where an input
# gradient is ~0 its sign can flip and that pixel moves one step the other way, which can steer later
# steps. On the CPU well under 1% differ; 2% leaves room for the GPU while still catching a loop that
# computes a different attack (which differs almost everywhere). The compile test and notebook 07 use it.
COMPILED_PIXEL_TOLERANCE = 0.02


def sum_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch."""
    # Summed, not averaged: per-sample gradients do not shrink as the batch grows (sign is scale-free, but a
    # mean over a big batch can underflow in bf16).
    return F.cross_entropy(logits.float(), y, reduction="sum")


def _prepare(model: Any, x_nat: Any, y: Any, x_start: Any, steps: Any, loss_fn: LossFn | None) -> None:
    # The checks of one attack's inputs: once per call, never per step (host syncs on CUDA).
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
    check_tensor(x_nat, "x_nat")
    check_tensor(x_start, "x_start", x_nat, "x_nat")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if loss_fn is None:  # only the default loss fixes what y is; a custom loss may take any target
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.shape != x_nat.shape[:1]:
            raise ValueError(f"y must have shape [B]=[{x_nat.shape[0]}], got {tuple(y.shape)}")
        if y.device != x_nat.device:
            raise ValueError(f"device mismatch: y is on {y.device}, x_nat on {x_nat.device}")
    elif not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(logits, y) -> scalar, got {type(loss_fn).__name__}")
    first = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if first is not None and first.device != x_nat.device:
        raise ValueError(f"device mismatch: model parameters are on {first.device}, x_nat on {x_nat.device}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("PGD needs autograd for the input gradient; call it outside torch.inference_mode()")
    check_box(x_nat, "x_nat")


def pgd_loop(model: Callable[[torch.Tensor], torch.Tensor], x_nat: torch.Tensor, y: torch.Tensor,
             x_start: torch.Tensor, eps: Budget, step_size: Budget, steps: int, *, clamp_box_each_step: bool = True,
             loss_fn: LossFn | None = None, compile: dict[str, Any] | None = None, check: bool = True) -> torch.Tensor:
    """Run ``steps`` L-inf PGD iterations from ``x_start``; return the final iterate (detached).

    model maps (B, ...) inputs in [0, 1] to logits (its train/eval mode is left as the caller set it); y: labels
    [B] (or whatever ``loss_fn(logits, y) -> scalar`` takes; default :func:`sum_cross_entropy`); x_start: the
    first iterate, like ``x_nat``; eps, step_size: floats, 0-d or per-sample [B] tensors, >= 0; steps = 0
    returns ``x_start``. ``clamp_box_each_step=False`` is the authors' variant (see ``afs.attacks``).
    compile: ``None`` (eager) or ``torch.compile`` options for the step (``{}``: Inductor, or e.g.
    ``{"backend": "aot_eager"}``, ``{"mode": "reduce-overhead"}``); needs an ``nn.Module``.
    check: validate the inputs; ``False`` when the caller already did (``afs.attacks.PGD``).
    """
    if check:
        _prepare(model, x_nat, y, x_start, steps, loss_fn)
    eps_t = as_budget(eps, "eps", x_nat.shape[0], x_nat.device, check=check)  # fp32 [] or [B]
    step_t = as_budget(step_size, "step_size", x_nat.shape[0], x_nat.device, check=check)
    loss = sum_cross_entropy if loss_fn is None else loss_fn
    x_nat = x_nat.detach()
    x = x_start.detach().clone()  # a fresh leaf, even from an inference-mode tensor
    # Eq. 4, every step:  x^{t+1} = clamp(Proj_{B(x, eps)}(x^t + step_size * sign(grad_x L(f(x^t), y))), 0, 1)
    # (the authors' variant skips the clamp inside the loop and clamps once after it).
    if compile is not None:
        x = _compiled_loop(model, compile, loss, x, y, x_nat, eps_t, step_t, steps, clamp_box_each_step)
    else:
        with torch.enable_grad():  # callers often evaluate under no_grad; the input gradient needs autograd
            for _ in range(steps):
                x.requires_grad_(True)
                # Only the input's gradient: the engine prunes every weight-gradient branch.
                (grad,) = torch.autograd.grad(loss(model(x), y), x, allow_unused=True)
                if grad is None:
                    raise ValueError("the loss does not depend on the input x; cannot take a PGD step")
                x = _dispatch(x.detach(), grad, x_nat, eps_t, step_t, clamp_box_each_step)
    if not clamp_box_each_step:
        x = x.clamp(0.0, 1.0)  # the authors' variant clamps to the box once, after the loop
    return x.detach()


# ------------------------------------------------------------------------------------------------------------
# Compiled form
# ------------------------------------------------------------------------------------------------------------
def _attack_step(model: torch.nn.Module, buffers: dict[str, torch.Tensor], loss_fn: LossFn, x: torch.Tensor,
                 y: torch.Tensor, x_nat: torch.Tensor, eps: torch.Tensor, step: torch.Tensor,
                 clamp_box: bool) -> torch.Tensor:
    # One PGD step as one traceable function: forward, input gradient, projected update.
    # eps/step are fp32 [B] tensors: data, not constants, so new budgets reuse the graph. The buffers go in
    # explicitly: torch.func.grad refuses in-place updates of captured tensors, which a train-mode BatchNorm
    # does to its running stats; as inputs they are allowed and land in the model's.
    def objective(x_in: torch.Tensor, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(model, bufs, (x_in,), strict=False).float(), y)

    grad = torch.func.grad(objective)(x, buffers)  # argnums=0: w.r.t. the input only
    return _math(x, grad, x_nat, eps, step, clamp_box)


@contextmanager
def _frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    # Every parameter requires_grad=False inside the block (restored after): the compiled step is then an
    # inference graph, with no weight gradients and no activations kept for a backward.
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# One compiled step per (model, options). Dynamo caches graphs on the code object, a few entries each
# before it silently falls back to eager; a private copy of the step's code per entry keeps each model's
# graphs in their own cache. Weak keys: a model that goes away takes its entries with it.
_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[Any, ...], Callable[..., torch.Tensor]]]
_COMPILED = weakref.WeakKeyDictionary()


def _compiled_loop(model: Any, options: dict[str, Any], loss: LossFn, x: torch.Tensor, y: torch.Tensor,
                   x_nat: torch.Tensor, eps: torch.Tensor, step: torch.Tensor, steps: int,
                   clamp_box: bool) -> torch.Tensor:
    # The step loop with each step compiled; the Python loop stays outside, so `steps` never recompiles.
    if not isinstance(model, torch.nn.Module) or not isinstance(options, dict):
        raise TypeError(f"compile needs an nn.Module and a dict of torch.compile options, got "
                        f"{type(model).__name__} and {type(options).__name__}")
    per_model = _COMPILED.setdefault(model, {})
    key = tuple(sorted(options.items(), key=lambda kv: kv[0]))
    if key not in per_model:
        f = _attack_step
        code = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        per_model[key] = torch.compile(code, **options)
    fn = per_model[key]
    batch = x.shape[0]
    eps_b, step_b = eps.expand(batch).contiguous(), step.expand(batch).contiguous()  # (B,): one graph for both
    cudagraphs = "reduce-overhead" in str(options.get("mode"))
    buffers = dict(model.named_buffers())
    with _frozen_parameters(model), torch.enable_grad():
        for _ in range(steps):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            x = fn(model, buffers, loss, x, y, x_nat, eps_b, step_b, clamp_box)
            if cudagraphs:
                x = x.clone()  # a CUDA-graph output is overwritten by the next replay
    return x
