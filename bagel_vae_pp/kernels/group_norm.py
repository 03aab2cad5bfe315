"""GroupNorm as two memory-bound Triton passes: per-group statistics, then one fused normalise (+ SiLU).

`group_stats` mirrors the local part of `collectives.group_stats`: fp32 mean and biased variance per
(sample, group). Each program reduces a contiguous slice of one group with a per-lane Welford update
(every lane has seen the same count in the unmasked loop, so the update costs one scalar reciprocal),
merges its lanes with Chan's formula, and a second tiny kernel merges the slices the same way. No sum of
squares anywhere, so a large mean next to a small spread does not cancel.

`group_norm_apply` mirrors the arithmetic of `sharded.group_norm` after the statistics,
y = (x - mean_g) * (rstd_g * w_c) + b_c in fp32, optional SiLU, cast back: one read of x, one write.

Both take NCHW-contiguous tensors and 4-D channels_last (NHWC) ones, each with its own kernels: in NHWC a
group is not contiguous, so a program reads whole pixels (all C channels, a [pixels, C] tile, coalesced)
and sorts the channels into groups itself. The output keeps x's memory format.

All offsets are 64-bit (a 1x256x4096x4096 map has 4.3 G elements). Fallback: the torch code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import is_available, is_nhwc

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
# NHWC: block counts the elements of a [pixels, padded C] tile, so C = 512 takes 8 pixels a step at b4096.
# Bigger tiles amortise the per-channel loads of apply; none of these spills on sm_90 (C = 128..512).
_NHWC = (GNConfig(4096, 8), GNConfig(8192, 8), GNConfig(2048, 4), GNConfig(4096, 4))
NHWC_STATS_CONFIGS = {c.name: c for c in (*_NHWC, GNConfig(16384, 16))}
NHWC_APPLY_CONFIGS = {c.name: c for c in (*_NHWC, GNConfig(16384, 8))}
DEFAULT_NHWC_STATS, DEFAULT_NHWC_APPLY = "b4096w4", "b4096w4"  # fastest on an H200 (bench_kernels --quick)


def group_stats(
    x: Tensor, groups: int, config: str | None = None, x_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and biased variance of x (+ x_bias), fp32 [B, G] each.

    Args:
        x: [B, C, *] activations, bf16/fp16/fp32; contiguous or 4-D channels_last takes a kernel.
        groups: number of groups G; must divide C.
        config: a key of `STATS_CONFIGS` (NCHW) or `NHWC_STATS_CONFIGS` (channels_last); default the layout's.
        x_bias: [C] or None: statistics of x + x_bias[c], the bias of the conv that made x and left it out.
            The channels_last kernel folds it into each channel's mean (a constant shift leaves a channel's
            spread alone), so x + x_bias is never written; other layouts add it first.
    """
    B, C = x.shape[:2]
    if C % groups:
        raise ValueError(f"group_stats: {groups} groups must divide the {C} channels of x {tuple(x.shape)}")
    x, x_bias = with_conv_bias(x, x_bias)
    layout = _kernel_layout(x)
    if layout is None:
        var, mean = torch.var_mean(x.reshape(B, groups, -1).float(), dim=-1, correction=0)  # [B, G]
        return mean, var
    if layout == "nhwc":
        return _stats_nhwc(x, groups, NHWC_STATS_CONFIGS[config or DEFAULT_NHWC_STATS], x_bias)
    cfg = STATS_CONFIGS[config or DEFAULT_STATS]
    N = x[0].numel() // groups  # elements per group, contiguous
    splits = max(1, min(triton.cdiv(N, cfg.block), triton.cdiv(STATS_PROGRAMS, B * groups)))
    slice_len = triton.cdiv(triton.cdiv(N, splits), cfg.block) * cfg.block
    splits = triton.cdiv(N, slice_len)  # every slice holds at least one element
    partial = torch.empty(3, B * groups, splits, device=x.device, dtype=torch.float32)  # count, mean, M2
    _stats_kernel[(B * groups, splits)](x, partial, N, slice_len, splits, BLOCK=cfg.block, num_warps=cfg.num_warps)
    return _merge(partial, B, groups, splits)


