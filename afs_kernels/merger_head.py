"""The stack's merger head, fused: each member's final BN + ReLU + global average pool, concat, and the linear
merger (Eq. 1-2), with the backward to the feature maps (the attack's path) and to the merger weights.

Order: Triton kernels -> launchers -> autograd.Function -> merger_head -> merger_head_reference (CPU path).
"""

# For n members with pre-BN feature maps F_i (B, C_i, H_i, W_i) (``feature_map(x)``) and their final
# eval-mode BN folded into a per-channel affine (scale_i = gamma_i / sqrt(running_var_i + eps),
# shift_i = beta_i - running_mean_i * scale_i):
#   p_i[b, c] = mean_{h,w} relu(scale_i[c] * F_i[b, c, h, w] + shift_i[c])    (B, C_i): g_i(x), Eq. 2
#   logits    = concat_i(p_i) @ W^T + bias                                     (B, K): Eq. 1
# Why fuse: eager torch makes ~5 passes over the network's largest activations (42 MB per WRN-28-10 member
# at B=512 in bf16); the kernel reads each map once and never writes it. One grid per member (the maps have
# their own shapes and strides), a program per (sample, channel block) writing its pooled features (fp32,
# kept for dW) and a partial logit vector; one torch sum over the partials ends the linear layer. No
# atomics: deterministic run to run. Backward, for G = dL/dlogits (B, K):
#   dL/dp[b, j]      = sum_k G[b, k] W[k, j]                                    (B, sum C_i)
#   dL/dF_i[b,c,h,w] = dL/dp[b, off_i + c] / (H_i W_i) * scale_i[c] * [scale_i[c] F_i + shift_i[c] > 0]
#   dL/dW = G^T @ concat_i(p_i) (a GEMM on the saved pooled features),  dL/db = sum_b G[b, :]
# No gradient reaches the BNs (the members are frozen); no double backward. fp32 inside, F's dtype out.

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ._common import TRITON_DTYPES, Backend, choose_backend, launch_device, tl, triton, triton_jit

# A program holds a (BLOCK_C x BLOCK_HW) feature tile and a (BLOCK_K x BLOCK_C) weight tile in registers;
# 4096 feature elements keep register pressure moderate at 4 warps. WRN-28-10's 8x8 maps: BLOCK_HW = 64,
# BLOCK_C = 64, ten channel blocks per 640-channel member. 16 is the smallest tl.arange size used.
_MAX_TILE, _MAX_BLOCK_HW, _MAX_BLOCK_K, _MIN_BLOCK = 4096, 64, 64, 16


