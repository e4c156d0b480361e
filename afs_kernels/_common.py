"""Shared helpers of ``afs_kernels``: the guarded Triton import, the behaviour enums, input validation and the
backend choice.

Everything here is cheap and import-safe: importing this module never touches a GPU and works where Triton
is not installed (then only the pure-PyTorch reference path exists).
"""

from __future__ import annotations

import contextlib
import math
from enum import Enum
from typing import Any, Callable, Union

import torch

# --------------------------------------------------------------------------------------------------------
# Guarded Triton import. Triton decides at *decoration* time whether a kernel is compiled or interpreted
# (TRITON_INTERPRET=1), so the variable must be set before ``afs_kernels`` is first imported.
# --------------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None  # type: ignore[assignment]

    class _TlStub:
        """Stands in for ``triton.language`` so kernel signatures (``BLOCK: tl.constexpr``) still parse."""

        constexpr = object

    tl = _TlStub()  # type: ignore[assignment]
    HAS_TRITON = False


def triton_jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """``triton.jit`` (bare or with options) where Triton exists; else the plain function, never launched."""
    if fn is None:
        return lambda f: triton_jit(f, **options)
    return triton.jit(fn, **options) if HAS_TRITON else fn


def launch_device(device: torch.device) -> Any:
    """The context a Triton launch must run in: ``torch.cuda.device(device)`` for a CUDA tensor's device, so
    the kernel starts on the GPU holding the data and not on the *current* device (under torchrun, or with
    tensors on ``cuda:1`` while ``cuda:0`` is current, the two differ); a no-op elsewhere (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was built by ``triton.jit`` under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


# --------------------------------------------------------------------------------------------------------
# Behaviour-choosing strings: str-Enums that accept either the enum or its value (case-insensitive).
# --------------------------------------------------------------------------------------------------------
class LenientStrEnum(str, Enum):
    """A ``str`` Enum whose constructor also accepts its values case-insensitively and lists them on error."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, str):
            for member in cls:
                if member.value.lower() == value.lower():
                    return member
        return None

    @classmethod
    def parse(cls, value: Any, what: str) -> Any:
        """``cls(value)`` with a ValueError naming ``what`` and the valid choices."""
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None

    def __str__(self) -> str:
        return str(self.value)


class Norm(LenientStrEnum):
    """Threat model of a PGD step / random start."""

    LINF = "Linf"  # ||delta||_inf <= eps, steps along sign(grad)
    L2 = "L2"  # ||delta||_2 <= eps per sample, steps along grad/||grad||_2


class Backend(LenientStrEnum):
    """Which implementation runs an op."""

    AUTO = "auto"  # Triton on CUDA tensors when Triton is importable, the reference otherwise
    TRITON = "triton"  # force the Triton kernel (on CPU only under TRITON_INTERPRET=1)
    REFERENCE = "reference"  # pure PyTorch


# Dtypes each path accepts. The Triton kernels compute in fp32 and write the input dtype.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Floor for vector norms: a zero gradient (or a zero perturbation) then gives a zero move, not 0/0 = NaN.
NORM_FLOOR = 1e-12

Budget = Union[float, int, torch.Tensor]


def choose_backend(backend: Any, tensor: torch.Tensor, kernel: Any) -> Backend:
    """Resolve ``backend`` to TRITON or REFERENCE for an op on ``tensor``; a forced, impossible Triton errors.

    ``kernel`` is one of the op's jitted kernels, used to tell whether Triton runs in interpreter mode.
    """
    choice = Backend.parse(backend, "backend")
    if choice is Backend.REFERENCE:
        return choice
    if choice is Backend.AUTO:
        # Auto never picks the interpreter (a test tool, orders of magnitude slower than torch on CPU), and
        # takes the reference for dtypes without a kernel (fp64): same results, only the speed differs.
        fast = HAS_TRITON and tensor.is_cuda and tensor.dtype in TRITON_DTYPES and not is_interpreted(kernel)
        return Backend.TRITON if fast else Backend.REFERENCE
    if not HAS_TRITON:
        raise ValueError(
            "backend='triton' was requested but triton is not importable; use backend='auto' or 'reference'"
        )
    if tensor.is_cuda:
        if is_interpreted(kernel):
            raise ValueError(
                "backend='triton' on CUDA tensors, but TRITON_INTERPRET=1 was set when afs_kernels was imported "
                "(the interpreter runs on CPU tensors); unset it or move the tensors to the CPU"
            )
        return choice
    if tensor.device.type == "cpu" and is_interpreted(kernel):
        return choice
    raise ValueError(
        f"backend='triton' needs CUDA tensors (got device {tensor.device}); on CPU it runs only under "
        "TRITON_INTERPRET=1 set before afs_kernels is imported"
    )


