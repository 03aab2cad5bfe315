"""The sub-pixel upsample's last step: its four phase maps interleaved into the 2x image, plus the conv's bias.

`sharded.upsample_conv` computes nearest-2x + 3x3 conv as one 2x2 conv with 4*Co outputs, Z [B, 4Co, H+1, W+1],
with Y[2i+a, 2j+b] = Z[phase 2a+b][i+a, j+b]. A strided torch copy interleaves that at a fraction of the memory
bandwidth and the bias costs another pass; for channels_last maps this kernel does both in one pass, each output
pixel reading one contiguous run of Co channels of Z.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import is_available, is_nhwc

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK, WARPS = 4096, 8  # elements of a [pixels, padded Co] tile


def interleave_phases(z: Tensor, bias: Tensor | None) -> Tensor:
    """Y [B, Co, 2H, 2W] with Y[b, c, 2i+a, 2j+bb] = Z[b, (2a+bb)*Co + c, i+a, j+bb] + bias[c].

    Args:
        z: [B, 4*Co, H+1, W+1], phase-major channels; channels_last takes the kernel, other layouts torch.
        bias: [Co] or None.
    Returns Y in z's memory format (channels_last, or contiguous).
    """
    B, C4, H1, W1 = z.shape
    Co, H, W = C4 // 4, H1 - 1, W1 - 1
    nhwc = is_nhwc(z)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    y = torch.empty(B, Co, 2 * H, 2 * W, dtype=z.dtype, device=z.device, memory_format=fmt)
    if not (nhwc and is_available(z.device) and y.numel() > 0):
        sB, sC, sH, sW = z.stride()  # element (b, c, i, a, j, bb) reads Z[b, (2a+bb)*Co + c, i+a, j+bb]
        phases = z.as_strided((B, Co, H, 2, W, 2), (sB, sC, sH, sH + 2 * Co * sC, sW, sW + Co * sC))
        y.view(B, Co, H, 2, W, 2).copy_(phases)
        if bias is not None:
            y += bias.to(y.dtype).view(1, Co, 1, 1)
        return y
    block_c = triton.next_power_of_2(Co)
    block_p = max(1, BLOCK // block_c)
    pixels = B * 4 * H * W
    _interleave_kernel[(triton.cdiv(pixels, block_p),)](
        z, y, y if bias is None else bias.contiguous(), pixels, H, W,
        Co=Co, HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=WARPS,
    )  # fmt: skip
    return y


if triton is not None:

    @triton.jit
    def _interleave_kernel(
        Z, Y, Bias, pixels, H, W,
        Co: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Program p: output pixels [p*BLOCK_P, (p+1)*BLOCK_P) of Y's [B*2H*2W] pixels, all Co channels."""
        pix = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        cols = tl.arange(0, BLOCK_C)
        valid = (pix < pixels)[:, None] & (cols < Co)[None, :]
        x = pix % (2 * W)
        rest = pix // (2 * W)
        y = rest % (2 * H)
        b = rest // (2 * H)
        a, bb = y % 2, x % 2
        src = ((b * (H + 1) + y // 2 + a) * (W + 1) + x // 2 + bb) * (4 * Co) + (2 * a + bb) * Co  # [BLOCK_P]
        v = tl.load(Z + src[:, None] + cols[None, :], mask=valid, other=0.0)
        if HAS_BIAS:
            v = v.to(tl.float32) + tl.load(Bias + cols, mask=cols < Co, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + pix[:, None] * Co + cols[None, :], v.to(Y.dtype.element_ty), mask=valid)
