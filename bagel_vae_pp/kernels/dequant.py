"""FP8 (e4m3fn) weights with one scale per row -> a dense weight in the compute dtype, in one pass.

The fp8_e4m3fn weight dtype (bagel/quantize.py) upcasts each decoder Linear's weight when the layer runs. In torch
that is two passes over the weight (convert, then scale in place): 7 bytes of traffic per entry. This kernel reads
the FP8 byte and its row's scale and writes the product once: 3 bytes per entry (a 7B velocity pass upcasts both
experts, 13 G entries: ~91 GB of traffic down to ~39 GB).

The byte is decoded with integer operations (sign bit, 4 exponent bits of bias 7, 3 mantissa bits; exponent 0 is
subnormal, m * 2^-9), so neither the GPU nor Triton needs FP8 support (sm_80 and older run it). The arithmetic is
the torch path's: the exact e4m3 value times the fp32 scale, formed in fp32 and rounded once to the output dtype.
The NaN codes (0x7f, 0xff) are not decoded: quantization never writes them.
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

BLOCK, WARPS = 2048, 4


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q [N, K] float8_e4m3fn * scale [N] (fp32, per row) -> [N, K] in `dtype`, a new tensor.

    Args:
        q: the FP8 weight [out, in], row-major.
        scale: one fp32 scale per row.
        dtype: the output (compute) dtype.
    """
    assert q.dim() == 2 and scale.shape == q.shape[:1] and scale.dtype == torch.float32, (q.shape, scale.shape)
    if not (is_available(q.device) and q.is_contiguous() and q.numel() > 0):
        return q.to(dtype).mul_(scale[:, None])
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n = q.numel()
    _dequant_kernel[(triton.cdiv(n, BLOCK),)](q.view(torch.uint8), scale.contiguous(), out, n, q.shape[1],
                                              BLOCK=BLOCK, num_warps=WARPS)  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _dequant_kernel(Q, Scale, Out, n, K, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        b = tl.load(Q + offs, mask=valid, other=0).to(tl.int32)  # the e4m3fn byte
        e, m = (b >> 3) & 15, b & 7
        normal = ((e + 120) << 23) | (m << 20)  # fp32 bits of 2^(e - 7) * (1 + m / 8)
        value = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
        value = tl.where((b & 128) != 0, -value, value)
        s = tl.load(Scale + offs // K, mask=valid, other=0.0)
        tl.store(Out + offs, (value * s).to(Out.dtype.element_ty), mask=valid)
