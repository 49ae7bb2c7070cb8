"""BatchNorm (training mode) fused with the SiLU after it, forward and backward, in Triton (`fused_bn_silu=True`).

Every Ultralytics `Conv` is conv -> BatchNorm2d -> SiLU. In eager PyTorch the BatchNorm and the SiLU are separate
passes over the activation, and the backward saves both the BatchNorm input and its output. Here, for channels_last
activations viewed as a [M = N*H*W, C] matrix (C contiguous):
- forward: one pass computes per-channel (count, mean, M2) partial statistics in fp32 (Welford/Chan combination
  within a program, combined across programs in torch: no E[x^2] - E[x]^2 cancellation); a second pass writes
  y = silu(x * scale + shift). Only x is saved for backward (the eager pair saves x and the BatchNorm output).
- backward: one pass recomputes the SiLU derivative from x and sums, per channel, g = dy * silu'(a) and g * xhat;
  a second pass writes dx = weight * invstd * (g - sum(g) / M - xhat * sum(g * xhat) / M).
- running statistics: updated as torch's BatchNorm2d updates them (momentum, unbiased variance, or the cumulative
  average when momentum is None); `num_batches_tracked` is counted by the module, as in torch.
The module falls back to eager BatchNorm + SiLU outside training, for other layouts, and where Triton cannot run
(the CPU, unless TRITON_INTERPRET=1: the tests run the kernels on the CPU that way).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

BLOCK_M, BLOCK_C = 64, 32
TARGET_PROGRAMS = 1024  # row programs per channel block: enough to fill a GPU, few partial rows to combine


@triton.jit
def _stats_kernel(X, COUNT, MEAN, M2, M, C, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    n = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = pid_m * rows_per_program
    for start in range(first, tl.minimum(first + rows_per_program, M), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = (rows[:, None] < M) & col_ok[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * C + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        count = tl.minimum(M - start, BLOCK_M).to(tl.float32)
        chunk_mean = tl.sum(x, axis=0) / count
        deviation = tl.where(ok, x - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(deviation * deviation, axis=0)
        total = n + count
        delta = chunk_mean - mean
        mean += delta * count / total
        m2 += chunk_m2 + delta * delta * n * count / total
        n = total
    out = pid_m * C + cols
    tl.store(COUNT + out, n, mask=col_ok)
    tl.store(MEAN + out, mean, mask=col_ok)
    tl.store(M2 + out, m2, mask=col_ok)


@triton.jit
def _forward_kernel(X, Y, SCALE, SHIFT, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows[:, None] < M) & (cols[None, :] < C)
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    x = tl.load(X + offsets, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + cols, mask=cols < C, other=0.0)
    shift = tl.load(SHIFT + cols, mask=cols < C, other=0.0)
    a = x * scale[None, :] + shift[None, :]
    tl.store(Y + offsets, (a * tl.sigmoid(a)).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _silu_grad(x, dy, scale, shift):
    """g = dy * silu'(a) at a = x * scale + shift, recomputed from x."""
    a = x * scale[None, :] + shift[None, :]
    s = tl.sigmoid(a)
    return dy * s * (1.0 + a * (1.0 - s))


@triton.jit
def _backward_sums_kernel(
    X, DY, SCALE, SHIFT, MEAN, INVSTD, SUM_G, SUM_GX, M, C, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale = tl.load(SCALE + cols, mask=col_ok, other=0.0)
    shift = tl.load(SHIFT + cols, mask=col_ok, other=0.0)
    mean = tl.load(MEAN + cols, mask=col_ok, other=0.0)
    invstd = tl.load(INVSTD + cols, mask=col_ok, other=0.0)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = pid_m * rows_per_program
    for start in range(first, tl.minimum(first + rows_per_program, M), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = (rows[:, None] < M) & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(X + offsets, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=ok, other=0.0).to(tl.float32)
        g = tl.where(ok, _silu_grad(x, dy, scale, shift), 0.0)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * (x - mean[None, :]) * invstd[None, :], axis=0)
    tl.store(SUM_G + pid_m * C + cols, sum_g, mask=col_ok)
    tl.store(SUM_GX + pid_m * C + cols, sum_gx, mask=col_ok)


@triton.jit
def _backward_kernel(
    X, DY, DX, SCALE, SHIFT, MEAN, INVSTD, MEAN_G, MEAN_GX, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows[:, None] < M) & col_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
    x = tl.load(X + offsets, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + cols, mask=col_ok, other=0.0)  # weight * invstd
    shift = tl.load(SHIFT + cols, mask=col_ok, other=0.0)
    mean = tl.load(MEAN + cols, mask=col_ok, other=0.0)
    invstd = tl.load(INVSTD + cols, mask=col_ok, other=0.0)
    mean_g = tl.load(MEAN_G + cols, mask=col_ok, other=0.0)
    mean_gx = tl.load(MEAN_GX + cols, mask=col_ok, other=0.0)
    g = _silu_grad(x, dy, scale, shift)
    xhat = (x - mean[None, :]) * invstd[None, :]
    dx = scale[None, :] * (g - mean_g[None, :] - xhat * mean_gx[None, :])
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=ok)


