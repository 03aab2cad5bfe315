"""fp32 -> bf16 rounding to nearest even, done on the fp32 bits with integer operations.

The fused layer kernels (rms_norm.py, qk_norm_rope.py, swiglu.py) round to bf16 where torch does, in the middle of
their arithmetic as well as at the store. A GPU casts fp32 to bf16 to nearest even, as torch does everywhere;
Triton's interpreter truncates. Rounding in integers gives the GPU's result in both, so the interpreted tests check
the GPU's arithmetic bit for bit. The result stays fp32, exactly a bf16 value: it feeds further fp32 arithmetic, and
the final cast to bf16 is exact under either rounding. Finite inputs (a NaN with only low mantissa bits would come
out as an infinity; the layers never hold one).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def round_bf16(y):
        """fp32 y -> the nearest bf16 value (ties to even), as fp32."""
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # add half an ulp (less one if the kept lsb is 0)
        return bits.to(tl.float32, bitcast=True)
