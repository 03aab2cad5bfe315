"""BAGEL's q/k RMSNorm per head followed by RoPE, one read and one write of q (or k) (bagel/experts.py
`norm_rope`, from llm.py `Attention.attend`).

The torch path: F.rms_norm over each head vector (fp32, rounded), the weight multiply (rounded), then RoPE as
x * cos (rounded) plus two addcmul passes over the halves (rotate_half(x) * sin added in fp32, rounded): five
passes over q, ~20 bytes of traffic per bf16 element. Here a program holds a block of head vectors [R, Dh] and
reads each twice, as itself and rotated by half (the second read comes from cache), so that every output element
finds its partner's normalised value, and writes the result: 4 bytes per element. The output keeps the [N, H, Dh]
layout the attention call takes as it is (llm.py passes q.transpose(0, 1) to SDPA, a view), over the input, or, given
an order of the tokens, gathered into that order: batched passes hand each pass's queries to SDPA as one slice
without the copy that would collect them (experts.Rows.by_pass).

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


def qk_norm_rope(
    t: Tensor,
    cos: Tensor,
    sin: Tensor,
    eps: float,
    w: Tensor,
    w_tail: Tensor | None = None,
    split: int | None = None,
    order: Tensor | None = None,
) -> Tensor:
    """RoPE(round(t * rsqrt(mean(t²) + eps)) * w) over each head vector of t [N, H, Dh]: written over t, or with
    `order` a new tensor whose token i is token order[i]'s.

    Args:
        t: bf16 or fp32 q or k, contiguous, Dh even, on a device the kernels run on.
        cos, sin: RoPE tables [N, 1, Dh] (t's tokens, t's order) or [1, 1, Dh] (one for all), in t's dtype.
        w, w_tail: [Dh] norm weights in t's dtype; tokens [split:] of t take w_tail (the generation expert's), the
            others w.
        order: int64 [N], a permutation of t's tokens.
    """
    N, H, Dh = t.shape
    split = N if split is None else split
    w_tail = w if w_tail is None else w_tail
    assert order is None or (order.shape == (N,) and order.dtype == torch.int64), (N, order)
    out = t if order is None else torch.empty_like(t)
    assert is_available(t.device) and t.dtype in DTYPES and t.is_contiguous() and Dh % 2 == 0, (t.dtype, t.shape)
    assert cos.shape == sin.shape and cos.shape in ((N, 1, Dh), (1, 1, Dh)), (cos.shape, sin.shape, t.shape)
    assert cos.dtype == sin.dtype == w.dtype == w_tail.dtype == t.dtype, (cos.dtype, sin.dtype, w.dtype, t.dtype)
    if t.numel() == 0:
        return out
    block_d = triton.next_power_of_2(Dh)
    rows = max(1, TILE // block_d)
    table_stride = Dh if cos.shape[0] == N and N > 1 else 0
    _qk_norm_rope_kernel[(triton.cdiv(N * H, rows),)](
        t, out, t if order is None else order.contiguous(), cos.contiguous(), sin.contiguous(), w.contiguous(),
        w_tail.contiguous(), N * H, split, table_stride, eps, H=H, Dh=Dh, HALF=Dh // 2, ORDERED=order is not None,
        ROUND=t.dtype == torch.bfloat16, ROWS=rows, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out


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
    def _qk_norm_rope_kernel(T, Out, Order, Cos, Sin, W, W_tail, n_vectors, split, table_stride, eps,
                             H: tl.constexpr, Dh: tl.constexpr, HALF: tl.constexpr, ORDERED: tl.constexpr,
                             ROUND: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        v = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # output head vectors: v = token*H + head
        token = v // H
        if ORDERED:
            token = tl.load(Order + token, mask=v < n_vectors, other=0)  # the input token it holds
        src = token * H + v % H
        d = tl.arange(0, BLOCK_D)
        partner = (d + HALF) % Dh  # rotate_half's source: out[:half] takes -x[half:], out[half:] takes x[:half]
        valid_d = d < Dh
        valid = (v < n_vectors)[:, None] & valid_d[None, :]
        x = tl.load(T + src[:, None] * Dh + d[None, :], mask=valid, other=0.0).to(tl.float32)  # [R, D]
        xp = tl.load(T + src[:, None] * Dh + partner[None, :], mask=valid, other=0.0).to(tl.float32)
        mean = tl.math.div_rn(tl.sum(x * x, axis=1), tl.full([ROWS], Dh, tl.float32))
        rstd = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.sqrt_rn(mean + eps))  # [R]
        tail = (token >= split)[:, None]
        w = tl.where(tail, tl.load(W_tail + d, mask=valid_d, other=0.0)[None, :],
                     tl.load(W + d, mask=valid_d, other=0.0)[None, :]).to(tl.float32)  # fmt: skip
        wp = tl.where(tail, tl.load(W_tail + partner, mask=valid_d, other=0.0)[None, :],
                      tl.load(W + partner, mask=valid_d, other=0.0)[None, :]).to(tl.float32)  # fmt: skip
        y = _norm_scale(x, rstd, w, ROUND)
        yp = _norm_scale(xp, rstd, wp, ROUND)
        table = token[:, None] * table_stride + d[None, :]
        c = tl.load(Cos + table, mask=valid, other=0.0).to(tl.float32)
        s = tl.load(Sin + table, mask=valid, other=0.0).to(tl.float32)
        rotated = tl.where((d < HALF)[None, :], -yp, yp)
        out = y * c
        if ROUND:
            out = round_bf16(out)
        out = out + rotated * s  # rotated * s is exact in fp32 for bf16 operands: one rounding, fused or not
        if ROUND:
            out = round_bf16(out)
        tl.store(Out + v[:, None] * Dh + d[None, :], out.to(Out.dtype.element_ty), mask=valid)