def _grids(M: int, C: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(elementwise grid, reduction grid, rows per reduction program)."""
    channel_blocks = triton.cdiv(C, BLOCK_C)
    rows = max(BLOCK_M, triton.cdiv(triton.cdiv(M, TARGET_PROGRAMS), BLOCK_M) * BLOCK_M)
    return (triton.cdiv(M, BLOCK_M), channel_blocks), (triton.cdiv(M, rows), channel_blocks), rows


def batch_stats(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (mean, M2 = sum of squared deviations) of a [M, C] matrix, in fp32."""
    M, C = x2d.shape
    _, grid, rows = _grids(M, C)
    count, mean, m2 = (torch.empty(grid[0], C, device=x2d.device, dtype=torch.float32) for _ in range(3))
    _stats_kernel[grid](x2d, count, mean, m2, M, C, rows, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    total_mean = (count * mean).sum(0) / M  # Chan's combination of the programs' partial statistics
    return total_mean, m2.sum(0) + (count * (mean - total_mean) ** 2).sum(0)


class _BatchNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor: float, eps: float):
        N, C, H, W = x.shape
        x2d = x.permute(0, 2, 3, 1).reshape(-1, C)  # a view: x is channels_last
        M = x2d.shape[0]
        mean, m2 = batch_stats(x2d)
        invstd = torch.rsqrt(m2 / M + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), factor)
                running_var.lerp_((m2 / max(M - 1, 1)).to(running_var.dtype), factor)  # unbiased, as torch's
        scale = weight.float() * invstd
        shift = bias.float() - mean * scale
        y2d = torch.empty_like(x2d)
        grid, _, _ = _grids(M, C)
        _forward_kernel[grid](x2d, y2d, scale, shift, M, C, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
        ctx.save_for_backward(x, weight, mean, invstd, scale, shift)
        return y2d.view(N, H, W, C).permute(0, 3, 1, 2)  # channels_last again, as the input

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, scale, shift = ctx.saved_tensors
        N, C, H, W = x.shape
        x2d = x.permute(0, 2, 3, 1).reshape(-1, C)
        dy2d = dy.permute(0, 2, 3, 1).contiguous().reshape(-1, C)  # no copy when dy is channels_last
        M = x2d.shape[0]
        grid, reduce_grid, rows = _grids(M, C)
        sum_g, sum_gx = (torch.empty(reduce_grid[0], C, device=x.device, dtype=torch.float32) for _ in range(2))
        _backward_sums_kernel[reduce_grid](
            x2d, dy2d, scale, shift, mean, invstd, sum_g, sum_gx, M, C, rows, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C
        )
        db, dw = sum_g.sum(0), sum_gx.sum(0)
        dx2d = torch.empty_like(x2d)
        _backward_kernel[grid](
            x2d, dy2d, dx2d, scale, shift, mean, invstd, db / M, dw / M, M, C, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C
        )
        dx = dx2d.view(N, H, W, C).permute(0, 3, 1, 2)
        return dx, dw.to(weight.dtype), db.to(weight.dtype), None, None, None, None


def triton_can_run(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class BatchNormSiLU(nn.BatchNorm2d):
    """`BatchNorm2d` then SiLU, fused in training on channels_last activations. A BatchNorm2d subclass: its state-dict
    keys, the EMA, grad_ckpt's BN-safe recomputation and the memory planner see an ordinary BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = (
            self.training
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and triton_can_run(x)
        )
        if not fused:
            return F.silu(super().forward(x))
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            stats = (self.running_mean, self.running_var)
        else:
            factor, stats = 0.0, (None, None)
        return _BatchNormSiLU.apply(x, self.weight, self.bias, *stats, factor, self.eps)


def fuse_bn_silu(model: nn.Module) -> int:
    """Replace the BatchNorm2d + SiLU of every Ultralytics `Conv` in `model` by one `BatchNormSiLU` (in place, same
    state-dict keys); returns how many. Conv.forward is act(bn(conv(x))): the act becomes an Identity."""
    from ultralytics.nn.modules.conv import Conv

    fused = 0
    for m in model.modules():
        if isinstance(m, Conv) and type(m.bn) is nn.BatchNorm2d and type(m.act) is nn.SiLU:
            bn = m.bn
            new = BatchNormSiLU(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            new.load_state_dict(bn.state_dict())
            m.bn = new.to(device=bn.weight.device)
            m.act = nn.Identity()
            fused += 1
    return fused
