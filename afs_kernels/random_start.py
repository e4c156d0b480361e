"""PGD's random start (Eq. 4's x^0): a point uniform in the L-inf eps-ball around ``x_nat``, clamped to [0, 1].

Top to bottom: the Triton kernel (its math above it) -> host launcher -> the torch math -> public
``random_start`` and its pure-PyTorch ``random_start_reference``.

The kernel draws in-kernel with Triton's counter-based Philox RNG: element ``i`` uses counter ``i`` under one
seed, so a seed fixes the result with no RNG state on the device and no noise tensor in memory. The two
backends use different generators: they agree in distribution, not in values. Clamping keeps the point inside
the ball: with ``x_nat`` in [0, 1] it only moves a coordinate towards it.
"""

from __future__ import annotations

import torch

from ._common import (BLOCK, Backend, Budget, Norm, as_budget, check_box, check_tensor, choose_backend,
                      elementwise_args, launch_device, per_sample_view, tl, triton_jit)

# Seeds drawn from a torch generator stay below 2**31 so Triton keeps one int32 kernel signature.
_SEED_HIGH = 2**31 - 1


# Elementwise over all B*D elements (b = sample index of element i):
#   u_i = U[0,1)(seed, counter i)
#   x'_i = clamp(x0_i + eps[b] * (2 u_i - 1), 0, 1)
@triton_jit(do_not_specialize=["seed"])
def _random_start_linf_kernel(x0_ptr, out_ptr, eps_ptr, n_elements, per_sample, eps_stride, seed,
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


def _launch(x_nat: torch.Tensor, eps: torch.Tensor, seed: int) -> torch.Tensor:
    out, args, grid = elementwise_args("random start", (x_nat,), (eps,))
    if out.numel() > 0:
        with launch_device(x_nat.device):  # on the data's GPU, not the current one
            _random_start_linf_kernel[grid](*args, seed, BLOCK=BLOCK)
    return out


def _math(x_nat: torch.Tensor, eps: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The start in plain torch ops (no validation). ``eps``: fp32 [] or [B]. Returns x_nat's dtype."""
    compute = torch.float64 if x_nat.dtype == torch.float64 else torch.float32
    x0 = x_nat.to(compute)
    u = torch.rand(x0.shape, generator=generator, device=x_nat.device, dtype=compute)
    x = x0 + per_sample_view(eps.to(compute), x0.dim()) * (2.0 * u - 1.0)  # U(-eps, eps) per coordinate
    return x.clamp(0.0, 1.0).to(x_nat.dtype)


def random_start(x_nat: torch.Tensor, eps: Budget, norm: Norm | str = "Linf", generator: torch.Generator | None = None,
                 *, seed: int | None = None, backend: Backend | str = "auto", check: bool = True) -> torch.Tensor:
    """``clamp(x_nat + U(-eps, eps), 0, 1)``, same dtype and shape as ``x_nat``.

    Args:
        x_nat: (B, ...) floating tensor in [0, 1]. eps: a float, 0-d or per-sample [B] tensor; >= 0.
        norm: ``"Linf"``, the one threat model (kept for callers that name it).
        generator: the torch generator to draw from (the Triton path draws its seed from it).
        seed: an explicit seed instead (the reference seeds a fresh generator with it). With neither,
            torch's default generator: ``torch.manual_seed`` makes runs repeat.
        backend: ``"auto"``, ``"triton"`` (on CPU only under ``TRITON_INTERPRET=1``) or ``"reference"``.
        check: the value checks (eps >= 0 and finite, x_nat in [0, 1]; host syncs on CUDA); metadata is
            always checked.
    """
    Norm.parse(norm, "norm")
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
    if choose_backend(backend, x_nat, _random_start_linf_kernel) is Backend.TRITON:
        if seed is None:  # one draw from the generator (or torch's default CPU one: no device sync)
            dev = generator.device if generator is not None else torch.device("cpu")
            seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=dev).item())
        return _launch(x_nat, eps_t, seed)
    if seed is not None:
        generator = torch.Generator(device=x_nat.device).manual_seed(seed)
    elif generator is not None and generator.device.type != x_nat.device.type:
        raise ValueError(f"device mismatch: generator is on {generator.device}, x_nat on {x_nat.device}")
    with torch.no_grad():
        return _math(x_nat, eps_t, generator)


def random_start_reference(x_nat: torch.Tensor, eps: Budget, norm: Norm | str = "Linf",
                           generator: torch.Generator | None = None, *, seed: int | None = None,
                           check: bool = True) -> torch.Tensor:
    """Pure-PyTorch :func:`random_start`, drawing from torch's RNG (``generator``, ``seed`` or the default)."""
    return random_start(x_nat, eps, norm, generator, seed=seed, backend=Backend.REFERENCE, check=check)
