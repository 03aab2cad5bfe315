"""BAGEL's q/k RMSNorm per head followed by RoPE, one read and one write of q (or k), in place (bagel/llm.py
`Attention.attend`).

The torch path: F.rms_norm over each head vector (fp32, rounded), the weight multiply (rounded), then RoPE as
x * cos (rounded) plus two addcmul passes over the halves (rotate_half(x) * sin added in fp32, rounded): five
passes over q, ~20 bytes of traffic per bf16 element. Here a program holds a block of head vectors [R, Dh] and
reads each twice, as itself and rotated by half (the second read comes from cache), so that every output element
finds its partner's normalised value, and writes the result over its input: 4 bytes per element. The output keeps
the [N, H, Dh] layout the attention call takes as it is (llm.py passes q.transpose(0, 1) to SDPA, a view).

Roundings are torch's, at the same places (kernels/rounding.py): n = round(x * rstd), y = round(n * w),
out = round(round(y * cos) ± y_partner * sin); the products of bf16 values are exact in fp32 and the sum is rounded
to fp32 once, fused or not. As in rms_norm.py only rstd may differ from torch's in its last bits: the output is
torch's except where x * rstd lies within a few fp32 ulps of a bf16 tie (one bf16 ulp of n off there). fp32 runs the
same arithmetic without the bf16 roundings.
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
TILE = 2048  # elements per program: R = TILE // Dh head vectors


def qk_norm_rope_(
    t: Tensor, cos: Tensor, sin: Tensor, eps: float, w: Tensor, w_tail: Tensor | None = None, split: int | None = None
) -> Tensor:
    """t [N, H, Dh] <- RoPE(round(t * rsqrt(mean(t²) + eps)) * w) over each head vector, in place; returns t.

    Args:
        t: bf16 or fp32 q or k, contiguous, Dh even, on a device the kernels run on.
        cos, sin: RoPE tables [N, 1, Dh] (one row a token) or [1, 1, Dh] (one for all), in t's dtype.
        w, w_tail: [Dh] norm weights in t's dtype; tokens [split:] take w_tail (the generation expert's), the
            others w.
    """
    N, H, Dh = t.shape
    split = N if split is None else split
    w_tail = w if w_tail is None else w_tail
    assert is_available(t.device) and t.dtype in DTYPES and t.is_contiguous() and Dh % 2 == 0, (t.dtype, t.shape)
    assert cos.shape == sin.shape and cos.shape in ((N, 1, Dh), (1, 1, Dh)), (cos.shape, sin.shape, t.shape)
    assert cos.dtype == sin.dtype == w.dtype == w_tail.dtype == t.dtype, (cos.dtype, sin.dtype, w.dtype, t.dtype)
    if t.numel() == 0:
        return t
    block_d = triton.next_power_of_2(Dh)
    rows = max(1, TILE // block_d)
    table_stride = Dh if cos.shape[0] == N and N > 1 else 0
    _qk_norm_rope_kernel[(triton.cdiv(N * H, rows),)](
        t, cos.contiguous(), sin.contiguous(), w.contiguous(), w_tail.contiguous(), N * H, split * H, table_stride,
        eps, H=H, Dh=Dh, ROUND=t.dtype == torch.bfloat16, ROWS=rows, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return t


if triton is not None:

    @triton.jit
    def _norm_scale(x, rstd, w, ROUND: tl.constexpr):
        """round(round(x * rstd) * w), the Qwen2 norm with its two roundings."""
        n = x * rstd[:, None]
        if ROUND:
            n = round_bf16(n)
        y = n * w
        if ROUND:
            y = round_bf16(y)
        return y

    @triton.jit
    def _qk_norm_rope_kernel(T, Cos, Sin, W, W_tail, n_vectors, split_vector, table_stride, eps,
                             H: tl.constexpr, Dh: tl.constexpr, ROUND: tl.constexpr, ROWS: tl.constexpr,
                             BLOCK_D: tl.constexpr):  # fmt: skip
        v = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # head vectors, token-major: v = token*H + h
        d = tl.arange(0, BLOCK_D)
        half: tl.constexpr = Dh // 2
        partner = (d + half) % Dh  # rotate_half's source: out[:half] takes -x[half:], out[half:] takes x[:half]
        valid_d = d < Dh
        valid = (v < n_vectors)[:, None] & valid_d[None, :]
        x = tl.load(T + v[:, None] * Dh + d[None, :], mask=valid, other=0.0).to(tl.float32)  # [R, D]
        xp = tl.load(T + v[:, None] * Dh + partner[None, :], mask=valid, other=0.0).to(tl.float32)
        mean = tl.math.div_rn(tl.sum(x * x, axis=1), tl.full([ROWS], Dh, tl.float32))
        rstd = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.sqrt_rn(mean + eps))  # [R]
        tail = (v >= split_vector)[:, None]
        w = tl.where(tail, tl.load(W_tail + d, mask=valid_d, other=0.0)[None, :],
                     tl.load(W + d, mask=valid_d, other=0.0)[None, :]).to(tl.float32)  # fmt: skip
        wp = tl.where(tail, tl.load(W_tail + partner, mask=valid_d, other=0.0)[None, :],
                      tl.load(W + partner, mask=valid_d, other=0.0)[None, :]).to(tl.float32)  # fmt: skip
        y = _norm_scale(x, rstd, w, ROUND)
        yp = _norm_scale(xp, rstd, wp, ROUND)
        table = (v // H)[:, None] * table_stride + d[None, :]
        c = tl.load(Cos + table, mask=valid, other=0.0).to(tl.float32)
        s = tl.load(Sin + table, mask=valid, other=0.0).to(tl.float32)
        rotated = tl.where((d < half)[None, :], -yp, yp)
        out = y * c
        if ROUND:
            out = round_bf16(out)
        out = out + rotated * s  # rotated * s is exact in fp32 for bf16 operands: one rounding, fused or not
        if ROUND:
            out = round_bf16(out)
        tl.store(T + v[:, None] * Dh + d[None, :], out.to(T.dtype.element_ty), mask=valid)
