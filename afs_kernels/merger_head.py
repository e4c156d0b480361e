"""The merger head of a feature stack, fused: per-extractor BN-affine + ReLU + global average pool + concat +
the linear merger (Eq. 1-2), with the backward to the feature maps and to the merger weights.

Reads top to bottom: private Triton kernels (the math above each) -> host launchers -> ``autograd.Function``
-> public ``merger_head`` (+ ``fold_bn``) -> pure-PyTorch ``merger_head_reference`` (the CPU path and the
tests' oracle).

What it computes, for n extractors with pre-BN feature maps ``F_i`` of shape (B, C_i, H_i, W_i) (what
``model.feature_map(x)`` returns) and their final BatchNorm folded for eval mode into a per-channel affine
``scale_i = gamma_i / sqrt(running_var_i + eps_bn)``, ``shift_i = beta_i - running_mean_i * scale_i``::

    p_i[b, c]  = mean_{h,w} relu(scale_i[c] * F_i[b, c, h, w] + shift_i[c])       # (B, C_i): g_i(x), Eq. 2
    logits     = concat_i(p_i) @ W^T + bias                                       # (B, K): Eq. 1

Without fusion this reads each feature map once for the BN, writes and re-reads it for the ReLU and once
more for the pool (eager PyTorch: ~5 passes over the largest activations of the network, 42 MB per
WRN-28-10 member at B=512 in bf16); the kernel reads it once and never writes it.

How the work is split (and why it is not literally one launch): the n feature maps are separate tensors
with their own shapes and strides, so the forward launches one program grid per extractor, each program
owning one sample and one block of channels. A program pools its (channels x pixels) tile, stores the
pooled features (fp32, kept for the weight gradient) and multiplies them with its block of merger columns,
writing a *partial* logit vector. One reduction over the partial logits (plus the bias) finishes the
linear layer. No atomics, so results are deterministic run to run.

Backward, for an upstream gradient ``G = dL/dlogits`` (B, K)::

    dL/dp[b, j]       = sum_k G[b, k] W[k, j]                                        # (B, sum C_i)
    dL/dF_i[b,c,h,w]  = dL/dp[b, off_i + c] / (H_i W_i) * scale_i[c] * [scale_i[c] F_i[b,c,h,w] + shift_i[c] > 0]
    dL/dW             = G^T @ concat_i(p_i)        dL/db = sum_b G[b, :]

The first two lines are one Triton kernel per extractor (the feature-map gradient is what an attack
needs); dL/dW is a (K x B) @ (B x sum C_i) GEMM left to cuBLAS on the saved pooled features. No gradient
flows to the BN parameters: the extractors of a stack are frozen (``scales``/``shifts`` must not require
grad). Double backward is not supported.

Numerics: all paths compute in fp32 (fp64 on the reference for fp64 inputs); feature maps may be fp32,
bf16 or fp16; the logits come out in the feature maps' dtype, the gradients in their inputs' dtypes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ._common import TRITON_DTYPES, Backend, choose_backend, launch_device, tl, triton, triton_jit

__all__ = ["merger_head", "merger_head_reference", "fold_bn"]

# Tile sizes. A program holds a (BLOCK_C x BLOCK_HW) feature tile and a (BLOCK_K x BLOCK_C) weight tile
# in registers; 4096 feature elements per tile keeps register pressure moderate at 4 warps. WRN-28-10's
# 8x8 maps give BLOCK_HW = 64, BLOCK_C = 64: ten channel blocks per 640-channel member.
_MAX_TILE = 4096
_MAX_BLOCK_HW = 64
_MAX_BLOCK_K = 64
_MIN_BLOCK = 16  # keeps every tl.arange at a size the compiler handles well


# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------
# Forward, program (b, j) of extractor i (channels c in block j, all K classes in chunks of BLOCK_K):
#   p[c]          = (1/HW) * sum_hw relu(scale[c] * F[b, c, hw] + shift[c])
#   pooled[b, off + c] = p[c]                                           # saved for dL/dW
#   part[b, blk_off + j, k] = sum_{c in block j} W[k, off + c] * p[c]    # summed over blocks by the host
# F is read through its four strides, so NCHW, channels_last and other strided maps need no copy.
@triton_jit
def _merger_head_fwd_kernel(
    f_ptr,
    scale_ptr,
    shift_ptr,
    w_ptr,
    pooled_ptr,
    part_ptr,
    C,
    HW,
    width,
    s_b,
    s_c,
    s_h,
    s_w,
    w_s_k,
    w_s_c,
    col_off,
    K,
    pooled_s_b,
    part_s_b,
    blk_off,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # int64: b * s_b passes 2**31 for big batches of big maps
    j = tl.program_id(1)
    cs = j * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    scale = tl.load(scale_ptr + cs, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + cs, mask=cmask, other=0.0)
    base = f_ptr + b * s_b + cs[:, None].to(tl.int64) * s_c

    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_HW):
        ps = p0 + tl.arange(0, BLOCK_HW)
        pmask = ps < HW
        hh = ps // width
        ww = ps - hh * width
        m = cmask[:, None] & pmask[None, :]
        f = tl.load(base + hh[None, :] * s_h + ww[None, :] * s_w, mask=m, other=0.0).to(tl.float32)
        z = tl.maximum(f * scale[:, None] + shift[:, None], 0.0)
        acc += tl.sum(tl.where(m, z, 0.0), axis=1)  # masked lanes would add relu(shift) > 0
    p = acc / HW  # a true fp32 division (HW promoted), as torch's mean does
    tl.store(pooled_ptr + b * pooled_s_b + col_off + cs, p, mask=cmask)

    # This block's share of the linear layer, K classes at a time (one trip for CIFAR's 10 or 100).
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        wt = tl.load(
            w_ptr + ks[:, None] * w_s_k + (col_off + cs)[None, :] * w_s_c,
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        partial = tl.sum(wt * p[None, :], axis=1)  # (BLOCK_K,)
        tl.store(part_ptr + b * part_s_b + (blk_off + j) * K + ks, partial, mask=kmask)


# Backward to the feature map, program (b, j) of extractor i:
#   dp[c]        = sum_k G[b, k] W[k, off + c]
#   dF[b, c, hw] = (dp[c] / HW) * scale[c]   where scale[c] * F[b, c, hw] + shift[c] > 0, else 0
# The ReLU mask is recomputed from F (nothing but the pooled features was saved in the forward).
@triton_jit
def _merger_head_bwd_kernel(
    f_ptr,
    df_ptr,
    scale_ptr,
    shift_ptr,
    w_ptr,
    g_ptr,
    C,
    HW,
    width,
    s_b,
    s_c,
    s_h,
    s_w,
    d_b,
    d_c,
    d_h,
    d_w,
    w_s_k,
    w_s_c,
    col_off,
    K,
    g_s_b,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cs = j * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C

    dp = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        g = tl.load(g_ptr + b * g_s_b + ks, mask=kmask, other=0.0)  # fp32 (the launcher converts G)
        wt = tl.load(
            w_ptr + ks[:, None] * w_s_k + (col_off + cs)[None, :] * w_s_c,
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        dp += tl.sum(wt * g[:, None], axis=0)

    scale = tl.load(scale_ptr + cs, mask=cmask, other=0.0)
    shift = tl.load(shift_ptr + cs, mask=cmask, other=0.0)
    coef = (dp / HW) * scale  # same order as autograd: mean's 1/HW first, then the affine
    src = f_ptr + b * s_b + cs[:, None].to(tl.int64) * s_c
    dst = df_ptr + b * d_b + cs[:, None].to(tl.int64) * d_c
    for p0 in range(0, HW, BLOCK_HW):
        ps = p0 + tl.arange(0, BLOCK_HW)
        pmask = ps < HW
        hh = ps // width
        ww = ps - hh * width
        m = cmask[:, None] & pmask[None, :]
        f = tl.load(src + hh[None, :] * s_h + ww[None, :] * s_w, mask=m, other=0.0).to(tl.float32)
        z = f * scale[:, None] + shift[:, None]
        d = tl.where(z > 0.0, coef[:, None], 0.0)  # relu'(0) = 0, as torch's threshold_backward
        tl.store(dst + hh[None, :] * d_h + ww[None, :] * d_w, d.to(df_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------------------
def _blocks(channels: int, hw: int, classes: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, BLOCK_K): powers of two, the feature tile capped at ``_MAX_TILE`` elements."""
    block_hw = max(_MIN_BLOCK, min(triton.next_power_of_2(hw), _MAX_BLOCK_HW))
    block_k = max(_MIN_BLOCK, min(triton.next_power_of_2(classes), _MAX_BLOCK_K))
    block_c = max(_MIN_BLOCK, min(triton.next_power_of_2(channels), _MAX_TILE // block_hw))
    return block_c, block_hw, block_k


def _launch_forward(
    fmaps: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    shifts: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K) fp32 and pooled features (B, sum C_i) fp32, via one kernel grid per extractor."""
    batch, device = fmaps[0].shape[0], fmaps[0].device
    classes, total_c = weight.shape
    plan = [_blocks(f.shape[1], f.shape[2] * f.shape[3], classes) for f in fmaps]
    n_blocks = [triton.cdiv(f.shape[1], bc) for f, (bc, _, _) in zip(fmaps, plan)]
    pooled = torch.empty(batch, total_c, device=device, dtype=torch.float32)
    # (B, total channel blocks, K): one partial logit vector per (sample, channel block), no atomics.
    part = torch.empty(batch, sum(n_blocks), classes, device=device, dtype=torch.float32)
    col_off = blk_off = 0
    for f, scale, shift, (bc, bhw, bk), nb in zip(fmaps, scales, shifts, plan, n_blocks):
        c, h, w = f.shape[1:]
        with launch_device(f.device):  # on the data's GPU, not the current one
            _merger_head_fwd_kernel[(batch, nb)](
                f, scale, shift, weight, pooled, part,
                c, h * w, w, *f.stride(), *weight.stride(), col_off, classes,
                pooled.stride(0), part.stride(0), blk_off,
                BLOCK_C=bc, BLOCK_HW=bhw, BLOCK_K=bk,
            )  # fmt: skip
        col_off += c
        blk_off += nb
    logits = part.sum(dim=1)  # (B, K): the rest of the linear layer's reduction over sum C_i
    if bias is not None:
        logits += bias.float()
    return logits, pooled


def _launch_backward_fmap(
    f: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    col_off: int,
) -> torch.Tensor:
    """dL/dF for one extractor; ``grad`` is dL/dlogits as contiguous fp32 (B, K). Keeps F's memory format."""
    batch, c, h, w = f.shape
    if f.is_contiguous() or f.is_contiguous(memory_format=torch.channels_last):
        df = torch.empty_like(f)  # same strides as F (NCHW or NHWC)
    else:
        df = torch.empty(f.shape, device=f.device, dtype=f.dtype)
    bc, bhw, bk = _blocks(c, h * w, weight.shape[0])
    with launch_device(f.device):
        _merger_head_bwd_kernel[(batch, triton.cdiv(c, bc))](
            f, df, scale, shift, weight, grad,
            c, h * w, w, *f.stride(), *df.stride(), *weight.stride(), col_off, weight.shape[0], grad.stride(0),
            BLOCK_C=bc, BLOCK_HW=bhw, BLOCK_K=bk,
        )  # fmt: skip
    return df


# --------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------
class _MergerHeadFn(torch.autograd.Function):
    """Triton forward/backward. Inputs are flattened as (weight, bias, n, F_1..F_n, scale_1..n, shift_1..n)."""

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, bias: torch.Tensor | None, n: int, *tensors: torch.Tensor
    ) -> torch.Tensor:
        fmaps, scales, shifts = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        logits, pooled = _launch_forward(fmaps, scales, shifts, weight, bias)
        ctx.n = n
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(weight, pooled, *tensors)
        return logits.to(fmaps[0].dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n = ctx.n
        weight, pooled, *tensors = ctx.saved_tensors
        fmaps, scales, shifts = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        g = grad_out.float().contiguous()  # (B, K), fp32 for the kernels and the GEMM
        need = ctx.needs_input_grad
        d_weight = (g.t() @ pooled).to(weight.dtype) if need[0] else None  # (K, sum C_i): cuBLAS
        d_bias = g.sum(dim=0).to(ctx.bias_dtype) if ctx.has_bias and need[1] else None
        d_fmaps: list[torch.Tensor | None] = []
        col_off = 0
        for i, (f, scale, shift) in enumerate(zip(fmaps, scales, shifts)):
            d_fmaps.append(_launch_backward_fmap(f, scale, shift, weight, g, col_off) if need[3 + i] else None)
            col_off += f.shape[1]
        return (d_weight, d_bias, None, *d_fmaps, *([None] * (2 * n)))


# --------------------------------------------------------------------------------------------------------
# Validation shared by the public function and the reference
# --------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _validate(
    fmaps: Any, scales: Any, shifts: Any, weight: Any, bias: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Check shapes, dtypes and devices; return the three per-extractor lists."""
    if isinstance(fmaps, torch.Tensor) or not isinstance(fmaps, (list, tuple)):
        raise TypeError(f"fmaps must be a list of (B, C_i, H, W) tensors, got {type(fmaps).__name__}")
    fmaps, n = list(fmaps), len(fmaps)
    if n == 0:
        raise ValueError("fmaps is empty: the merger head needs at least one extractor's feature map")
    for name, seq in (("scales", scales), ("shifts", shifts)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list of per-channel (C_i,) tensors, got {type(seq).__name__}")
        if len(seq) != n:
            raise ValueError(f"{len(seq)} {name} given for {n} feature maps")
    first = fmaps[0]
    for i, f in enumerate(fmaps):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"fmaps[{i}] must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() != 4:
            raise ValueError(f"fmaps[{i}] must be 4-D (B, C, H, W), got shape {tuple(f.shape)}")
        if f.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fmaps[{i}] has dtype {f.dtype}; supported: {list(_FLOAT_DTYPES)}")
        if f.dtype != first.dtype:
            raise TypeError(f"dtype mismatch: fmaps[{i}] is {f.dtype}, fmaps[0] is {first.dtype}")
        if f.device != first.device:
            raise ValueError(f"device mismatch: fmaps[{i}] is on {f.device}, fmaps[0] on {first.device}")
        if f.shape[0] != first.shape[0]:
            raise ValueError(f"batch mismatch: fmaps[{i}] has {f.shape[0]} samples, fmaps[0] {first.shape[0]}")
        if f.shape[1] == 0 or f.shape[2] * f.shape[3] == 0:
            raise ValueError(f"fmaps[{i}] has an empty channel or spatial dimension: shape {tuple(f.shape)}")
    for name, seq in (("scales", scales), ("shifts", shifts)):
        for i, (t, f) in enumerate(zip(seq, fmaps)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = getattr(t, "dtype", type(t).__name__)
                raise TypeError(f"{name}[{i}] must be a floating torch.Tensor, got {got}")
            if t.shape != (f.shape[1],):
                raise ValueError(f"{name}[{i}] must have shape ({f.shape[1]},) to match fmaps[{i}], got {tuple(t.shape)}")
            if t.device != first.device:
                raise ValueError(f"device mismatch: {name}[{i}] is on {t.device}, fmaps on {first.device}")
            if t.requires_grad and torch.is_grad_enabled():
                raise ValueError(
                    f"{name}[{i}] requires grad, but the merger head does not differentiate w.r.t. the BN affine "
                    "(extractors are frozen); pass detached tensors, e.g. from fold_bn"
                )
    total = sum(f.shape[1] for f in fmaps)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = getattr(weight, "dtype", type(weight).__name__)
        raise TypeError(f"weight must be a floating torch.Tensor, got {got}")
    if weight.dim() != 2 or weight.shape[1] != total or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (K, sum C_i) = (K, {total}) with K >= 1, got {tuple(weight.shape)}")
    if weight.device != first.device:
        raise ValueError(f"device mismatch: weight is on {weight.device}, fmaps on {first.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            got = getattr(bias, "dtype", type(bias).__name__)
            raise TypeError(f"bias must be a floating torch.Tensor or None, got {got}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
        if bias.device != first.device:
            raise ValueError(f"device mismatch: bias is on {bias.device}, fmaps on {first.device}")
    return fmaps, list(scales), list(shifts)


# --------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------
def fold_bn(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode affine of a BatchNorm as ``(scale, shift)``, fp32, detached, on the BN's device.

    ``bn(x) == x * scale[:, None, None] + shift[:, None, None]`` in eval mode, with
    ``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale`` (gamma = 1,
    beta = 0 for a BN without affine parameters). Folding uses the *running* statistics: the stack's
    extractors are frozen in eval mode, so these are the statistics their BN actually applies.
    """
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fold_bn needs a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn needs running statistics; this BatchNorm was built with track_running_stats=False")
    with torch.no_grad():
        mean, var = bn.running_mean.float(), bn.running_var.float()
        gamma = bn.weight.float() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.float() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        shift = beta - mean * scale
    return scale.contiguous(), shift.contiguous()


def merger_head(
    fmaps: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    shifts: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    backend: Backend | str = "auto",
) -> torch.Tensor:
    """Logits ``concat_i(mean_hw(relu(scale_i * F_i + shift_i))) @ weight.T + bias`` of shape (B, K).

    Args:
        fmaps: n pre-BN feature maps (B, C_i, H_i, W_i), e.g. ``member.feature_map(x)``; one dtype (fp32,
            bf16, fp16) and device; any memory format (NCHW, channels_last or strided views, read in place).
        scales, shifts: n per-channel (C_i,) fp32 tensors, the folded eval-mode BN (:func:`fold_bn`);
            they receive no gradient and must not require one.
        weight: merger weight (K, sum C_i). bias: (K,) or None.
        backend: ``"auto"`` (Triton on CUDA when importable, else the reference), ``"triton"`` (forced; on
            CPU only under ``TRITON_INTERPRET=1``) or ``"reference"``.

    Differentiable w.r.t. every feature map (the attack's path to the input), ``weight`` and ``bias``
    (merger training). Computes in fp32; the logits have the feature maps' dtype.
    """
    fmaps_, scales_, shifts_ = _validate(fmaps, scales, shifts, weight, bias)
    if choose_backend(backend, fmaps_[0], _merger_head_fwd_kernel) is Backend.REFERENCE:
        return merger_head_reference(fmaps_, scales_, shifts_, weight, bias)
    if fmaps_[0].dtype not in TRITON_DTYPES:
        raise TypeError(
            f"the Triton merger head supports {list(TRITON_DTYPES)}, got {fmaps_[0].dtype}; use backend='reference'"
        )
    if fmaps_[0].shape[0] == 0:  # an empty batch: nothing to launch, the reference returns (0, K)
        return merger_head_reference(fmaps_, scales_, shifts_, weight, bias)
    # The kernels index scale/shift as dense fp32 vectors; folding produces exactly that (a no-op then).
    scales_ = [s.float().contiguous() for s in scales_]
    shifts_ = [t.float().contiguous() for t in shifts_]
    return _MergerHeadFn.apply(weight, bias, len(fmaps_), *fmaps_, *scales_, *shifts_)


def merger_head_reference(
    fmaps: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    shifts: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Pure-PyTorch :func:`merger_head` (the CPU path and the kernels' oracle); autograd gives its backward."""
    fmaps_, scales_, shifts_ = _validate(fmaps, scales, shifts, weight, bias)
    dtype = fmaps_[0].dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    pooled = []
    for f, scale, shift in zip(fmaps_, scales_, shifts_):
        z = f.to(compute) * scale.to(compute)[:, None, None] + shift.to(compute)[:, None, None]
        pooled.append(torch.relu(z).mean(dim=(2, 3)))  # (B, C_i)
    features = torch.cat(pooled, dim=1)  # (B, sum C_i): Eq. 2
    b = bias.to(compute) if bias is not None else None
    return torch.nn.functional.linear(features, weight.to(compute), b).to(dtype)  # Eq. 1
