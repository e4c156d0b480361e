"""THE PGD loop of the project, eager (:func:`pgd_loop`) and ``torch.compile``d (:class:`CompiledPGD`).

``afs.attacks.PGD``, adversarial training of the extractors, merger training and evaluation all go through
this module; nobody else writes a PGD loop (the authors' release had three copies that drifted apart).

What the loop does NOT do: choose the start (pass ``x_start``, e.g. from :func:`random_start`) or touch
``model.train()/eval()`` -- the caller (``afs.attacks.PGD``) owns the mode and restores it.

Gradients are taken w.r.t. the input only. The eager loop calls ``torch.autograd.grad(loss, x)``: the
autograd engine then runs only the nodes on the path to ``x``, so weight-gradient kernels are skipped
(e.g. a convolution backward computes grad_input only) and no parameter's ``.grad`` is ever written.
The compiled loop uses ``torch.func.grad`` (which Dynamo traces without a graph break) with the
parameters frozen for the attack, so the whole step -- forward, input-gradient backward and the PGD
update -- becomes one inference graph with no weight gradients and no saved-for-backward buffers.
"""

from __future__ import annotations

import types
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ._common import Budget, Norm, as_budget, check_same, check_tensor
from .pgd_step import pgd_step, pgd_step_math

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# How far the compiled loop may drift from the eager one: the share of pixels whose final values differ.
# Inductor reorders float reductions (and on CUDA picks its own convolution algorithms, TF32 off or not),
# so where an input gradient is ~0 its sign can flip and that pixel moves by one step the other way; each
# flip can then steer later steps. On the CPU well under 1% differ; 2% leaves room for the GPU's larger
# reordering while still catching a loop that computes a different attack (which differs almost everywhere).
# The one tolerance of the project: the compile test and notebook 07 both use it.
COMPILED_PIXEL_TOLERANCE = 0.02


