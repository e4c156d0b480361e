"""Shared pieces of ``afs_kernels``: the guarded Triton import, the enums, metadata checks, budgets, layouts.

Import-safe: importing this never touches a GPU and works where Triton is missing (then only the
pure-PyTorch references exist).
"""

from __future__ import annotations

import contextlib
import math
from enum import Enum
from typing import Any, Callable, Union

import torch

# Triton decides at *decoration* time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1),
# so the variable must be set before ``afs_kernels`` is first imported.
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - only where triton is absent
    triton = None  # type: ignore[assignment]

    class _TlStub:  # stands in for triton.language so signatures like `BLOCK: tl.constexpr` still parse
        constexpr = object

    tl = _TlStub()  # type: ignore[assignment]
    HAS_TRITON = False


def triton_jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """``triton.jit`` (bare or with options) where Triton exists; else the plain function, never launched."""
    if fn is None:
        return lambda f: triton_jit(f, **options)
    return triton.jit(fn, **options) if HAS_TRITON else fn


def launch_device(device: torch.device) -> Any:
    """``torch.cuda.device(device)`` for a CUDA tensor's device, a no-op elsewhere.

    A Triton launch starts on the *current* GPU; under torchrun, or with data on ``cuda:1`` while
    ``cuda:0`` is current, that is not the GPU holding the data.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was built by ``triton.jit`` under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


class Choice(str, Enum):
    """The project's str-Enum base: accepts a member or its value, case-insensitively (RobustBench style)."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, str):
            for member in cls:
                if member.value.lower() == value.lower():
                    return member
        return None

    @classmethod
    def parse(cls, value: Any, what: str) -> Any:
        """``cls(value)``, with a ValueError naming ``what`` and listing the valid choices."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(repr(m.value) for m in cls)}") from None

    def __str__(self) -> str:
        return str(self.value)


class Norm(Choice):
    """Threat model of a PGD step / random start."""

    LINF = "Linf"  # ||delta||_inf <= eps, steps along sign(grad)
    L2 = "L2"  # ||delta||_2 <= eps per sample, steps along grad/||grad||_2


class Backend(Choice):
    """Which implementation runs an op."""

    AUTO = "auto"  # Triton on CUDA tensors when Triton is importable, the reference otherwise
    TRITON = "triton"  # force the Triton kernel (on CPU only under TRITON_INTERPRET=1)
    REFERENCE = "reference"  # pure PyTorch


# The Triton kernels compute in fp32 and write the input dtype; the references also take fp64.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)
# Floor for vector norms: a zero gradient (or perturbation) gives a zero move, not 0/0 = NaN.
NORM_FLOOR = 1e-12
Budget = Union[float, int, torch.Tensor]


def choose_backend(backend: Any, tensor: torch.Tensor, kernel: Any) -> Backend:
    """Resolve ``backend`` to TRITON or REFERENCE for ``tensor``; a forced, impossible Triton is an error.

    ``kernel`` is one of the op's jitted kernels: it tells whether Triton runs as the interpreter.
    """
    choice = Backend.parse(backend, "backend")
    if choice is Backend.AUTO:
        # Never the interpreter (a test tool, far slower than torch), and the reference for fp64.
        fast = HAS_TRITON and tensor.is_cuda and tensor.dtype in TRITON_DTYPES and not is_interpreted(kernel)
        return Backend.TRITON if fast else Backend.REFERENCE
    if choice is Backend.REFERENCE:
        return choice
    if not HAS_TRITON:
        raise ValueError("backend='triton' was requested but triton is not importable; use backend='auto' or 'reference'")
    if tensor.is_cuda and is_interpreted(kernel):
        raise ValueError("backend='triton' on CUDA tensors, but TRITON_INTERPRET=1 was set when afs_kernels was "
                         "imported (the interpreter runs on CPU tensors); unset it or move the tensors to the CPU")
    if tensor.is_cuda or (tensor.device.type == "cpu" and is_interpreted(kernel)):
        return choice
    raise ValueError(f"backend='triton' needs CUDA tensors (got device {tensor.device}); on CPU it runs only under "
                     "TRITON_INTERPRET=1 set before afs_kernels is imported")


def check_tensor(x: Any, name: str) -> torch.Tensor:
    """A floating tensor with a leading batch dimension, else a TypeError/ValueError naming ``name``."""
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
    """``other`` is a tensor of ``ref``'s shape, dtype and device, else an error naming both."""
    check_tensor(other, name)
    if other.shape != ref.shape:
        raise ValueError(f"shape mismatch: {name} has shape {tuple(other.shape)}, {ref_name} {tuple(ref.shape)}")
    if other.dtype != ref.dtype:
        raise TypeError(f"dtype mismatch: {name} is {other.dtype}, {ref_name} is {ref.dtype}")
    if other.device != ref.device:
        raise ValueError(f"device mismatch: {name} is on {other.device}, {ref_name} on {ref.device}")
    return other


def check_box(x: torch.Tensor, name: str) -> None:
    """ValueError unless ``x`` lies in the [0, 1] pixel box (one reduction; a host sync on CUDA)."""
    if x.numel() > 0:
        lo, hi = torch.aminmax(x.detach())
        if bool(lo < 0) or bool(hi > 1):
            raise ValueError(f"{name} must lie in the [0, 1] pixel box, got values in [{lo.item()}, {hi.item()}]")


def as_budget(value: Any, name: str, batch: int, device: torch.device, *, check: bool) -> torch.Tensor:
    """A budget (eps or step size: a number, a 0-d tensor or a per-sample [batch] tensor) as an fp32 tensor
    of shape [] or [batch] on ``device``. ``check=True`` adds the value check (finite, >= 0), which for a
    tensor costs a reduction and, on CUDA, a host sync: hot loops check once, then pass ``check=False``."""
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
    t = value.detach().to(device=device, dtype=torch.float32)  # a CPU budget moves to the data (tiny copy)
    if check and t.numel() > 0 and bool((~torch.isfinite(t) | (t < 0)).any()):
        raise ValueError(f"{name} must be finite and >= 0, got min {t.min().item()} (nonfinite or negative values)")
    return t


def per_sample_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A [] or [B] budget viewed as (B, 1, ..., 1) so it broadcasts over a (B, ...) tensor of ``ndim`` dims."""
    return t.reshape(t.shape + (1,) * (ndim - t.dim())) if t.dim() == 1 else t


def flat_views(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Flat 1-D buffers of same-shaped tensors for a per-sample kernel, plus ``(out, out_flat)``.

    The kernels read sample b as one contiguous span of ``numel // B`` elements. That holds for row-major
    and for channels_last 4-D tensors (batch outermost in both), so those are used in place and the output
    keeps their format; anything else (a transposed or strided view, mixed layouts) is copied first.
    """
    first = tensors[0]
    if first.dim() == 4 and not first.is_contiguous() and all(
            t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        # NHWC in memory: permuting to (N, H, W, C) is a row-major view of the same storage.
        out = torch.empty_like(first, memory_format=torch.channels_last)
        return [t.permute(0, 2, 3, 1).reshape(-1) for t in tensors], out, out.permute(0, 2, 3, 1).reshape(-1)
    out = torch.empty_like(first, memory_format=torch.contiguous_format)
    return [t.contiguous().view(-1) for t in tensors], out, out.view(-1)
