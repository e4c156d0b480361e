"""Random start of PGD: a point drawn uniformly inside the eps-ball around ``x_nat``, clamped to [0, 1].

Reads top to bottom: private Triton kernels (the math above each) -> host launcher -> public
``random_start`` -> pure-PyTorch ``random_start_reference``.

The Triton kernels draw their numbers in-kernel with Triton's counter-based Philox RNG: element ``i``
of the batch uses counter ``i`` under one 64-bit seed, so a seed fixes the result without any RNG state
living on the device, and no noise tensor is ever written to memory. The two backends use different
generators: they agree in distribution, not in values.

Clamping keeps the point inside the ball: with ``x_nat`` in [0, 1], clamping a coordinate to the box
only moves it towards ``x_nat``, so ``|delta_i|`` (and hence any norm of delta) can only shrink.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (
    NORM_FLOOR,
    launch_device,
    TRITON_DTYPES,
    Backend,
    Budget,
    Norm,
    as_budget,
    check_tensor,
    choose_backend,
    flat_views,
    per_sample_view,
    tl,
    triton,
    triton_jit,
)

_LINF_BLOCK = 1024
_L2_MAX_BLOCK = 1024
# Seeds drawn from a torch generator stay below 2**31 so Triton keeps one int32 kernel signature.
_SEED_HIGH = 2**31 - 1


# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------
# L-inf, elementwise over all B*D elements (b = sample index of element i):
#   u_i = U[0,1)(seed, counter i)
#   x'_i = clamp(x0_i + eps[b] * (2 u_i - 1), 0, 1)
@triton_jit(do_not_specialize=["seed"])
def _random_start_linf_kernel(
    x0_ptr,
    out_ptr,
    eps_ptr,
    seed,
    n_elements,
    per_sample,
    eps_stride,
    BLOCK: tl.constexpr,
):
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
def _random_start_l2_kernel(
    x0_ptr,
    out_ptr,
    eps_ptr,
    seed,
    n_elements,
    per_sample,
    eps_stride,
    inv_dim,
    floor,
    BLOCK: tl.constexpr,
):
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


# --------------------------------------------------------------------------------------------------------
# Host launcher
# --------------------------------------------------------------------------------------------------------
def _launch_random_start(x_nat: torch.Tensor, eps: torch.Tensor, norm: Norm, seed: int) -> torch.Tensor:
    """Run the Triton kernel of ``norm``. ``eps``: fp32 [] or [B] on the data's device."""
    if x_nat.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"the Triton random start supports {list(TRITON_DTYPES)}, got {x_nat.dtype}; use backend='reference'"
        )
    (x0,), out, out_flat = flat_views(x_nat)
    n = x0.numel()
    if n == 0:
        return out
    batch = x_nat.shape[0]
    per_sample = n // batch
    eps_stride = 1 if eps.dim() == 1 else 0
    eps = eps.contiguous()
    with launch_device(x_nat.device):  # on the data's GPU, not the current one
        if norm is Norm.LINF:
            grid = (triton.cdiv(n, _LINF_BLOCK),)
            _random_start_linf_kernel[grid](x0, out_flat, eps, seed, n, per_sample, eps_stride, BLOCK=_LINF_BLOCK)
        else:
            # A power of two between 16 and 1024: CIFAR's 3072 values per sample take three loop trips.
            block = max(16, min(triton.next_power_of_2(per_sample), _L2_MAX_BLOCK))
            _random_start_l2_kernel[(batch,)](
                x0, out_flat, eps, seed, n, per_sample, eps_stride, 1.0 / per_sample, NORM_FLOOR,
                BLOCK=block, num_warps=4,
            )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------------
# Validation and seeding
# --------------------------------------------------------------------------------------------------------
def _validate(x_nat: Any, eps: Budget, norm: Any, generator: Any, seed: Any, check: bool) -> tuple[Norm, torch.Tensor]:
    """Check inputs; return the norm and eps as fp32 [] or [B]. ``check`` adds value checks (host syncs)."""
    norm = Norm.parse(norm, "norm")
    check_tensor(x_nat, "x_nat")
    eps_t = as_budget(eps, "eps", x_nat.shape[0], x_nat.device, check=check)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and seed is not None:
        raise ValueError("give either generator or seed, not both")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if check and x_nat.numel() > 0:
        lo, hi = torch.aminmax(x_nat)
        if bool(lo < 0) or bool(hi > 1):
            raise ValueError(f"x_nat must lie in the [0, 1] pixel box, got values in [{lo.item()}, {hi.item()}]")
    return norm, eps_t