# Forward, program (b, j) of member i (channels c of block j, all K classes in chunks of BLOCK_K):
#   p[c] = (1/HW) sum_hw relu(scale[c] F[b, c, hw] + shift[c]);  pooled[b, off + c] = p[c]
#   part[b, blk_off + j, k] = sum_{c in block j} W[k, off + c] p[c]      (summed over blocks by the host)
# F is read through its four strides: NCHW, channels_last and strided views need no copy.
@triton_jit
def _fwd_kernel(f_ptr, scale_ptr, shift_ptr, w_ptr, pooled_ptr, part_ptr, C, HW, width, s_b, s_c, s_h, s_w,
                w_s_k, w_s_c, col_off, K, pooled_s_b, part_s_b, blk_off,
                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # int64: b * s_b passes 2**31 for big batches of big maps
    j = tl.program_id(1)
    cs = j * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    scale, shift = tl.load(scale_ptr + cs, mask=cmask, other=0.0), tl.load(shift_ptr + cs, mask=cmask, other=0.0)
    base = f_ptr + b * s_b + cs[:, None].to(tl.int64) * s_c
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, HW, BLOCK_HW):
        ps = p0 + tl.arange(0, BLOCK_HW)
        hh = ps // width
        m = cmask[:, None] & (ps < HW)[None, :]
        f = tl.load(base + hh[None, :] * s_h + (ps - hh * width)[None, :] * s_w, mask=m, other=0.0).to(tl.float32)
        z = tl.maximum(f * scale[:, None] + shift[:, None], 0.0)
        acc += tl.sum(tl.where(m, z, 0.0), axis=1)  # masked lanes would add relu(shift) > 0
    p = acc / HW  # a true fp32 division, as torch's mean
    tl.store(pooled_ptr + b * pooled_s_b + col_off + cs, p, mask=cmask)
    for k0 in range(0, K, BLOCK_K):  # this block's share of the linear layer (one trip for 10 or 100 classes)
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        wt = tl.load(w_ptr + ks[:, None] * w_s_k + (col_off + cs)[None, :] * w_s_c,
                     mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        tl.store(part_ptr + b * part_s_b + (blk_off + j) * K + ks, tl.sum(wt * p[None, :], axis=1), mask=kmask)


# Backward to the feature map, program (b, j) of member i:
#   dp[c] = sum_k G[b, k] W[k, off + c];  dF[b, c, hw] = (dp[c] / HW) scale[c] where the BN output > 0, else 0
# The ReLU mask is recomputed from F: the forward saved nothing but the pooled features.
@triton_jit
def _bwd_kernel(f_ptr, df_ptr, scale_ptr, shift_ptr, w_ptr, g_ptr, C, HW, width, s_b, s_c, s_h, s_w,
                d_b, d_c, d_h, d_w, w_s_k, w_s_c, col_off, K, g_s_b,
                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cs = j * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    dp = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        g = tl.load(g_ptr + b * g_s_b + ks, mask=kmask, other=0.0)  # fp32 (the launcher converts G)
        wt = tl.load(w_ptr + ks[:, None] * w_s_k + (col_off + cs)[None, :] * w_s_c,
                     mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        dp += tl.sum(wt * g[:, None], axis=0)
    scale, shift = tl.load(scale_ptr + cs, mask=cmask, other=0.0), tl.load(shift_ptr + cs, mask=cmask, other=0.0)
    coef = (dp / HW) * scale  # autograd's order: the mean's 1/HW first, then the affine
    src = f_ptr + b * s_b + cs[:, None].to(tl.int64) * s_c
    dst = df_ptr + b * d_b + cs[:, None].to(tl.int64) * d_c
    for p0 in range(0, HW, BLOCK_HW):
        ps = p0 + tl.arange(0, BLOCK_HW)
        hh = ps // width
        ww = ps - hh * width
        m = cmask[:, None] & (ps < HW)[None, :]
        f = tl.load(src + hh[None, :] * s_h + ww[None, :] * s_w, mask=m, other=0.0).to(tl.float32)
        d = tl.where(f * scale[:, None] + shift[:, None] > 0.0, coef[:, None], 0.0)  # relu'(0) = 0, as torch
        tl.store(dst + hh[None, :] * d_h + ww[None, :] * d_w, d.to(df_ptr.dtype.element_ty), mask=m)


def _blocks(channels: int, hw: int, classes: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, BLOCK_K): powers of two, the feature tile capped at ``_MAX_TILE`` elements."""
    block_hw = max(_MIN_BLOCK, min(triton.next_power_of_2(hw), _MAX_BLOCK_HW))
    block_k = max(_MIN_BLOCK, min(triton.next_power_of_2(classes), _MAX_BLOCK_K))
    return max(_MIN_BLOCK, min(triton.next_power_of_2(channels), _MAX_TILE // block_hw)), block_hw, block_k


def _launch_forward(fmaps, scales, shifts, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, K) and pooled features (B, sum C_i), both fp32, one kernel grid per member."""
    (batch, device), (classes, total_c) = (fmaps[0].shape[0], fmaps[0].device), weight.shape
    plan = [_blocks(f.shape[1], f.shape[2] * f.shape[3], classes) for f in fmaps]
    n_blocks = [triton.cdiv(f.shape[1], bc) for f, (bc, _, _) in zip(fmaps, plan)]
    pooled = torch.empty(batch, total_c, device=device, dtype=torch.float32)
    part = torch.empty(batch, sum(n_blocks), classes, device=device, dtype=torch.float32)  # per channel block
    col_off = blk_off = 0
    for f, scale, shift, (bc, bhw, bk), nb in zip(fmaps, scales, shifts, plan, n_blocks):
        with launch_device(f.device):  # on the data's GPU, not the current one
            _fwd_kernel[(batch, nb)](f, scale, shift, weight, pooled, part, f.shape[1], f.shape[2] * f.shape[3],
                                     f.shape[3], *f.stride(), *weight.stride(), col_off, classes, pooled.stride(0),
                                     part.stride(0), blk_off, BLOCK_C=bc, BLOCK_HW=bhw, BLOCK_K=bk)
        col_off, blk_off = col_off + f.shape[1], blk_off + nb
    logits = part.sum(dim=1)  # (B, K): the rest of the linear layer's reduction over sum C_i
    return (logits + bias.float() if bias is not None else logits), pooled


def _launch_backward(f, scale, shift, weight, grad, col_off) -> torch.Tensor:
    """dL/dF for one member; ``grad`` is dL/dlogits, contiguous fp32 (B, K)."""
    batch, c, h, w = f.shape
    df = torch.empty_like(f)  # F's strides when F is dense (NCHW, channels_last), else contiguous
    bc, bhw, bk = _blocks(c, h * w, weight.shape[0])
    with launch_device(f.device):
        _bwd_kernel[(batch, triton.cdiv(c, bc))](f, df, scale, shift, weight, grad, c, h * w, w, *f.stride(),
                                                 *df.stride(), *weight.stride(), col_off, weight.shape[0],
                                                 grad.stride(0), BLOCK_C=bc, BLOCK_HW=bhw, BLOCK_K=bk)
    return df


class _MergerHeadFn(torch.autograd.Function):
    """Inputs flattened as (weight, bias, n, F_1..F_n, scale_1..scale_n, shift_1..shift_n)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, bias: torch.Tensor | None, n: int, *tensors: torch.Tensor):
        logits, pooled = _launch_forward(tensors[:n], tensors[n:2 * n], tensors[2 * n:], weight, bias)
        ctx.n, ctx.bias_dtype = n, None if bias is None else bias.dtype
        ctx.save_for_backward(weight, pooled, *tensors)
        return logits.to(tensors[0].dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        n, (weight, pooled, *tensors), need = ctx.n, ctx.saved_tensors, ctx.needs_input_grad
        g = grad_out.float().contiguous()  # (B, K) fp32 for the kernels and the GEMM
        d_weight = (g.t() @ pooled).to(weight.dtype) if need[0] else None  # (K, sum C_i)
        d_bias = g.sum(dim=0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[1] else None
        offs = [sum(f.shape[1] for f in tensors[:i]) for i in range(n)]  # member i's first merger column
        d_fmaps = [_launch_backward(tensors[i], tensors[n + i], tensors[2 * n + i], weight, g, offs[i])
                   if need[3 + i] else None for i in range(n)]
        return (d_weight, d_bias, None, *d_fmaps, *([None] * (2 * n)))


def _fold_bn(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    # Eval-mode BN as bn(F) == F * scale + shift (fp32, detached): exactly what it applies with running stats.
    with torch.no_grad():  # gamma = 1, beta = 0 for a BN without affine parameters
        scale = (bn.weight.float() if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var.float() + bn.eps)
        shift = (bn.bias.float() if bn.bias is not None else 0.0) - bn.running_mean.float() * scale
        return scale.contiguous(), shift.contiguous()


def _check(fmaps: Sequence[torch.Tensor], bns: Sequence[nn.Module], weight: torch.Tensor) -> None:
    # The one check of the inputs; the kernels then index without re-checking.
    if len(fmaps) == 0 or len(fmaps) != len(bns):
        raise ValueError(f"need one BatchNorm per feature map, at least one: got {len(fmaps)} and {len(bns)}")
    for i, (f, bn) in enumerate(zip(fmaps, bns)):
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or bn.running_mean is None:
            raise TypeError(f"bns[{i}] must be a BatchNorm2d with running statistics, got {type(bn).__name__}")
        if f.dim() != 4 or f.shape[1] != bn.num_features or f.shape[0] != fmaps[0].shape[0]:
            raise ValueError(f"fmaps[{i}] must be (B, {bn.num_features}, H, W) with B = {fmaps[0].shape[0]}, "
                             f"got {tuple(f.shape)}")
    total = sum(f.shape[1] for f in fmaps)
    if weight.dim() != 2 or weight.shape[1] != total:
        raise ValueError(f"weight must be (K, sum C_i) = (K, {total}), got {tuple(weight.shape)}")


def merger_head(fmaps: Sequence[torch.Tensor], bns: Sequence[nn.Module], weight: torch.Tensor,
                bias: torch.Tensor | None, backend: Backend | str = "auto") -> torch.Tensor:
    """Logits ``concat_i(mean_hw(relu(bns[i](fmaps[i])))) @ weight.T + bias`` (B, K), differentiable w.r.t.
    fmaps (B, C_i, H_i, W_i; any memory format), weight (K, sum C_i) and bias (K,) or None; bns: the members'
    final BatchNorm2d. backend: "auto" (Triton on CUDA tensors, else the reference), "triton", "reference"."""
    _check(fmaps, bns, weight)
    if choose_backend(backend, fmaps[0], _fwd_kernel) is Backend.REFERENCE or fmaps[0].shape[0] == 0:
        return _reference(fmaps, bns, weight, bias)  # (an empty batch: nothing to launch)
    # A train-mode BN normalises by the batch's statistics, which the folded affine does not know: refuse
    # rather than compute something else (StackedModel keeps its members in eval mode).
    if any(bn.training for bn in bns):
        raise ValueError("the fused merger head folds eval-mode BatchNorms; put the extractors in eval mode")
    if fmaps[0].dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton merger head supports {list(TRITON_DTYPES)}, got {fmaps[0].dtype}")
    scales, shifts = zip(*[_fold_bn(bn) for bn in bns])
    return _MergerHeadFn.apply(weight, bias, len(fmaps), *fmaps, *scales, *shifts)


def merger_head_reference(fmaps: Sequence[torch.Tensor], bns: Sequence[nn.Module], weight: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """The same logits from plain torch ops: the stack's CPU path and the kernels' oracle."""
    _check(fmaps, bns, weight)
    return _reference(fmaps, bns, weight, bias)


def _reference(fmaps, bns, weight, bias) -> torch.Tensor:
    # Exactly the modules' own composition (BN, ReLU, mean pool, concat, linear), so a stack computes
    # merger(features(x)) bit for bit, under CPU bf16 autocast too.
    pooled = [torch.relu(bn(f)).mean(dim=(2, 3)) for f, bn in zip(fmaps, bns)]  # n x (B, C_i): g_i(x)
    return torch.nn.functional.linear(torch.cat(pooled, dim=1), weight, bias)  # (B, K): Eq. 1
