"""SwiGLU's elementwise part, silu(gate) * up, in one pass written over gate (bagel/experts.py `swiglu`).

The torch path runs F.silu in place on the gate projection and then multiplies by the up projection in place: two
passes over [L, intermediate] (18944 wide in BAGEL), 10 bytes of traffic per bf16 element. Here: read both once,
write once, 6 bytes. The two GEMMs stay separate (the checkpoint keeps gate_proj and up_proj apart and FP8 layers
run their own GEMMs), so the kernel reads their two outputs.

Roundings are torch's: s = round(gate / (1 + exp(-gate))) in fp32, then round(s * up), whose product of two bf16
values is exact in fp32 (kernels/rounding.py). exp is Triton's here (on GPUs a hardware exp2 of a scaled argument)
and a math library's in torch: they may differ in the last fp32 bits, and so may s. The output is torch's except
where the SiLU lies within a few fp32 ulps of a bf16 tie (one bf16 ulp of s off there). fp32 skips the bf16
roundings.
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
BLOCK, WARPS = 4096, 8


def swiglu_(gate: Tensor, up: Tensor) -> Tensor:
    """gate <- silu(gate) * up, in place; returns gate.

    Args:
        gate, up: the two projections' outputs [L, hidden], bf16 or fp32, alike and contiguous, on a device the
            kernels run on.
    """
    assert is_available(gate.device) and gate.dtype in DTYPES, (gate.device, gate.dtype)
    assert gate.shape == up.shape and gate.dtype == up.dtype and gate.is_contiguous() and up.is_contiguous()
    n = gate.numel()
    if n:
        _swiglu_kernel[(triton.cdiv(n, BLOCK),)](gate, up, n, ROUND=gate.dtype == torch.bfloat16, BLOCK=BLOCK,
                                                  num_warps=WARPS)  # fmt: skip
    return gate


if triton is not None:

    @triton.jit
    def _swiglu_kernel(G, U, n, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
        s = tl.math.div_rn(g, 1.0 + tl.exp(-g))  # torch's x / (1 + exp(-x)), division correctly rounded
        if ROUND:
            s = round_bf16(s)
        y = s * u
        if ROUND:
            y = round_bf16(y)
        tl.store(G + offs, y.to(G.dtype.element_ty), mask=valid)
