"""Rows -> float8_e4m3fn with one fp32 scale per row (amax / 448), in one pass over the rows' memory.

The fp8_e4m3fn_fast weight dtype (bagel/quantize.py) quantizes every FP8 GEMM's activation per token. In torch
that is a reduction, a division into an fp32 temporary and a cast: ~13 bytes of traffic per bf16 element. This
kernel gives each program one row: it reads the row for its amax, then again (from L2) to divide, round and store
the byte: 5 bytes per element, and the row's scale.

Bit-identical to the torch path (`_torch_quantize_rows`): the same fp32 scale (the correctly rounded amax / 448;
1 for a zero row), the same fp32 quotient (t.float() / scale correctly rounded: tl.math.div_rn, as Triton's `/`
may be approximate on GPUs), and the same e4m3 rounding, to nearest even. The byte is encoded with integer
operations on the quotient's fp32 bits rather than by a float8e4nv cast: Triton's interpreter rounds that cast
half-up and truncates subnormals, so the tests could not check the GPU's cast, while the integer encoding is the
same code in both. Normal results (|q| >= 2^-6) drop 20 mantissa bits to nearest even (a carry moves into the
exponent as it should); subnormal ones are m * 2^-9 with m = |q| * 2^9 rounded to nearest even (m = 8 is the
smallest normal's code). A quotient never exceeds 448 * (1 + 2^-23), which rounds to 448: no saturation, no NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import is_available

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK, WARPS = 1024, 4
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def row_amax(t: Tensor) -> Tensor:
    """max |t| of each row of t [N, K], in fp32 [N]: one reduction, no |t| copy (a maximum is exact in any dtype)."""
    return torch.linalg.vector_norm(t, float("inf"), dim=1).float()


def row_scales(amax: Tensor) -> Tensor:
    """amax / 448 in fp32 [N] from row maxima amax [N]; 1 for a zero row (any positive scale represents it).

    The divisor is a tensor on amax's device: CUDA divides by a Python number through its rounded reciprocal,
    which misses the correctly rounded quotient (the CPU's, and the kernel's) in the last bit for half the rows.
    """
    amax = amax.float()
    return torch.where(amax > 0, amax / amax.new_full((), E4M3_MAX), 1.0)


@torch.no_grad()
def quantize_rows(t: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """t [N, K] -> (float8_e4m3fn [N, K], fp32 scales [N]) with t ~ q * scale[:, None], one scale per row.

    Args:
        t: the rows (a weight's output channels or an activation's tokens), bf16, fp16 or fp32.
        amax: the rows' maxima [N] when t holds only some columns of longer rows (a tensor-parallel shard of a
            weight split by input columns), so that scales and quotients are the whole rows'; by default t's own.
    The kernel runs on contiguous non-empty rows on a device it runs on; otherwise the torch path.
    """
    assert t.dim() == 2 and (amax is None or amax.shape == t.shape[:1]), (t.shape, None if amax is None else amax.shape)
    if not (is_available(t.device) and t.is_contiguous() and t.numel() > 0 and t.dtype in KERNEL_DTYPES):
        return _torch_quantize_rows(t, amax)
    N, K = t.shape
    q = torch.empty(N, K, dtype=FP8, device=t.device)
    scale = torch.empty(N, dtype=torch.float32, device=t.device)
    given = scale if amax is None else amax.float().contiguous()  # read only with HAS_AMAX
    _quant_kernel[(N,)](t, q.view(torch.uint8), scale, given, K, HAS_AMAX=amax is not None, BLOCK=BLOCK,
                        num_warps=WARPS)  # fmt: skip
    return q, scale


def _torch_quantize_rows(t: Tensor, amax: Tensor | None) -> tuple[Tensor, Tensor]:
    """The quotient is formed in fp32 by the division itself (t's dtype promoted to the scale's: one fp32
    temporary [N, K]) and rounded to e4m3."""
    scale = row_scales(row_amax(t) if amax is None else amax)  # [N]
    return (t / scale[:, None]).to(FP8), scale


if triton is not None:

    @triton.jit
    def _quant_kernel(T, Q, Scale, Amax, K, HAS_AMAX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t_row, q_row = T + row * K, Q + row * K
        if HAS_AMAX:
            amax = tl.load(Amax + row)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for k in range(0, K, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                acc = tl.maximum(acc, tl.abs(tl.load(t_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
            amax = tl.max(acc, axis=0)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full([], 448.0, tl.float32)), 1.0)
        tl.store(Scale + row, scale)
        for k in range(0, K, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            x = tl.load(t_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            bits = tl.math.div_rn(x, tl.full([BLOCK], 0.0, tl.float32) + scale).to(tl.int32, bitcast=True)
            u = bits & 0x7FFFFFFF  # |quotient|
            e = u >> 23  # biased fp32 exponent; 121 is 2^-6, e4m3's smallest normal
            normal = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) - (120 << 3)  # rebias 127 -> 7, 3 mantissa bits, RNE
            s = tl.minimum(tl.maximum(141 - e, 21), 31)  # |q| * 2^9 = significand >> s (s >= 25 rounds to 0)
            sig = (u & 0x7FFFFF) | 0x800000
            sub = (sig + ((1 << (s - 1)) - 1) + ((sig >> s) & 1)) >> s
            code = tl.where(e >= 121, normal, sub) | ((bits >> 24) & 0x80)  # the sign bit
            tl.store(q_row + offs, code.to(tl.uint8), mask=offs < K)
