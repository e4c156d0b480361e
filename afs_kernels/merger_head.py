"""The merger head of a feature stack, fused: per-extractor BN-affine + ReLU + global average pool + concat +
the linear merger (Eq. 1-2), with the backward to the feature maps and to the merger weights.

Reads top to bottom: private Triton kernels (the math above each) -> host launchers -> ``autograd.Function``
-> public ``merger_head`` -> pure-PyTorch ``merger_head_reference`` (the CPU path and the tests' oracle).

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

__all__ = ["merger_head", "merger_head_reference"]

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
# Public functions
# --------------------------------------------------------------------------------------------------------
def _fold_bn(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN as a per-channel affine: ``bn(F) == F * scale + shift``, fp32, detached.

    scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale. The running statistics
    are the ones an eval-mode BN applies; the stack's extractors are frozen in eval mode.
    """
    with torch.no_grad():
        mean, var = bn.running_mean.float(), bn.running_var.float()
        gamma = bn.weight.float() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.float() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        return scale.contiguous(), (beta - mean * scale).contiguous()


def _check(fmaps: Sequence[torch.Tensor], bns: Sequence[nn.Module], weight: torch.Tensor) -> None:
    """One check of the inputs both paths share; the kernels then index without re-checking."""
    if len(fmaps) == 0 or len(fmaps) != len(bns):
        raise ValueError(f"need one BatchNorm per feature map and at least one of each, got {len(fmaps)} "
                         f"feature maps and {len(bns)} BatchNorms")
    for i, (f, bn) in enumerate(zip(fmaps, bns)):
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
            raise TypeError(f"bns[{i}] must be a BatchNorm2d with running statistics, got {type(bn).__name__}")
        if f.dim() != 4 or f.shape[1] != bn.num_features or f.shape[0] != fmaps[0].shape[0]:
            raise ValueError(f"fmaps[{i}] must be (B, {bn.num_features}, H, W) with B = {fmaps[0].shape[0]}, "
                             f"got {tuple(f.shape)}")
    total = sum(f.shape[1] for f in fmaps)
    if weight.dim() != 2 or weight.shape[1] != total:
        raise ValueError(f"weight must be (K, sum C_i) = (K, {total}), got {tuple(weight.shape)}")


def merger_head(
    fmaps: Sequence[torch.Tensor],
    bns: Sequence[nn.Module],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    backend: Backend | str = "auto",
) -> torch.Tensor:
    """Logits ``concat_i(mean_hw(relu(bn_i(F_i)))) @ weight.T + bias``, (B, K): Eq. 2 then Eq. 1.

    fmaps: the n members' pre-BN feature maps (B, C_i, H_i, W_i) (``member.feature_map(x)``), any memory
    format. bns: each member's final BatchNorm2d, in eval mode (its running statistics are folded into a
    per-channel affine; it receives no gradient). weight (K, sum C_i), bias (K,) or None: the merger.
    backend: "auto" (the Triton kernel on CUDA tensors, the reference elsewhere), "triton", "reference".
    Differentiable w.r.t. every feature map (the attack's path to the input), weight and bias.
    """
    _check(fmaps, bns, weight)
    if choose_backend(backend, fmaps[0], _merger_head_fwd_kernel) is Backend.REFERENCE:
        return _reference(fmaps, bns, weight, bias)
    if any(bn.training for bn in bns):
        # Train-mode BN normalises by the batch's statistics, which the folded affine does not know.
        raise ValueError("the fused merger head folds eval-mode BatchNorms; put the extractors in eval mode")
    if fmaps[0].dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton merger head supports {list(TRITON_DTYPES)}, got {fmaps[0].dtype}")
    if fmaps[0].shape[0] == 0:  # an empty batch: nothing to launch
        return _reference(fmaps, bns, weight, bias)
    folded = [_fold_bn(bn) for bn in bns]
    scales, shifts = [s for s, _ in folded], [t for _, t in folded]
    return _MergerHeadFn.apply(weight, bias, len(fmaps), *fmaps, *scales, *shifts)


def merger_head_reference(
    fmaps: Sequence[torch.Tensor], bns: Sequence[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same logits from plain torch ops: the CPU path of the stack and the kernels' oracle.

    Exactly the modules' own composition (BN, ReLU, mean pool, concat, linear), so on a CPU, under bf16
    autocast too, a stack computes what its members and an ``nn.Linear`` merger compute unfused.
    """
    _check(fmaps, bns, weight)
    return _reference(fmaps, bns, weight, bias)


def _reference(fmaps: Sequence[torch.Tensor], bns: Sequence[nn.Module], weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    pooled = [torch.relu(bn(f)).mean(dim=(2, 3)) for f, bn in zip(fmaps, bns)]  # n x (B, C_i): g_i(x)
    return torch.nn.functional.linear(torch.cat(pooled, dim=1), weight, bias)  # (B, K): Eq. 1
