"""GroupNorm as two memory-bound Triton passes: per-group statistics, then one fused normalise (+ SiLU).

`group_stats` mirrors the local part of `collectives.group_stats`: fp32 mean and biased variance per
(sample, group). Each program reduces a contiguous slice of one group with a per-lane Welford update
(every lane has seen the same count in the unmasked loop, so the update costs one scalar reciprocal),
merges its lanes with Chan's formula, and a second tiny kernel merges the slices the same way. No sum of
squares anywhere, so a large mean next to a small spread does not cancel.

`group_norm_apply` mirrors the arithmetic of `sharded.group_norm` after the statistics,
y = (x - mean_g) * (rstd_g * w_c) + b_c in fp32, optional SiLU, cast back: one read of x, one write.

All offsets are 64-bit (a 1x256x4096x4096 map has 4.3 G elements). Fallback: the torch code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import is_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch fallbacks are all there is
    triton = None

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STATS_PROGRAMS = 4096  # target programs of the statistics pass: a few waves on 132 SMs


@dataclass(frozen=True)
class GNConfig:
    block: int  # elements per program step (a power of two)
    num_warps: int

    @property
    def name(self) -> str:
        return f"b{self.block}w{self.num_warps}"


STATS_CONFIGS = {c.name: c for c in (GNConfig(4096, 8), GNConfig(2048, 4), GNConfig(8192, 8), GNConfig(4096, 4))}
APPLY_CONFIGS = {c.name: c for c in (GNConfig(4096, 8), GNConfig(2048, 4), GNConfig(8192, 8), GNConfig(4096, 4))}
DEFAULT_STATS, DEFAULT_APPLY = "b4096w8", "b4096w8"


def group_stats(x: Tensor, groups: int, config: str | None = None) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and biased variance of x, fp32 [B, G] each.

    Args:
        x: [B, C, *] activations, bf16/fp16/fp32; contiguous takes the kernel.
        groups: number of groups G; must divide C.
        config: a key of `STATS_CONFIGS`; default `DEFAULT_STATS`.
    """
    B, C = x.shape[:2]
    if C % groups:
        raise ValueError(f"group_stats: {groups} groups must divide the {C} channels of x {tuple(x.shape)}")
    if not _takes_kernel(x):
        var, mean = torch.var_mean(x.reshape(B, groups, -1).float(), dim=-1, correction=0)  # [B, G]
        return mean, var
    cfg = STATS_CONFIGS[config or DEFAULT_STATS]
    N = x[0].numel() // groups  # elements per group, contiguous
    splits = max(1, min(triton.cdiv(N, cfg.block), triton.cdiv(STATS_PROGRAMS, B * groups)))
    slice_len = triton.cdiv(triton.cdiv(N, splits), cfg.block) * cfg.block
    splits = triton.cdiv(N, slice_len)  # every slice holds at least one element
    partial = torch.empty(3, B * groups, splits, device=x.device, dtype=torch.float32)  # count, mean, M2
    _stats_kernel[(B * groups, splits)](x, partial, N, slice_len, splits, BLOCK=cfg.block, num_warps=cfg.num_warps)
    mean = torch.empty(B, groups, device=x.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    _merge_kernel[(B * groups,)](partial, mean, var, splits, SPLITS=triton.next_power_of_2(splits), num_warps=4)
    return mean, var


def group_norm_apply(
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    groups: int,
    silu: bool = False,
    config: str | None = None,
) -> Tensor:
    """y = (x - mean_g) * rstd_g * w_c + b_c computed in fp32, then SiLU if asked, in x's dtype.

    Args:
        x: [B, C, *] activations; contiguous bf16/fp16/fp32 takes the kernel.
        mean, rstd: [B, G] group statistics (fp32).
        weight, bias: [C] affine parameters, or None for 1 / 0.
        groups: number of groups G; must divide C.
        silu: apply SiLU after the affine.
        config: a key of `APPLY_CONFIGS`; default `DEFAULT_APPLY`.
    """
    B, C = x.shape[:2]
    if C % groups or mean.shape != (B, groups) or rstd.shape != (B, groups):
        raise ValueError(
            f"group_norm_apply: x {tuple(x.shape)} with {groups} groups needs mean and rstd of shape "
            f"{(B, groups)} and C divisible by groups; got {tuple(mean.shape)}, {tuple(rstd.shape)}"
        )
    weight = torch.ones(C, device=x.device) if weight is None else weight
    bias = torch.zeros(C, device=x.device) if bias is None else bias
    if not _takes_kernel(x):
        return _apply_torch(x, mean, rstd, weight, bias, groups, silu)
    cfg = APPLY_CONFIGS[config or DEFAULT_APPLY]
    HW = x[0, 0].numel()
    chunks = triton.cdiv(HW, cfg.block)
    y = torch.empty_like(x)
    _apply_kernel[(B * C * chunks,)](
        x, y, mean.float().contiguous(), rstd.float().contiguous(), weight.contiguous(), bias.contiguous(),
        C, HW, groups, C // groups, chunks, SILU=silu, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip
    return y


def _takes_kernel(x: Tensor) -> bool:
    return is_available(x.device) and x.dtype in DTYPES and x.is_contiguous() and x.numel() > 0


def _apply_torch(x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor, groups: int, silu: bool):
    """The torch path of `sharded.group_norm` (fp32 temporaries of x's size)."""
    B, C = x.shape[:2]
    per_channel = C // groups
    mean = mean.float().repeat_interleave(per_channel, dim=1)[:, :, None]  # [B, C, 1]
    scale = rstd.float().repeat_interleave(per_channel, dim=1)[:, :, None] * weight.float()[:, None]  # [B, C, 1]
    y = (x.reshape(B, C, -1).float() - mean) * scale + bias.float()[:, None]  # [B, C, HW]
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).reshape(x.shape)


if triton is not None:

    @triton.jit
    def _stats_kernel(X, partial, N, slice_len, splits, BLOCK: tl.constexpr):
        """Program (bg, s): count, mean, M2 of elements [s*slice_len, min(N, (s+1)*slice_len)) of group bg."""
        bg = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1)
        start = s.to(tl.int64) * slice_len
        n = tl.minimum(N - start, slice_len)
        n_full = (n // BLOCK).to(tl.int32)
        ptrs = X + bg * N + start + tl.arange(0, BLOCK)
        mean = tl.zeros([BLOCK], tl.float32)  # per lane
        m2 = tl.zeros([BLOCK], tl.float32)
        for i in range(0, n_full):  # every lane sees its (i+1)-th element
            x = tl.load(ptrs).to(tl.float32)
            delta = x - mean
            mean += delta * (1.0 / (i + 1))
            m2 += delta * (x - mean)
            ptrs += BLOCK
        count = tl.full([BLOCK], 0, tl.float32) + n_full
        tail = (n - n_full * BLOCK).to(tl.int32)
        if tail > 0:
            valid = tl.arange(0, BLOCK) < tail
            x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
            delta = tl.where(valid, x - mean, 0.0)
            mean += delta * (1.0 / (n_full + 1))
            m2 += delta * (x - mean)
            count += valid.to(tl.float32)
        total = tl.sum(count, 0)
        mean_all = tl.sum(count * mean, 0) / total
        dev = mean - mean_all
        m2_all = tl.sum(m2, 0) + tl.sum(count * dev * dev, 0)
        out = bg * splits + s
        stride = tl.num_programs(0).to(tl.int64) * splits
        tl.store(partial + out, total)
        tl.store(partial + stride + out, mean_all)
        tl.store(partial + 2 * stride + out, m2_all)

    @triton.jit
    def _merge_kernel(partial, MEAN, VAR, splits, SPLITS: tl.constexpr):
        """Chan merge of one group's `splits` (count, mean, M2) partials into mean and biased variance."""
        bg = tl.program_id(0).to(tl.int64)
        stride = tl.num_programs(0).to(tl.int64) * splits
        offs = tl.arange(0, SPLITS)
        valid = offs < splits
        ptrs = partial + bg * splits + offs
        count = tl.load(ptrs, mask=valid, other=0.0)
        mean = tl.load(ptrs + stride, mask=valid, other=0.0)
        m2 = tl.load(ptrs + 2 * stride, mask=valid, other=0.0)
        total = tl.sum(count, 0)
        mean_all = tl.sum(count * mean, 0) / total
        dev = mean - mean_all
        m2_all = tl.sum(m2, 0) + tl.sum(count * dev * dev, 0)
        tl.store(MEAN + bg, mean_all)
        tl.store(VAR + bg, m2_all / total)

    @triton.jit
    def _apply_kernel(X, Y, MEAN, RSTD, W, Bias, C, HW, G, per_group, chunks, SILU: tl.constexpr, BLOCK: tl.constexpr):
        """Program p: chunk p % chunks of channel plane p // chunks ([B*C, HW] view of x)."""
        pid = tl.program_id(0)
        bc = pid // chunks
        chunk = pid % chunks
        b = bc // C
        c = bc % C
        g = b * G + c // per_group
        mean = tl.load(MEAN + g)
        scale = tl.load(RSTD + g) * tl.load(W + c).to(tl.float32)
        shift = tl.load(Bias + c).to(tl.float32)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        valid = offs < HW
        base = bc.to(tl.int64) * HW
        x = tl.load(X + base + offs, mask=valid, other=0.0).to(tl.float32)
        y = (x - mean) * scale + shift
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=valid)
