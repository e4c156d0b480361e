"""PGD's random start: a point uniform in the eps-ball around ``x_nat``, clamped to [0, 1].

Top to bottom: Triton kernels (their math above each) -> host launcher -> the torch math -> public
``random_start`` and its pure-PyTorch ``random_start_reference``.

The kernels draw in-kernel with Triton's counter-based Philox RNG: element ``i`` uses counter ``i`` under
one 64-bit seed, so a seed fixes the result with no RNG state on the device and no noise tensor in
memory. The two backends use different generators: they agree in distribution, not in values.
Clamping keeps the point inside the ball: with ``x_nat`` in [0, 1] it only moves a coordinate towards it.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (NORM_FLOOR, TRITON_DTYPES, Backend, Budget, Norm, as_budget, check_box, check_tensor,
                      choose_backend, flat_views, launch_device, per_sample_view, tl, triton, triton_jit)

_LINF_BLOCK = 1024
_L2_MAX_BLOCK = 1024
# Seeds drawn from a torch generator stay below 2**31 so Triton keeps one int32 kernel signature.
_SEED_HIGH = 2**31 - 1


# L-inf, elementwise over all B*D elements (b = sample index of element i):
#   u_i = U[0,1)(seed, counter i)
#   x'_i = clamp(x0_i + eps[b] * (2 u_i - 1), 0, 1)
@triton_jit(do_not_specialize=["seed"])
def _random_start_linf_kernel(x0_ptr, out_ptr, eps_ptr, seed, n_elements, per_sample, eps_stride,
                              BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    b = offs // per_sample
    eps = tl.load(eps_ptr + b * eps_stride, mask=mask, other=0.0)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.rand(seed, offs)
    x = x0 + eps * (2.0 * u - 1.0)
    x = tl.minimum(tl.maximum(x, 0.0), 1.0)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


# L2, one program per sample b over its D elements (uniform in the D-dimensional ball):
#   z_i = N(0,1)(seed, counter b*D + i)           # isotropic direction z / ||z||
#   r   = eps[b] * u^(1/D),  u = U[0,1)(seed, counter B*D + b)   # radius with density ~ r^(D-1)
#   x'  = clamp(x0 + z * r / ||z||, 0, 1)
# Sweep 1 sums z^2; sweep 2 regenerates the same z (counter-based, so no buffer) and writes.
@triton_jit(do_not_specialize=["seed"])
def _random_start_l2_kernel(x0_ptr, out_ptr, eps_ptr, seed, n_elements, per_sample, eps_stride, inv_dim, floor,
                            BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * per_sample
    eps = tl.load(eps_ptr + b * eps_stride)

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, per_sample, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < per_sample
        z = tl.randn(seed, base + offs)
        acc += tl.where(m, z * z, 0.0)
    znorm = tl.maximum(tl.sqrt_rn(tl.sum(acc, axis=0)), floor)
    u = tl.rand(seed, n_elements + b)  # a counter past every element's: independent of z
    radius = eps * tl.exp(tl.log(u) * inv_dim)  # u^(1/D); u = 0 gives exp(-inf) = 0
    coef = radius / znorm

    for start in range(0, per_sample, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < per_sample
        z = tl.randn(seed, base + offs)
        x0 = tl.load(x0_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.minimum(tl.maximum(x0 + z * coef, 0.0), 1.0)
        tl.store(out_ptr + base + offs, x.to(out_ptr.dtype.element_ty), mask=m)


def _launch(x_nat: torch.Tensor, eps: torch.Tensor, norm: Norm, seed: int) -> torch.Tensor:
    """Run the Triton kernel of ``norm``. ``eps``: fp32 [] or [B] on the data's device."""
    if x_nat.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton random start supports {list(TRITON_DTYPES)}, got {x_nat.dtype}; "
                        "use backend='reference'")
    (x0,), out, out_flat = flat_views(x_nat)
    n = x0.numel()
    if n == 0:
        return out
    batch = x_nat.shape[0]
    per_sample, eps_stride = n // batch, int(eps.dim() == 1)
    eps = eps.contiguous()
    with launch_device(x_nat.device):  # on the data's GPU, not the current one
        if norm is Norm.LINF:
            _random_start_linf_kernel[(triton.cdiv(n, _LINF_BLOCK),)](x0, out_flat, eps, seed, n, per_sample,
                                                                      eps_stride, BLOCK=_LINF_BLOCK)
        else:
            block = max(16, min(triton.next_power_of_2(per_sample), _L2_MAX_BLOCK))  # as in pgd_step
            _random_start_l2_kernel[(batch,)](x0, out_flat, eps, seed, n, per_sample, eps_stride, 1.0 / per_sample,
                                              NORM_FLOOR, BLOCK=block, num_warps=4)
    return out


