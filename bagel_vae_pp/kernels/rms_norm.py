"""BAGEL's RMSNorm with its weight, one read and one write of each row (the decoder's input, post-attention and
final norms; bagel/experts.py `norm`).

The torch path makes two passes: F.rms_norm (x * rsqrt(mean(x²) + eps) in fp32, rounded to the model dtype), then
the weight multiply in place (rounded again), as Qwen2 does: 4 bytes of traffic per bf16 element twice. Here one
program holds one row: it reads it, and writes round(round(x * rstd) * w) with both roundings where torch has them
(kernels/rounding.py). Each expert scales its own rows: rows [:split] by w, rows [split:] by w_tail.

How close to torch: the product n * w of two bf16 values is exact in fp32, so the second rounding is torch's to the
bit; the first rounds x * rstd, and rstd (a sum of squares in some order, then a correctly rounded square root and
division) may differ from torch's in the last fp32 bits. So the output is torch's bit for bit except where x * rstd
lies within a few fp32 ulps of a bf16 tie, and there one bf16 ulp off (tests/test_fused_layers.py checks both).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import is_available

try:
    import triton
    import triton.language as tl

    from .rounding import round_bf16
except ImportError:
    triton = None

DTYPES = (torch.bfloat16, torch.float32)
MAX_D = 16384  # a row lives in registers


def rms_norm(x: Tensor, eps: float, w: Tensor, w_tail: Tensor | None = None, split: int | None = None) -> Tensor:
    """round(x * rsqrt(mean(x²) + eps)) * w over the last dim of x [N, ..., D], a new tensor like x.

    Args:
        x: bf16 or fp32, contiguous, D <= MAX_D, on a device the kernels run on.
        w, w_tail: [D] weights in x's dtype; x[split:] takes w_tail (the generation expert's), x[:split] w.
    """
    D = x.shape[-1]
    N = x.numel() // D  # rows
    split = N if split is None else split * (N // max(x.shape[0], 1))  # in rows
    w_tail = w if w_tail is None else w_tail
    assert is_available(x.device) and x.dtype in DTYPES and x.is_contiguous() and D <= MAX_D, (x.dtype, x.shape)
    assert w.shape == w_tail.shape == (D,) and w.dtype == w_tail.dtype == x.dtype, (w.shape, w_tail.shape, w.dtype)
    out = torch.empty_like(x)
    if N == 0:
        return out
    block = triton.next_power_of_2(D)
    warps = min(16, max(1, block // 512))  # 4096 wide: 16 fp32 values a thread
    _rms_norm_kernel[(N,)](x, w.contiguous(), w_tail.contiguous(), out, split, eps, D=D,
                           ROUND=x.dtype == torch.bfloat16, BLOCK=block, num_warps=warps)  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, W, W_tail, Out, split, eps, D: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        valid = offs < D
        x = tl.load(X + row.to(tl.int64) * D + offs, mask=valid, other=0.0).to(tl.float32)
        if row < split:
            w = tl.load(W + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            w = tl.load(W_tail + offs, mask=valid, other=0.0).to(tl.float32)
        mean = tl.math.div_rn(tl.sum(x * x, axis=0), tl.full([], D, tl.float32))
        rstd = tl.math.div_rn(
            tl.full([], 1.0, tl.float32), tl.sqrt_rn(mean + eps)
        )  # torch's rsqrt is 1 / sqrt, both correctly rounded
        n = x * rstd
        if ROUND:
            n = round_bf16(n)
        y = n * w
        if ROUND:
            y = round_bf16(y)
        tl.store(Out + row.to(tl.int64) * D + offs, y.to(Out.dtype.element_ty), mask=valid)
