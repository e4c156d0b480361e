"""One L-inf PGD step (Eq. 4), fused: ascend along sign(grad), project onto the eps-ball, clamp to [0, 1].

Top to bottom: the Triton kernel (its math above it) -> host launcher -> the torch math -> public ``pgd_step``
and its pure-PyTorch ``pgd_step_reference`` (the CPU path and the tests' oracle). No ``autograd.Function``:
a PGD iterate is a constant to the attack (``sign`` has zero gradient a.e.). Every path computes in fp32 and
writes the input dtype (the reference computes fp64 inputs in fp64); in fp32 all paths agree bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (BLOCK, Backend, Budget, as_budget, check_tensor, choose_backend, elementwise_args,
                      launch_device, per_sample_view, tl, triton_jit)


# Elementwise over all B*D elements (b = sample index of the element):
#   x' = x + step[b] * sign(g)
#   x' = min(max(x', x0 - eps[b]), x0 + eps[b])        # projection onto the L-inf ball
#   x' = min(max(x', 0), 1)            if CLAMP          # the [0,1] image box
@triton_jit
def _pgd_linf_kernel(x_ptr, g_ptr, x0_ptr, out_ptr, eps_ptr, step_ptr, n_elements, per_sample, eps_stride,
                     step_stride, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64: B*D may pass 2**31 for big batches
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    b = offs // per_sample
    eps = tl.load(eps_ptr + b * eps_stride, mask=mask, other=0.0)
    step = tl.load(step_ptr + b * step_stride, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
    x = x + step * sign  # exact: step * (+-1 or 0) never rounds, so an FMA changes nothing
    x = tl.minimum(tl.maximum(x, x0 - eps), x0 + eps)
    if CLAMP:
        x = tl.minimum(tl.maximum(x, 0.0), 1.0)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: torch.Tensor, step: torch.Tensor,
            clamp_box: bool) -> torch.Tensor:
    out, args, grid = elementwise_args("PGD step", (x_adv, grad, x_nat), (eps, step))
    if out.numel() > 0:
        with launch_device(x_adv.device):  # on the data's GPU, not the current one
            _pgd_linf_kernel[grid](*args, CLAMP=clamp_box, BLOCK=BLOCK)
    return out


def _math(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: torch.Tensor, step: torch.Tensor,
          clamp_box: bool) -> torch.Tensor:
    """The step in plain torch ops: no validation, no host sync (what ``torch.compile`` traces).
    ``eps``/``step``: fp32 [] or [B]; the kernel's operation order."""
    dtype = x_adv.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x, g, x0 = x_adv.to(compute), grad.to(compute), x_nat.to(compute)
    eps_b = per_sample_view(eps.to(compute), x.dim())  # (B, 1, ..., 1) or ()
    x = x + per_sample_view(step.to(compute), x.dim()) * torch.sign(g)
    x = torch.minimum(torch.maximum(x, x0 - eps_b), x0 + eps_b)
    if clamp_box:
        x = x.clamp(0.0, 1.0)
    return x.to(dtype)


def _dispatch(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: torch.Tensor, step: torch.Tensor,
              clamp_box: bool, backend: Any = "auto") -> torch.Tensor:
    """The step on validated inputs (budgets already fp32 tensors): the kernel or the torch math."""
    if choose_backend(backend, x_adv, _pgd_linf_kernel) is Backend.TRITON:
        return _launch(x_adv, grad, x_nat, eps, step, clamp_box)
    with torch.no_grad():
        return _math(x_adv, grad, x_nat, eps, step, clamp_box)


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: Budget, step_size: Budget, *,
             clamp_box: bool = True, backend: Backend | str = "auto", check: bool = True) -> torch.Tensor:
    """The next PGD iterate ``clamp(clip(x_adv + step*sign(grad), x_nat-eps, x_nat+eps), 0, 1)`` (out of
    place; never requires grad).

    Args:
        x_adv, grad, x_nat: same shape (B, ...), floating dtype and device.
        eps, step_size: floats, 0-d tensors or per-sample [B] tensors; >= 0.
        clamp_box: ``False`` for the authors' variant, which clamps once after the loop.
        backend: ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` (on CPU only under
            ``TRITON_INTERPRET=1``) or ``"reference"``.
        check: the value checks (budgets, finite gradient; host syncs on CUDA); metadata is always checked.
    """
    check_tensor(x_adv, "x_adv")
    check_tensor(grad, "grad", x_adv, "x_adv")
    check_tensor(x_nat, "x_nat", x_adv, "x_adv")
    eps_t = as_budget(eps, "eps", x_adv.shape[0], x_adv.device, check=check)
    step_t = as_budget(step_size, "step_size", x_adv.shape[0], x_adv.device, check=check)
    if check and not bool(torch.isfinite(grad).all()):
        raise ValueError("grad contains non-finite values (NaN or Inf)")
    return _dispatch(x_adv, grad, x_nat, eps_t, step_t, clamp_box, backend)


def pgd_step_reference(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: Budget, step_size: Budget,
                       *, clamp_box: bool = True, check: bool = True) -> torch.Tensor:
    """Pure-PyTorch :func:`pgd_step` (the CPU path and the kernel's oracle); same arguments."""
    return pgd_step(x_adv, grad, x_nat, eps, step_size, clamp_box=clamp_box, backend=Backend.REFERENCE, check=check)
