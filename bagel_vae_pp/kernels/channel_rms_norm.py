"""Wan's RMS norm over channels (then SiLU) in one pass over a channels-innermost map.

`F.normalize(x, dim=1) * sqrt(C) * gamma` then `silu` is five passes over the activation in torch (the norm, the
division, two products, the SiLU), each rounding to the activation's dtype. Here each position's C channels are one
contiguous row (NDHWC videos, NHWC frames): one read, the sum of squares, the scale and the SiLU in fp32, one write
and one rounding. x / max(|x|, 1e-12) as F.normalize does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import is_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

EPS = 1e-12  # F.normalize's default
ELEMENTS = 8192  # per program: rows x padded channels
HALF_OR_FP32 = (torch.bfloat16, torch.float16, torch.float32)  # float64 (references) keeps the torch path


def channels_innermost(x: Tensor) -> bool:
    """A dense map whose C channels of each position are one contiguous row (and C > 1)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return x.dim() in formats and x.shape[1] > 1 and x.is_contiguous(memory_format=formats[x.dim()])


def channel_rms_norm(x: Tensor, gamma: Tensor, silu: bool = False) -> Tensor:
    """x / |x| over dim 1, times sqrt(C) * gamma (then SiLU), in x's shape, dtype and layout.

    Args:
        x: [B, C, ...] activations.
        gamma: C gains (any shape with C elements, as the checkpoints hold them: [C, 1, 1(, 1)]).
    """
    C = x.shape[1]
    if not (is_available(x.device) and x.dtype in HALF_OR_FP32 and channels_innermost(x) and x.numel() > 0):
        y = F.normalize(x, dim=1) * C**0.5 * gamma
        return F.silu(y) if silu else y
    y = torch.empty_like(x)  # preserves the channels-innermost strides
    rows = x.numel() // C
    block_c = triton.next_power_of_2(C)
    block_m = max(1, ELEMENTS // block_c)
    _channel_rms_norm_kernel[(triton.cdiv(rows, block_m),)](
        x, gamma.reshape(C), y, rows, C, C**0.5, EPS, SILU=silu, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=8
    )
    return y


if triton is not None:

    @triton.jit
    def _channel_rms_norm_kernel(
        X, G, Y, rows, C, scale, eps, SILU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr
    ):  # noqa: E501
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_C)
        valid = (r < rows)[:, None] & (c < C)[None, :]
        offs = r[:, None] * C + c[None, :]
        x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
        norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
        g = tl.load(G + c, mask=c < C, other=0.0).to(tl.float32)
        y = x * (scale / norm)[:, None] * g[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=valid)
