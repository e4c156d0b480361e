"""One PGD step, fused: ascend, project onto the eps-ball, clamp to the [0, 1] box.

Top to bottom: Triton kernels (their math above each) -> host launcher -> the torch math -> public
``pgd_step`` and its pure-PyTorch ``pgd_step_reference`` (the CPU path and the tests' oracle). No
``autograd.Function``: a PGD iterate is a constant to the attack (``sign`` has zero gradient a.e.).
Every path computes in fp32 and writes the input dtype (the reference computes fp64 inputs in fp64).
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (NORM_FLOOR, TRITON_DTYPES, Backend, Budget, Norm, as_budget, check_same, check_tensor,
                      choose_backend, flat_views, launch_device, per_sample_view, tl, triton, triton_jit)

# Elements per program of the elementwise L-inf kernel; the largest per-sample chunk of the L2 kernel.
_LINF_BLOCK = 1024
_L2_MAX_BLOCK = 1024


# L-inf, elementwise over all B*D elements (b = sample index of the element):
#   x' = x + step[b] * sign(g)
#   x' = min(max(x', x0 - eps[b]), x0 + eps[b])        # projection onto the L-inf ball
#   x' = min(max(x', 0), 1)            if CLAMP          # the [0,1] image box
# eps/step are read through a stride: 0 for one shared budget, 1 for per-sample budgets.
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


# L2, one program per sample b over its D elements, three sweeps (all in fp32):
#   gn    = max(||g||_2, floor)                              # sweep 1: sum g^2
#   d     = (x + g * (step[b] / gn)) - x0;  dn = ||d||_2     # sweep 2: sum d^2
#   x'    = x0 + d * min(1, eps[b] / max(dn, floor))          # sweep 3: project onto the L2 ball, write
#   x'    = min(max(x', 0), 1)            if CLAMP
# Sweep 3 recomputes d instead of storing it: same memory traffic as a store + reload, and the
# intermediate stays in fp32 even for bf16 inputs. A sample (3*32*32 = 3072 values on CIFAR) fits in L2.
@triton_jit
def _pgd_l2_kernel(x_ptr, g_ptr, x0_ptr, out_ptr, eps_ptr, step_ptr, per_sample, eps_stride, step_stride, floor,
                   CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * per_sample
    eps = tl.load(eps_ptr + b * eps_stride)
    step = tl.load(step_ptr + b * step_stride)

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, per_sample, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < per_sample
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        acc += g * g
    gnorm = tl.maximum(tl.sqrt_rn(tl.sum(acc, axis=0)), floor)
    coef = tl.div_rn(step, gnorm)  # IEEE division: matches the reference to the last bit or two

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, per_sample, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < per_sample
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        d = (x + g * coef) - x0
        acc += d * d  # masked lanes load zeros, so d = 0 there
    dnorm = tl.maximum(tl.sqrt_rn(tl.sum(acc, axis=0)), floor)
    factor = tl.minimum(tl.div_rn(eps, dnorm), 1.0)

    for start in range(0, per_sample, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < per_sample
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        d = (x + g * coef) - x0
        xn = x0 + d * factor
        if CLAMP:
            xn = tl.minimum(tl.maximum(xn, 0.0), 1.0)
        tl.store(out_ptr + base + offs, xn.to(out_ptr.dtype.element_ty), mask=m)


def _launch(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: torch.Tensor, step: torch.Tensor,
            norm: Norm, clamp_box: bool) -> torch.Tensor:
    """Run the Triton kernel of ``norm``. ``eps``/``step``: fp32 [] or [B] on the data's device."""
    if x_adv.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton PGD step supports {list(TRITON_DTYPES)}, got {x_adv.dtype}; use backend='reference'")
    (xa, g, x0), out, out_flat = flat_views(x_adv, grad, x_nat)
    n = xa.numel()
    if n == 0:
        return out
    batch = x_adv.shape[0]
    per_sample = n // batch
    strides = (int(eps.dim() == 1), int(step.dim() == 1))  # 0: one shared budget, 1: per sample
    eps, step = eps.contiguous(), step.contiguous()
    with launch_device(x_adv.device):  # on the data's GPU, not the current one
        if norm is Norm.LINF:
            _pgd_linf_kernel[(triton.cdiv(n, _LINF_BLOCK),)](xa, g, x0, out_flat, eps, step, n, per_sample, *strides,
                                                             CLAMP=clamp_box, BLOCK=_LINF_BLOCK)
        else:
            # A power of two in [16, 1024]: CIFAR's 3072 values per sample take three loop trips.
            block = max(16, min(triton.next_power_of_2(per_sample), _L2_MAX_BLOCK))
            _pgd_l2_kernel[(batch,)](xa, g, x0, out_flat, eps, step, per_sample, *strides, NORM_FLOOR,
                                     CLAMP=clamp_box, BLOCK=block, num_warps=4)
    return out