def sum_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch: per-sample gradients do not shrink as the batch grows
    (sign and L2-normalisation are scale-free, but a mean over a big batch can underflow in bf16)."""
    return F.cross_entropy(logits.float(), y, reduction="sum")


# --------------------------------------------------------------------------------------------------------
# Validation, shared by the eager and the compiled loop (runs once per attack, not per step)
# --------------------------------------------------------------------------------------------------------
def _prepare(
    model: Any,
    x_nat: Any,
    y: Any,
    x_start: Any,
    eps: Budget,
    step_size: Budget,
    steps: Any,
    norm: Any,
    loss_fn: LossFn | None,
) -> tuple[Norm, torch.Tensor, torch.Tensor, LossFn]:
    """Validate one attack's inputs; return the norm, eps and step as fp32 [] or [B], and the loss.

    The value checks (budgets finite and >= 0, ``x_nat`` in [0, 1]) cost host syncs on CUDA; they run
    here once so each step can call ``pgd_step(..., check=False)``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
    norm_ = Norm.parse(norm, "norm")
    check_tensor(x_nat, "x_nat")
    check_same(x_nat, "x_nat", x_start, "x_start")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if loss_fn is None:
        # Only the default loss fixes what y is; a custom loss_fn may take any target.
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
        if y.shape != x_nat.shape[:1]:
            raise ValueError(f"y must have shape [B]=[{x_nat.shape[0]}], got {tuple(y.shape)}")
        if y.device != x_nat.device:
            raise ValueError(f"device mismatch: y is on {y.device}, x_nat on {x_nat.device}")
        loss_fn = sum_cross_entropy
    elif not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(logits, y) -> scalar, got {type(loss_fn).__name__}")
    if isinstance(model, torch.nn.Module):
        first = next(model.parameters(), None)
        if first is not None and first.device != x_nat.device:
            raise ValueError(f"device mismatch: model parameters are on {first.device}, x_nat on {x_nat.device}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("PGD needs autograd for the input gradient; call it outside torch.inference_mode()")
    batch, device = x_nat.shape[0], x_nat.device
    eps_t = as_budget(eps, "eps", batch, device, check=True)
    step_t = as_budget(step_size, "step_size", batch, device, check=True)
    if x_nat.numel() > 0:
        lo, hi = torch.aminmax(x_nat.detach())
        if bool(lo < 0) or bool(hi > 1):
            raise ValueError(f"x_nat must lie in the [0, 1] pixel box, got values in [{lo.item()}, {hi.item()}]")
    return norm_, eps_t, step_t, loss_fn


# --------------------------------------------------------------------------------------------------------
# Eager loop
# --------------------------------------------------------------------------------------------------------
def pgd_loop(
    model: Callable[[torch.Tensor], torch.Tensor],
    x_nat: torch.Tensor,
    y: torch.Tensor,
    x_start: torch.Tensor,
    eps: Budget,
    step_size: Budget,
    steps: int,
    norm: Norm | str = "Linf",
    *,
    clamp_box_each_step: bool = True,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """Run ``steps`` PGD iterations from ``x_start``; return the final iterate (detached).

    Args:
        model: maps (B, ...) inputs in [0, 1] to logits; its train/eval mode is left as the caller set it.
        x_nat: clean inputs (B, ...), in [0, 1]. y: labels [B] (or whatever ``loss_fn`` takes).
        x_start: first iterate, same shape/dtype/device as ``x_nat`` (e.g. :func:`random_start`).
        eps, step_size: floats, 0-d tensors or per-sample tensors [B]; >= 0.
        steps: number of gradient steps (0 returns ``x_start``; box-clamped in the authors' variant).
        norm: ``"Linf"`` or ``"L2"``.
        clamp_box_each_step: ``True`` (standard PGD): clamp to [0, 1] after every step. ``False`` (the
            authors' variant): steps only project onto the eps-ball; the result is clamped once at the end.
        loss_fn: ``loss_fn(logits, y) -> scalar`` to ascend; default cross-entropy summed over the batch.
    """
    norm_, eps_t, step_t, loss = _prepare(model, x_nat, y, x_start, eps, step_size, steps, norm, loss_fn)
    x_nat = x_nat.detach()
    x = x_start.detach().clone()  # a fresh leaf, even from an inference-mode tensor
    with torch.enable_grad():  # callers often evaluate under no_grad; the input gradient needs autograd
        for _ in range(steps):
            x.requires_grad_(True)
            objective = loss(model(x), y)
            # Only the input's gradient: the engine prunes every weight-gradient branch.
            (grad,) = torch.autograd.grad(objective, x, allow_unused=True)
            if grad is None:
                raise ValueError("the loss does not depend on the input x; cannot take a PGD step")
            x = pgd_step(x.detach(), grad, x_nat, eps_t, step_t, norm_, clamp_box=clamp_box_each_step, check=False)
    if not clamp_box_each_step:
        x = x.clamp(0.0, 1.0)  # the authors' variant clamps to the box once, after the loop
    return x.detach()


# --------------------------------------------------------------------------------------------------------
# Compiled loop
# --------------------------------------------------------------------------------------------------------
def _attack_step(
    model: torch.nn.Module,
    buffers: dict[str, torch.Tensor],
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    x_nat: torch.Tensor,
    eps: torch.Tensor,
    step: torch.Tensor,
    norm: Norm,
    clamp_box: bool,
    bf16: bool,
) -> torch.Tensor:
    """One PGD step as one traceable function: forward, input gradient, projected update.

    ``eps``/``step`` are fp32 tensors of shape [B]: tensors (not floats) so new budgets are new *data*
    for the same graph, and always [B] so scalar and per-sample budgets share it too.
    ``buffers`` (the model's named buffers) go in explicitly: ``torch.func.grad`` refuses in-place updates
    of captured tensors, which a BatchNorm in train mode does to its running statistics; as explicit
    inputs the updates are allowed and land in the model's own buffers, as in the eager loop.
    """

    def objective(x_in: torch.Tensor, bufs: dict[str, torch.Tensor]) -> torch.Tensor:
        # bf16 autocast covers the model only; the loss and the update stay in fp32.
        with torch.autocast(device_type=x_in.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = torch.func.functional_call(model, bufs, (x_in,), strict=False)
        return loss_fn(logits.float(), y)

    grad = torch.func.grad(objective)(x, buffers)  # argnums=0: w.r.t. the input only
    return pgd_step_math(x, grad, x_nat, eps, step, norm, clamp_box)


@contextmanager
def frozen_parameters(model: Any) -> Iterator[None]:
    """Set every parameter of ``model`` to ``requires_grad=False`` inside the block; restore after.

    With no parameter requiring grad the compiled step is an inference graph: no weight gradients, no
    activations kept for a backward that never comes.
    """
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _private_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object.

    Dynamo keeps its compiled-graph cache on the code object, capped at a few entries
    (``torch._dynamo.config.recompile_limit``) before it silently falls back to eager. A notebook compiles
    the step for many models, norms and batch sizes; a private code object per :class:`CompiledPGD`
    keeps each instance's graphs in its own cache instead of all of them competing for one.
    """
    code = fn.__code__.replace()  # an equal but distinct code object
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__doc__, copy.__qualname__ = fn.__kwdefaults__, fn.__doc__, fn.__qualname__
    return copy


class CompiledPGD:
    """:func:`pgd_loop` with each step (forward + input-gradient + update) compiled by ``torch.compile``.

    Call it like ``pgd_loop`` without the model. The Python loop over ``steps`` stays outside the graph, so
    the step count never recompiles, and eps/step always enter as fp32 [B] tensors, so a sweep over
    budgets (scalar or per-sample) reuses one graph. What does recompile: a new norm or
    ``clamp_box_each_step`` value, a new ``loss_fn`` object, a new dtype; a new batch size recompiles
    once more, then as a dynamic-shape graph (unless ``dynamic=False``).

    Args:
        model: an ``nn.Module``. Its parameters are frozen only for the duration of each call.
        backend, mode, dynamic, fullgraph: passed to ``torch.compile`` (``mode`` only when given).
        bf16: run the model under bf16 autocast (meant for GPUs; allowed on CPU). Loss and update stay fp32.
        channels_last: convert the model's parameters to channels_last IN PLACE once (values unchanged)
            and feed 4-D inputs as channels_last; a GPU convolution speed-up.
        weak_model: hold the model by a weak reference (what the :func:`compiled_pgd_loop` cache does,
            so that a cached attack does not keep its model alive).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        backend: str | Callable[..., Any] = "inductor",
        mode: str | None = None,
        dynamic: bool | None = None,
        bf16: bool = False,
        channels_last: bool = False,
        fullgraph: bool = False,
        weak_model: bool = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._model_ref = weakref.ref(model)
        self._model_strong = None if weak_model else model
        self.backend, self.mode, self.dynamic = backend, mode, dynamic
        self.bf16, self.channels_last, self.fullgraph = bool(bf16), bool(channels_last), bool(fullgraph)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # no-op for parameters that are not 4-D
        options: dict[str, Any] = {"backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
        if mode is not None:
            options["mode"] = mode
        self._step = torch.compile(_private_copy(_attack_step), **options)

    @property
    def model(self) -> torch.nn.Module:
        """The attacked model (an error if a weakly held model was garbage-collected)."""
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model of this cached compiled attack no longer exists; keep a reference to it")
        return model

    def __repr__(self) -> str:
        model = self._model_ref()
        return (
            f"CompiledPGD(model={type(model).__name__}, backend={self.backend!r}, mode={self.mode!r}, "
            f"dynamic={self.dynamic}, bf16={self.bf16}, channels_last={self.channels_last})"
        )

    def __call__(
        self,
        x_nat: torch.Tensor,
        y: torch.Tensor,
        x_start: torch.Tensor,
        eps: Budget,
        step_size: Budget,
        steps: int,
        norm: Norm | str = "Linf",
        *,
        clamp_box_each_step: bool = True,
        loss_fn: LossFn | None = None,
    ) -> torch.Tensor:
        """Same contract as :func:`pgd_loop` (minus ``model``); returns the final iterate, detached."""
        model = self.model
        norm_, eps_t, step_t, loss = _prepare(model, x_nat, y, x_start, eps, step_size, steps, norm, loss_fn)
        batch = x_nat.shape[0]
        eps_b = eps_t.expand(batch).contiguous()  # (B,): one graph for scalar and per-sample budgets
        step_b = step_t.expand(batch).contiguous()
        x_nat = x_nat.detach()
        x = x_start.detach().clone()
        if self.channels_last and x.dim() == 4:
            x_nat = x_nat.contiguous(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        cudagraphs = self.mode is not None and "reduce-overhead" in self.mode
        buffers = dict(model.named_buffers())
        with frozen_parameters(model), torch.enable_grad():
            for _ in range(steps):
                if cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                x = self._step(
                    model, buffers, loss, x, y, x_nat, eps_b, step_b, norm_, clamp_box_each_step, self.bf16
                )
                if cudagraphs:
                    x = x.clone()  # a CUDA-graph output is overwritten by the next replay
        if not clamp_box_each_step:
            x = x.clamp(0.0, 1.0)
        return x.detach()


# One CompiledPGD per (model, options): repeated calls reuse the compiled step (a fresh CompiledPGD has a
# fresh code object, hence an empty Dynamo cache). Weak keys, and the cached attacks hold their model
# weakly too, so a model that goes away takes its entries with it.
_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[Any, ...], CompiledPGD]]
_COMPILED = weakref.WeakKeyDictionary()


def compiled_pgd_loop(
    model: torch.nn.Module,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
    bf16: bool = False,
    channels_last: bool = False,
    fullgraph: bool = False,
) -> CompiledPGD:
    """A cached :class:`CompiledPGD` for ``model`` and these options (built on first request)."""
    key = (backend, mode, dynamic, bool(bf16), bool(channels_last), bool(fullgraph))
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        per_model[key] = CompiledPGD(
            model,
            backend=backend,
            mode=mode,
            dynamic=dynamic,
            bf16=bf16,
            channels_last=channels_last,
            fullgraph=fullgraph,
            weak_model=True,
        )
    return per_model[key]