def _kernel_seed(generator: torch.Generator | None, seed: int | None) -> int:
    """The Philox seed: ``seed`` if given, else one draw from ``generator`` or torch's default CPU generator.

    Drawing on the CPU generator costs no device sync; ``torch.manual_seed`` seeds it, so runs repeat.
    """
    if seed is not None:
        return seed
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=device).item())


def _reference_generator(
    x_nat: torch.Tensor, generator: torch.Generator | None, seed: int | None
) -> torch.Generator | None:
    """The torch generator the reference draws from (a fresh one on ``x_nat``'s device for ``seed``)."""
    if seed is not None:
        return torch.Generator(device=x_nat.device).manual_seed(seed)
    if generator is not None and generator.device.type != x_nat.device.type:
        raise ValueError(f"device mismatch: generator is on {generator.device}, x_nat on {x_nat.device}")
    return generator


def random_start_math(
    x_nat: torch.Tensor, eps: torch.Tensor, norm: Norm, generator: torch.Generator | None
) -> torch.Tensor:
    """The random start in plain torch ops (no validation). ``eps``: fp32 [] or [B]. Returns x_nat's dtype."""
    dtype, device = x_nat.dtype, x_nat.device
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x0 = x_nat.to(compute)
    eps_c = eps.to(compute)
    if norm is Norm.LINF:
        u = torch.rand(x0.shape, generator=generator, device=device, dtype=compute)
        x = x0 + per_sample_view(eps_c, x0.dim()) * (2.0 * u - 1.0)
    else:
        batch = x0.shape[0]
        dim = max(x0[0].numel(), 1)
        z = torch.randn(x0.shape, generator=generator, device=device, dtype=compute)
        zn = torch.linalg.vector_norm(z.reshape(batch, -1), dim=1).clamp_min(NORM_FLOOR)  # (B,)
        u = torch.rand(batch, generator=generator, device=device, dtype=compute)
        radius = eps_c * u.pow(1.0 / dim)  # (B,): density ~ r^(D-1), i.e. uniform in the ball's volume
        x = x0 + z * per_sample_view(radius / zn, x0.dim())
    return x.clamp(0.0, 1.0).to(dtype)


# --------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------
def random_start(
    x_nat: torch.Tensor,
    eps: Budget,
    norm: Norm | str = "Linf",
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    backend: Backend | str = "auto",
    check: bool = True,
) -> torch.Tensor:
    """A point uniform in the eps-ball around ``x_nat`` (L-inf: ``x + U(-eps, eps)``; L2: uniform in the
    ball), clamped to [0, 1]. Same dtype and shape as ``x_nat``.

    Args:
        x_nat: (B, ...) floating tensor in [0, 1].
        eps: Python float, 0-d tensor or per-sample tensor of shape [B]; >= 0.
        norm: ``"Linf"`` or ``"L2"``.
        generator: the torch generator to draw from (the Triton path draws one seed from it).
        seed: an explicit seed instead of ``generator`` (the reference then seeds a fresh generator).
            With neither, torch's default generator is used, so ``torch.manual_seed`` makes runs repeat.
        backend: ``"auto"``, ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``) or ``"reference"``.
        check: validate values (eps >= 0 and finite, x_nat inside [0, 1]); a host sync on CUDA.
    """
    norm_, eps_t = _validate(x_nat, eps, norm, generator, seed, check)
    if choose_backend(backend, x_nat, _random_start_linf_kernel) is Backend.TRITON:
        return _launch_random_start(x_nat, eps_t, norm_, _kernel_seed(generator, seed))
    with torch.no_grad():
        return random_start_math(x_nat, eps_t, norm_, _reference_generator(x_nat, generator, seed))


def random_start_reference(
    x_nat: torch.Tensor,
    eps: Budget,
    norm: Norm | str = "Linf",
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Pure-PyTorch :func:`random_start` drawing from torch's RNG (``generator``, ``seed`` or the default)."""
    norm_, eps_t = _validate(x_nat, eps, norm, generator, seed, check)
    with torch.no_grad():
        return random_start_math(x_nat, eps_t, norm_, _reference_generator(x_nat, generator, seed))
