"""Single-head attention with a wide head (the VAE mid-block's D = 512) as two GEMMs around a softmax.

A flash kernel keeps a [rows, D] fp32 accumulator in registers; at D = 512 that caps its tile at 64 query
rows and leaves no shared memory for pipelining (~190 TFLOP/s on an H200, against ~750 for a bf16 GEMM).
Here a block of queries at a time goes through cuBLAS instead: scores S = q k^T straight to fp32
(`torch.mm(..., out_dtype=float32)`), one Triton pass over S per row for its max and sum, a second that
writes the normalised probabilities P in the input dtype, then P v. The score block is materialised, so
its size is bounded by SCORE_BYTES; its traffic (10 bytes per score) is what this costs over the GEMMs.

Numerics: the softmax runs in fp32 on fp32 scores, P is rounded to bf16/fp16 for the second product (as a
flash kernel rounds P for its PV product), accumulation is fp32 in both GEMMs. Without CUDA the scores
come from an fp32 matmul and, without Triton, the softmax from torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import is_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

LOG2E = 1.4426950408889634
SCORE_BYTES = 2**30  # fp32 scores of one block of queries; the probabilities take half as much again
SOFTMAX_BLOCK, SOFTMAX_WARPS = 2048, 8


def gemm_attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None, score_bytes: int = SCORE_BYTES):
    """softmax(q k^T / sqrt(D)) v for q [B, Lq, D], k and v [B, L, D]; the result in q's dtype, [B, Lq, D]."""
    B, Lq, D = q.shape
    L = k.shape[1]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    rows = max(1, min(Lq, score_bytes // (4 * L)))
    scale = 1.0 / math.sqrt(D)
    for b in range(B):
        kt = k[b].transpose(0, 1)  # [D, L], a view: cuBLAS takes the transpose
        for a in range(0, Lq, rows):
            qb = q[b, a : a + rows]
            s = torch.mm(qb, kt, out_dtype=torch.float32) if qb.is_cuda else qb.float() @ kt.float()
            torch.mm(softmax_rows(s, scale, q.dtype), v[b], out=o[b, a : a + rows])
    return o


def softmax_rows(s: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """softmax(s * scale) over the last dim of fp32 scores s [n, L], computed in fp32, returned in `dtype`."""
    if not (is_available(s.device) and s.is_contiguous() and s.numel() > 0):
        return torch.softmax(s * scale, dim=-1).to(dtype)
    n, L = s.shape
    p = torch.empty((n, L), dtype=dtype, device=s.device)
    _softmax_rows_kernel[(n,)](s, p, L, scale * LOG2E, BLOCK=SOFTMAX_BLOCK, num_warps=SOFTMAX_WARPS)
    return p


if triton is not None:

    @triton.jit
    def _softmax_rows_kernel(S, P, L, scale_log2, BLOCK: tl.constexpr):
        """Program r: row r of S [n, L] -> P. Pass 1: per-lane running max and sum (exp2, scale folded in);
        pass 2: P = exp2(s * scale_log2 - max) / sum."""
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * L
        p_row = P + row * L
        offs = tl.arange(0, BLOCK)
        # a finite start: a lane that sees only masked (-inf) entries keeps exp2(-1e30 - max) = 0, never NaN
        m = tl.full([BLOCK], -1.0e30, tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, L, BLOCK):
            x = tl.load(s_row + start + offs, mask=start + offs < L, other=float("-inf")) * scale_log2
            m_new = tl.maximum(m, x)
            acc = acc * tl.exp2(m - m_new) + tl.exp2(x - m_new)
            m = m_new
        row_max = tl.max(m, 0)
        inv_sum = 1.0 / tl.sum(acc * tl.exp2(m - row_max), 0)
        for start in range(0, L, BLOCK):
            valid = start + offs < L
            x = tl.load(s_row + start + offs, mask=valid, other=float("-inf")) * scale_log2
            tl.store(p_row + start + offs, (tl.exp2(x - row_max) * inv_sum).to(P.dtype.element_ty), mask=valid)