def _math(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: torch.Tensor, step: torch.Tensor,
              norm: Norm, clamp_box: bool) -> torch.Tensor:
    """The step in plain torch ops: no validation, no host sync (what ``torch.compile`` traces).

    ``eps``/``step``: fp32 [] or [B]. Same operation order as the kernels: fp32 L-inf agrees bit for bit.
    """
    dtype = x_adv.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x, g, x0 = x_adv.to(compute), grad.to(compute), x_nat.to(compute)
    eps_b = per_sample_view(eps.to(compute), x.dim())  # (B, 1, ..., 1) or ()
    if norm is Norm.LINF:
        x = x + per_sample_view(step.to(compute), x.dim()) * torch.sign(g)
        x = torch.minimum(torch.maximum(x, x0 - eps_b), x0 + eps_b)
    else:
        batch = x.shape[0]
        gn = torch.linalg.vector_norm(g.reshape(batch, -1), dim=1).clamp_min(NORM_FLOOR)  # (B,)
        d = (x + g * per_sample_view(step.to(compute) / gn, x.dim())) - x0
        dn = torch.linalg.vector_norm(d.reshape(batch, -1), dim=1).clamp_min(NORM_FLOOR)  # (B,)
        x = x0 + d * per_sample_view((eps.to(compute) / dn).clamp(max=1.0), x.dim())
    if clamp_box:
        x = x.clamp(0.0, 1.0)
    return x.to(dtype)


def _dispatch(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: torch.Tensor, step: torch.Tensor,
             norm: Norm, clamp_box: bool, backend: Any = "auto") -> torch.Tensor:
    """The step on validated inputs (budgets already fp32 tensors): the kernel or the torch math."""
    if choose_backend(backend, x_adv, _pgd_linf_kernel) is Backend.TRITON:
        return _launch(x_adv, grad, x_nat, eps, step, norm, clamp_box)
    with torch.no_grad():
        return _math(x_adv, grad, x_nat, eps, step, norm, clamp_box)


def _validate(x_adv: Any, grad: Any, x_nat: Any, eps: Budget, step_size: Budget, norm: Any,
              check: bool) -> tuple[Norm, torch.Tensor, torch.Tensor]:
    """Metadata checks always; ``check`` adds the value checks (budgets, finite gradient; host syncs)."""
    norm = Norm.parse(norm, "norm")
    check_tensor(x_adv, "x_adv")
    check_same(x_adv, "x_adv", grad, "grad")
    check_same(x_adv, "x_adv", x_nat, "x_nat")
    eps_t = as_budget(eps, "eps", x_adv.shape[0], x_adv.device, check=check)
    step_t = as_budget(step_size, "step_size", x_adv.shape[0], x_adv.device, check=check)
    if check and not bool(torch.isfinite(grad).all()):
        raise ValueError("grad contains non-finite values (NaN or Inf)")
    return norm, eps_t, step_t


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: Budget, step_size: Budget,
             norm: Norm | str = "Linf", *, clamp_box: bool = True, backend: Backend | str = "auto",
             check: bool = True) -> torch.Tensor:
    """The next PGD iterate (out of place; never requires grad).

    L-inf: ``clamp(clip(x_adv + step*sign(grad), x_nat-eps, x_nat+eps), 0, 1)``. L2: ``x_adv +
    step*grad/||grad||_2`` per sample (a zero gradient: no move), ``x - x_nat`` scaled by
    ``min(1, eps/||x - x_nat||_2)``, then clamped to [0, 1].

    Args:
        x_adv, grad, x_nat: same shape (B, ...), floating dtype and device.
        eps, step_size: floats, 0-d tensors or per-sample [B] tensors; >= 0.
        clamp_box: ``False`` for the authors' variant, which clamps once after the loop.
        backend: ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` (on CPU only under
            ``TRITON_INTERPRET=1``) or ``"reference"``.
        check: the value checks (host syncs on CUDA); ``False`` skips them.
    """
    norm_, eps_t, step_t = _validate(x_adv, grad, x_nat, eps, step_size, norm, check)
    return _dispatch(x_adv, grad, x_nat, eps_t, step_t, norm_, clamp_box, backend)


def pgd_step_reference(x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, eps: Budget, step_size: Budget,
                       norm: Norm | str = "Linf", *, clamp_box: bool = True, check: bool = True) -> torch.Tensor:
    """Pure-PyTorch :func:`pgd_step` (the CPU path and the kernels' oracle); same arguments."""
    norm_, eps_t, step_t = _validate(x_adv, grad, x_nat, eps, step_size, norm, check)
    return _dispatch(x_adv, grad, x_nat, eps_t, step_t, norm_, clamp_box, Backend.REFERENCE)