def _stats_nhwc(x: Tensor, groups: int, cfg: GNConfig, x_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Program (b, s) reduces pixels [s*slice_len, (s+1)*slice_len) of sample b, all groups at once."""
    B, C, H, W = x.shape
    HW = H * W
    block_c = triton.next_power_of_2(C)
    block_p = max(1, cfg.block // block_c)  # pixels per step
    splits = max(1, min(triton.cdiv(HW, block_p), triton.cdiv(STATS_PROGRAMS, B)))
    slice_len = triton.cdiv(triton.cdiv(HW, splits), block_p) * block_p
    splits = triton.cdiv(HW, slice_len)  # every slice holds at least one pixel
    partial = torch.empty(3, B * groups, splits, device=x.device, dtype=torch.float32)  # count, mean, M2
    _stats_nhwc_kernel[(B, splits)](
        x, partial, x if x_bias is None else x_bias.contiguous(), HW, slice_len, splits, C=C, G=groups,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_G=triton.next_power_of_2(groups), HAS_XB=x_bias is not None,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return _merge(partial, B, groups, splits)


def _merge(partial: Tensor, B: int, groups: int, splits: int) -> tuple[Tensor, Tensor]:
    mean = torch.empty(B, groups, device=partial.device, dtype=torch.float32)
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
    x_bias: Tensor | None = None,
) -> Tensor:
    """y = (x - mean_g) * rstd_g * w_c + b_c computed in fp32, then SiLU if asked, in x's dtype.

    Args:
        x: [B, C, *] activations; contiguous or 4-D channels_last bf16/fp16/fp32 takes a kernel.
        mean, rstd: [B, G] group statistics (fp32).
        weight, bias: [C] affine parameters, or None for 1 / 0.
        groups: number of groups G; must divide C.
        silu: apply SiLU after the affine.
        config: a key of `APPLY_CONFIGS` (NCHW) or `NHWC_APPLY_CONFIGS` (channels_last); default the layout's.
        x_bias: [C] or None: normalise x + x_bias[c] (see `group_stats`); folded into the channels_last kernel.

    Returns y in x's memory format (NCHW-contiguous or channels_last).
    """
    B, C = x.shape[:2]
    if C % groups or mean.shape != (B, groups) or rstd.shape != (B, groups):
        raise ValueError(
            f"group_norm_apply: x {tuple(x.shape)} with {groups} groups needs mean and rstd of shape "
            f"{(B, groups)} and C divisible by groups; got {tuple(mean.shape)}, {tuple(rstd.shape)}"
        )
    weight = torch.ones(C, device=x.device) if weight is None else weight
    bias = torch.zeros(C, device=x.device) if bias is None else bias
    x, x_bias = with_conv_bias(x, x_bias)
    layout = _kernel_layout(x)
    if layout is None:
        y = _apply_torch(x, mean, rstd, weight, bias, groups, silu)
        return y.contiguous(memory_format=torch.channels_last) if is_nhwc(x) else y
    if layout == "nhwc":
        cfg = NHWC_APPLY_CONFIGS[config or DEFAULT_NHWC_APPLY]
        return _apply_nhwc(x, mean, rstd, weight, bias, groups, silu, cfg, x_bias)
    cfg = APPLY_CONFIGS[config or DEFAULT_APPLY]
    HW = x[0, 0].numel()
    chunks = triton.cdiv(HW, cfg.block)
    y = torch.empty_like(x)
    _apply_kernel[(B * C * chunks,)](
        x, y, mean.float().contiguous(), rstd.float().contiguous(), weight.contiguous(), bias.contiguous(),
        C, HW, groups, C // groups, chunks, SILU=silu, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )  # fmt: skip
    return y


def _apply_nhwc(
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    groups: int,
    silu: bool,
    cfg: GNConfig,
    x_bias: Tensor | None,
) -> Tensor:
    """Program p normalises a [pixels, C] tile of sample p // chunks; y = empty_like(x) stays channels_last."""
    B, C, H, W = x.shape
    HW = H * W
    block_c = triton.next_power_of_2(C)
    block_p = max(1, cfg.block // block_c)
    chunks = triton.cdiv(HW, block_p)
    y = torch.empty_like(x)
    _apply_nhwc_kernel[(B * chunks,)](
        x, y, mean.float().contiguous(), rstd.float().contiguous(), weight.contiguous(), bias.contiguous(),
        x if x_bias is None else x_bias.contiguous(), HW, chunks, C=C, G=groups, SILU=silu,
        BLOCK_P=block_p, BLOCK_C=block_c, HAS_XB=x_bias is not None, num_warps=cfg.num_warps,
    )  # fmt: skip
    return y


def with_conv_bias(x: Tensor, x_bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(x, x_bias) as `group_stats` and `group_norm_apply` take them: the channels_last kernels fold x_bias in as
    they read x, so both stay as they are; for any other layout x + x_bias is made here and no bias is left.
    A caller making both calls prepares once, so that sum is not made twice."""
    if x_bias is None or _kernel_layout(x) == "nhwc":
        return x, x_bias
    return add_channel_bias(x, x_bias), None


def add_channel_bias(x: Tensor, bias: Tensor) -> Tensor:
    """x + bias[c] over dim 1, in x's dtype and memory format."""
    return x + bias.to(x.dtype).view(1, -1, *[1] * (x.dim() - 2))


def _kernel_layout(x: Tensor) -> str | None:
    """Which kernels take x: "nchw", "nhwc", or None for the torch code."""
    if not (is_available(x.device) and x.dtype in DTYPES and x.numel() > 0):
        return None
    if x.is_contiguous():  # first: with C == 1 or H*W == 1 a tensor is both, and the flat view is exact
        return "nchw"
    return "nhwc" if is_nhwc(x) else None


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

    @triton.jit
    def _stats_nhwc_kernel(
        X, partial, XB, HW, slice_len, splits,
        C: tl.constexpr, G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
        HAS_XB: tl.constexpr,
    ):  # fmt: skip
        """Program (b, s): per group, count, mean, M2 of pixels [s*slice_len, min(HW, (s+1)*slice_len)) of b.

        x is [B, HW, C] row-major. Each lane of a [BLOCK_P, BLOCK_C] tile runs its own Welford over the
        pixels it visits; the lanes are merged (Chan) over pixels into channels, then channels into groups.
        """
        b = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1)
        start = s.to(tl.int64) * slice_len
        n = tl.minimum(HW - start, slice_len)
        n_full = (n // BLOCK_P).to(tl.int32)
        rows = tl.arange(0, BLOCK_P)
        cols = tl.arange(0, BLOCK_C)
        col_ok = (cols < C)[None, :]  # padding of a C that is not a power of two
        ptrs = X + (b * HW + start) * C + rows[:, None] * C + cols[None, :]
        mean = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)  # per lane
        m2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for i in range(0, n_full):  # every lane sees its (i+1)-th pixel
            x = tl.load(ptrs, mask=col_ok, other=0.0).to(tl.float32)
            delta = x - mean
            mean += delta * (1.0 / (i + 1))
            m2 += delta * (x - mean)
            ptrs += BLOCK_P * C
        row_count = tl.full([BLOCK_P], 0, tl.float32) + n_full
        tail = (n - n_full * BLOCK_P).to(tl.int32)
        if tail > 0:
            valid = (rows < tail)[:, None] & col_ok
            x = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
            delta = tl.where(valid, x - mean, 0.0)
            mean += delta * (1.0 / (n_full + 1))
            m2 += delta * (x - mean)
            row_count += (rows < tail).to(tl.float32)
        # lanes -> channels: every channel has seen the same n pixels (padded lanes hold zeros)
        count_c = n.to(tl.float32)
        mean_c = tl.sum(row_count[:, None] * mean, 0) / count_c  # [BLOCK_C]
        dev = mean - mean_c[None, :]
        m2_c = tl.sum(m2 + row_count[:, None] * dev * dev, 0)
        if HAS_XB:  # x + bias: every value of a channel shifts by its bias; its spread stays
            mean_c += tl.load(XB + cols, mask=cols < C, other=0.0).to(tl.float32)
        # channels -> groups, through a [BLOCK_C, BLOCK_G] membership mask (any C, padded or not; a padded
        # channel c >= C falls in a group >= G, which is never stored). Equal counts: the group mean is the
        # plain average of its channel means.
        per_group: tl.constexpr = C // G
        groups = tl.arange(0, BLOCK_G)
        member = (cols // per_group)[:, None] == groups[None, :]
        mean_g = tl.sum(tl.where(member, mean_c[:, None], 0.0), 0) / per_group  # [BLOCK_G]
        dev_c = mean_c - tl.sum(tl.where(member, mean_g[None, :], 0.0), 1)  # channel mean - its group's
        m2_g = tl.sum(tl.where(member, (m2_c + count_c * dev_c * dev_c)[:, None], 0.0), 0)
        out = (b * G + groups) * splits + s
        stride = tl.num_programs(0).to(tl.int64) * G * splits
        stored = groups < G
        tl.store(partial + out, tl.full([BLOCK_G], 0, tl.float32) + count_c * per_group, mask=stored)
        tl.store(partial + stride + out, mean_g, mask=stored)
        tl.store(partial + 2 * stride + out, m2_g, mask=stored)

    @triton.jit
    def _apply_nhwc_kernel(
        X, Y, MEAN, RSTD, W, Bias, XB, HW, chunks,
        C: tl.constexpr, G: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_XB: tl.constexpr,
    ):  # fmt: skip
        """Program p: pixels [chunk*BLOCK_P, (chunk+1)*BLOCK_P) of sample p // chunks, all channels."""
        pid = tl.program_id(0)
        b = pid // chunks
        chunk = pid % chunks
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        g = b * G + cols // (C // G)
        mean = tl.load(MEAN + g, mask=col_ok, other=0.0)
        if HAS_XB:  # (x + xb_c) - mean = x - (mean - xb_c)
            mean -= tl.load(XB + cols, mask=col_ok, other=0.0).to(tl.float32)
        scale = tl.load(RSTD + g, mask=col_ok, other=0.0) * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        shift = tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)
        first = chunk * BLOCK_P
        rows = tl.arange(0, BLOCK_P)
        valid = (first + rows < HW)[:, None] & col_ok[None, :]
        offs = (b.to(tl.int64) * HW + first) * C + rows[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=valid)