def check_tensor(x: Any, name: str) -> torch.Tensor:
    """A floating-point tensor with a leading batch dimension, else TypeError/ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {x.dtype}; supported: {list(REFERENCE_DTYPES)}")
    if x.dim() < 1:
        raise ValueError(f"{name} needs a leading batch dimension, got a 0-d tensor")
    return x


def check_same(ref: torch.Tensor, ref_name: str, other: Any, name: str) -> torch.Tensor:
    """``other`` is a tensor of the same shape, dtype and device as ``ref``, else an error naming both."""
    check_tensor(other, name)
    if other.shape != ref.shape:
        raise ValueError(f"shape mismatch: {name} has shape {tuple(other.shape)}, {ref_name} {tuple(ref.shape)}")
    if other.dtype != ref.dtype:
        raise TypeError(f"dtype mismatch: {name} is {other.dtype}, {ref_name} is {ref.dtype}")
    if other.device != ref.device:
        raise ValueError(f"device mismatch: {name} is on {other.device}, {ref_name} on {ref.device}")
    return other


def as_budget(value: Any, name: str, batch: int, device: torch.device, *, check: bool) -> torch.Tensor:
    """Normalise a budget (eps or step size) to an fp32 tensor on ``device`` of shape [] or [batch].

    Accepts a Python number, a 0-d tensor or a per-sample tensor of shape [batch]. With ``check=True`` the
    values are checked to be finite and >= 0; for tensors that costs one reduction and, on CUDA, a host sync,
    which is why hot loops validate once and then pass ``check=False``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float, a 0-d tensor or a tensor of shape [B]; got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        v = float(value)
        if check and not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
        return torch.full((), v, dtype=torch.float32, device=device)
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
    if value.dim() == 1 and value.shape[0] == 1 and batch != 1:
        value = value.reshape(())  # a 1-element tensor is a scalar budget
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        raise ValueError(f"per-sample {name} must have shape [B]=[{batch}], got {tuple(value.shape)}")
    # A CPU 0-d/[B] budget is moved to the data's device (a tiny copy); values and meaning are unchanged.
    t = value.detach().to(device=device, dtype=torch.float32)
    if check and t.numel() > 0:
        bad = ~torch.isfinite(t) | (t < 0)
        if bool(bad.any()):
            raise ValueError(f"{name} must be finite and >= 0, got min {t.min().item()} (nonfinite or negative values)")
    return t


def check_finite(x: torch.Tensor, name: str) -> None:
    """ValueError if ``x`` holds NaN or Inf (one reduction; a host sync on CUDA)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf)")


def per_sample_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a [] or [B] budget so it broadcasts over a (B, ...) tensor of ``ndim`` dims."""
    return t.reshape(t.shape + (1,) * (ndim - t.dim())) if t.dim() == 1 else t


def flat_views(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Flat 1-D buffers of same-shaped tensors for an elementwise/per-sample kernel, plus the output.

    Returns ``(flats, out, out_flat)``. The kernels index each sample's elements as one contiguous span of
    ``numel // B`` elements; that holds for row-major tensors and for channels_last 4-D tensors (batch is
    the outermost dimension in both), so those are used in place and the output keeps their memory format.
    Anything else (a transposed/strided view, mixed layouts) is copied to row-major first.
    """
    first = tensors[0]
    if all(t.is_contiguous() for t in tensors):
        out = torch.empty_like(first, memory_format=torch.contiguous_format)
        return [t.view(-1) for t in tensors], out, out.view(-1)
    if first.dim() == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        # NHWC in memory: permuting to (N, H, W, C) gives a row-major view of the same storage.
        out = torch.empty_like(first, memory_format=torch.channels_last)
        return [t.permute(0, 2, 3, 1).reshape(-1) for t in tensors], out, out.permute(0, 2, 3, 1).reshape(-1)
    flats = [t.contiguous().view(-1) for t in tensors]
    out = torch.empty_like(first, memory_format=torch.contiguous_format)
    return flats, out, out.view(-1)
