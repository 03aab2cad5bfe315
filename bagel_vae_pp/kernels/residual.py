"""The resnet block's closing sum, skip + h + bias, as one pass written over h.

The convolutions of a resnet block run without their bias (cuDNN adds a bias in a pass of its own over a
channels_last output, at a third of the memory bandwidth; 11% of a 4096² decode band on an H200): the first
conv's bias goes into the GroupNorm after it (`group_norm.py`, x_bias), the second's here, added while the
skip connection is, so neither costs a pass. Exact in fp32 arithmetic up to the order of the two adds.
"""

from __future__ import annotations

from torch import Tensor

from . import is_available, is_nhwc

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK, WARPS = 4096, 8


def residual_add_(h: Tensor, skip: Tensor, bias: Tensor | None) -> Tensor:
    """h = skip + h + bias[c] in place (fp32 arithmetic, one rounding to h's dtype); returns h.

    Args:
        h: [B, C, H, W], the block's last conv output without its bias.
        skip: same shape, dtype and memory format as h (NCHW-contiguous or channels_last).
        bias: [C] or None.
    """
    assert h.shape == skip.shape and h.dtype == skip.dtype, (h.shape, skip.shape, h.dtype, skip.dtype)
    nhwc = is_nhwc(h)
    same_layout = h.is_contiguous() and skip.is_contiguous() or nhwc and skip.stride() == h.stride()
    if not (is_available(h.device) and same_layout and h.numel() > 0):
        h += skip
        if bias is not None:
            h += bias.to(h.dtype).view(1, -1, *[1] * (h.dim() - 2))
        return h
    C = h.shape[1]
    HW = h[0, 0].numel()
    n = h.numel()
    _residual_kernel[(triton.cdiv(n, BLOCK),)](
        h, skip, h if bias is None else bias.contiguous(), n, C, HW,
        NHWC=nhwc, HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=WARPS,
    )  # fmt: skip
    return h


if triton is not None:

    @triton.jit
    def _residual_kernel(H, S, Bias, n, C, HW, NHWC: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        y = tl.load(H + offs, mask=valid, other=0.0).to(tl.float32) + tl.load(S + offs, mask=valid, other=0.0)
        if HAS_BIAS:
            c = offs % C if NHWC else (offs // HW) % C
            y += tl.load(Bias + c, mask=valid, other=0.0).to(tl.float32)
        tl.store(H + offs, y.to(H.dtype.element_ty), mask=valid)
