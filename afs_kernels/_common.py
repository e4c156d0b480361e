"""Shared pieces of ``afs_kernels``: the guarded Triton import, the enums, the input checks, the launch helpers.

Import-safe: importing this never touches a GPU and works where Triton is missing (then only the
pure-PyTorch references exist).
"""

from __future__ import annotations

import contextlib
import math
from enum import Enum
from typing import Any, Callable, Sequence, Union

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

# The Triton kernels compute in fp32 and write the input dtype; the references also take fp64.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)
BLOCK = 1024  # elements per program of the elementwise kernels (PGD step, random start)
Budget = Union[float, int, torch.Tensor]  # eps / step size: a number, a 0-d or a per-sample [B] tensor


def triton_jit(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """``triton.jit`` (bare or with options) where Triton exists; else the plain function, never launched."""
    if fn is None:
        return lambda f: triton_jit(f, **options)
    return triton.jit(fn, **options) if HAS_TRITON else fn


def launch_device(device: torch.device) -> Any:
    """``torch.cuda.device(device)`` for a CUDA tensor's device, a no-op elsewhere: a Triton launch starts on
    the *current* GPU, which under torchrun (or with data on ``cuda:1``) is not the one holding the data."""
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
    """Threat model: the paper's L-inf, the one the kernels implement."""

    LINF = "Linf"  # ||delta||_inf <= eps, steps along sign(grad)


class Backend(Choice):
    """Which implementation runs an op."""

    AUTO = "auto"  # Triton on CUDA tensors when Triton is importable, the reference otherwise
    TRITON = "triton"  # force the Triton kernel (on CPU only under TRITON_INTERPRET=1)
    REFERENCE = "reference"  # pure PyTorch


def choose_backend(backend: Any, tensor: torch.Tensor, kernel: Any) -> Backend:
    """Resolve ``backend`` to TRITON or REFERENCE for ``tensor``; a forced, impossible Triton is an error.
    ``kernel`` is one of the op's jitted kernels: it tells whether Triton runs as the interpreter."""
    choice = Backend.parse(backend, "backend")
    interpreted = is_interpreted(kernel)  # False without Triton
    compiled = HAS_TRITON and not interpreted
    if choice is Backend.AUTO:
        # Never the interpreter (a test tool, far slower than torch), and the reference for fp64.
        return Backend.TRITON if compiled and tensor.is_cuda and tensor.dtype in TRITON_DTYPES else Backend.REFERENCE
    if choice is Backend.REFERENCE or (tensor.is_cuda and compiled) or (tensor.device.type == "cpu" and interpreted):
        return choice
    raise ValueError(f"backend='triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 set before "
                     f"afs_kernels is imported; got device {tensor.device} with triton "
                     f"{'is not importable' if not HAS_TRITON else 'interpreted' if interpreted else 'compiled'}")


def check_tensor(x: Any, name: str, like: torch.Tensor | None = None, like_name: str = "") -> torch.Tensor:
    """A floating tensor with a leading batch dimension (and ``like``'s shape, dtype and device, if given),
    else a TypeError/ValueError naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {x.dtype}; supported: {list(REFERENCE_DTYPES)}")
    if x.dim() < 1:
        raise ValueError(f"{name} needs a leading batch dimension, got a 0-d tensor")
    if like is not None:
        if x.shape != like.shape:
            raise ValueError(f"shape mismatch: {name} has shape {tuple(x.shape)}, {like_name} {tuple(like.shape)}")
        if x.dtype != like.dtype:
            raise TypeError(f"dtype mismatch: {name} is {x.dtype}, {like_name} is {like.dtype}")
        if x.device != like.device:
            raise ValueError(f"device mismatch: {name} is on {x.device}, {like_name} on {like.device}")
    return x


def check_box(x: torch.Tensor, name: str) -> None:
    """ValueError unless ``x`` lies in the [0, 1] pixel box (one reduction; a host sync on CUDA)."""
    if x.numel() > 0:
        lo, hi = torch.aminmax(x.detach())
        if bool(lo < 0) or bool(hi > 1):
            raise ValueError(f"{name} must lie in the [0, 1] pixel box, got values in [{lo.item()}, {hi.item()}]")


def as_budget(value: Any, name: str, batch: int, device: torch.device, *, check: bool) -> torch.Tensor:
    """A budget as an fp32 tensor of shape [] or [batch] on ``device``. ``check=True`` adds the value check
    (finite, >= 0), for a tensor a reduction and a host sync on CUDA: hot loops check once, then pass False."""
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


def elementwise_args(op: str, tensors: Sequence[torch.Tensor],
                     budgets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[Any], tuple[int]]:
    """``(out, args, grid)`` for an elementwise kernel taking ``(*tensors, out, *budgets, n_elements,
    per_sample, *budget_strides)``: flat buffers, element i belonging to sample ``i // per_sample``.

    That holds for row-major and channels_last 4-D tensors (batch outermost in both), so those are read in
    place and ``out`` keeps their format; anything else (a strided view, mixed layouts) is copied first.
    A budget is read through a stride: 0 for one shared value, 1 per sample.
    """
    first = tensors[0]
    if first.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton {op} supports {list(TRITON_DTYPES)}, got {first.dtype}; use backend='reference'")
    if first.dim() == 4 and not first.is_contiguous() and all(
            t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        # NHWC in memory: permuting to (N, H, W, C) is a row-major view of the same storage.
        out = torch.empty_like(first, memory_format=torch.channels_last)
        flat = [t.permute(0, 2, 3, 1).reshape(-1) for t in (*tensors, out)]
    else:
        out = torch.empty_like(first, memory_format=torch.contiguous_format)
        flat = [t.contiguous().view(-1) for t in tensors] + [out.view(-1)]
    n = out.numel()
    strides = [int(b.dim() == 1) for b in budgets]
    args = [*flat, *(b.contiguous() for b in budgets), n, n // max(first.shape[0], 1), *strides]
    return out, args, (triton.cdiv(n, BLOCK) if HAS_TRITON else 0,)