def _math(x_nat: torch.Tensor, eps: torch.Tensor, norm: Norm, generator: torch.Generator | None) -> torch.Tensor:
    """The start in plain torch ops (no validation). ``eps``: fp32 [] or [B]. Returns x_nat's dtype."""
    dtype, device = x_nat.dtype, x_nat.device
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x0, eps_c = x_nat.to(compute), eps.to(compute)
    if norm is Norm.LINF:
        u = torch.rand(x0.shape, generator=generator, device=device, dtype=compute)
        x = x0 + per_sample_view(eps_c, x0.dim()) * (2.0 * u - 1.0)  # U(-eps, eps) per coordinate
    else:
        batch, dim = x0.shape[0], max(x0[0].numel(), 1)
        z = torch.randn(x0.shape, generator=generator, device=device, dtype=compute)
        zn = torch.linalg.vector_norm(z.reshape(batch, -1), dim=1).clamp_min(NORM_FLOOR)  # (B,)
        u = torch.rand(batch, generator=generator, device=device, dtype=compute)
        radius = eps_c * u.pow(1.0 / dim)  # (B,): density ~ r^(D-1), i.e. uniform in the ball's volume
        x = x0 + z * per_sample_view(radius / zn, x0.dim())
    return x.clamp(0.0, 1.0).to(dtype)


def _validate(x_nat: Any, eps: Budget, norm: Any, generator: Any, seed: Any, check: bool) -> tuple[Norm, torch.Tensor]:
    """Metadata checks always; ``check`` adds the value checks (eps, x_nat in the box; host syncs)."""
    norm = Norm.parse(norm, "norm")
    check_tensor(x_nat, "x_nat")
    eps_t = as_budget(eps, "eps", x_nat.shape[0], x_nat.device, check=check)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and seed is not None:
        raise ValueError("give either generator or seed, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if check:
        check_box(x_nat, "x_nat")
    return norm, eps_t


def _run(x_nat: torch.Tensor, eps: torch.Tensor, norm: Norm, generator: torch.Generator | None, seed: int | None,
         backend: Any) -> torch.Tensor:
    if choose_backend(backend, x_nat, _random_start_linf_kernel) is Backend.TRITON:
        if seed is None:  # one draw from the generator (or torch's default CPU one: no device sync)
            dev = generator.device if generator is not None else torch.device("cpu")
            seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=dev).item())
        return _launch(x_nat, eps, norm, seed)
    if seed is not None:
        generator = torch.Generator(device=x_nat.device).manual_seed(seed)
    elif generator is not None and generator.device.type != x_nat.device.type:
        raise ValueError(f"device mismatch: generator is on {generator.device}, x_nat on {x_nat.device}")
    with torch.no_grad():
        return _math(x_nat, eps, norm, generator)


def random_start(x_nat: torch.Tensor, eps: Budget, norm: Norm | str = "Linf", generator: torch.Generator | None = None,
                 *, seed: int | None = None, backend: Backend | str = "auto", check: bool = True) -> torch.Tensor:
    """A point uniform in the eps-ball around ``x_nat`` (L-inf: ``x + U(-eps, eps)``; L2: uniform in the
    ball), clamped to [0, 1]; same dtype and shape as ``x_nat``.

    Args:
        x_nat: (B, ...) floating tensor in [0, 1]. eps: a float, 0-d or per-sample [B] tensor; >= 0.
        generator: the torch generator to draw from (the Triton path draws its seed from it).
        seed: an explicit seed instead (the reference seeds a fresh generator with it). With neither,
            torch's default generator: ``torch.manual_seed`` makes runs repeat.
        backend: ``"auto"``, ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``) or ``"reference"``.
        check: the value checks (eps >= 0 and finite, x_nat in [0, 1]); host syncs on CUDA.
    """
    norm_, eps_t = _validate(x_nat, eps, norm, generator, seed, check)
    return _run(x_nat, eps_t, norm_, generator, seed, backend)


def random_start_reference(x_nat: torch.Tensor, eps: Budget, norm: Norm | str = "Linf",
                           generator: torch.Generator | None = None, *, seed: int | None = None,
                           check: bool = True) -> torch.Tensor:
    """Pure-PyTorch :func:`random_start`, drawing from torch's RNG (``generator``, ``seed`` or the default)."""
    norm_, eps_t = _validate(x_nat, eps, norm, generator, seed, check)
    return _run(x_nat, eps_t, norm_, generator, seed, Backend.REFERENCE)
