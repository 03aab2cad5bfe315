"""Wan's fused RMS norm (+ SiLU) kernel against a float64 reference written here, under Triton's interpreter.

The reference: x / max(|x|, 1e-12) over channels, times sqrt(C) * gamma, then x * sigmoid(x); the kernel computes
in fp32 and rounds once, so it lands within an ulp of the float64 result (`assert_rounded_from`). Channel counts
that are not powers of two (a padded, masked row) and several programs with a ragged last one.
"""

import pytest
import torch
from kernel_refs import assert_rounded_from, interpreted_kernels, needs_triton  # noqa: F401

from bagel_vae_pp import kernels


def rms64(x, gamma, silu):
    x = x.double()
    norm = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    y = x / norm * x.shape[1] ** 0.5 * gamma.double().reshape(1, -1, *[1] * (x.dim() - 2))
    return y * torch.sigmoid(y) if silu else y


def draw(shape, dtype, fmt):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    gamma = (1 + 0.3 * torch.randn(shape[1], *[1] * (len(shape) - 2), generator=gen)).to(dtype)
    return x, gamma


@needs_triton
class TestKernel:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("silu", [False, True])
    @pytest.mark.parametrize(
        "shape, fmt",
        [((1, 96, 3, 5, 7), torch.channels_last_3d), ((2, 20, 2, 3, 4), torch.channels_last_3d),
         ((3, 384, 4, 5), torch.channels_last)],
    )  # fmt: skip
    def test_matches_fp64(self, interp, monkeypatch, dtype, silu, shape, fmt):
        monkeypatch.setattr(interp.channel_rms_norm, "ELEMENTS", 1024)  # several programs, a ragged last one
        x, gamma = draw(shape, dtype, fmt)
        y = interp.channel_rms_norm.channel_rms_norm(x, gamma, silu)
        assert y.is_contiguous(memory_format=fmt) and y.dtype == dtype
        assert_rounded_from(y, rms64(x, gamma, silu))

    def test_a_zero_position_stays_zero(self, interp):
        x, gamma = draw((1, 8, 2, 3, 3), torch.float32, torch.channels_last_3d)
        x[:, :, 1, 2, 0] = 0
        y = interp.channel_rms_norm.channel_rms_norm(x, gamma, True)
        assert torch.isfinite(y).all() and (y[:, :, 1, 2, 0] == 0).all()


@pytest.mark.parametrize("silu", [False, True])
def test_fallback_matches_fp64_in_any_layout(silu):
    """CPU without the interpreter (and NCDHW or a strided band anywhere): the plain torch computation."""
    x, gamma = draw((1, 12, 3, 6, 5), torch.float32, torch.contiguous_format)
    band = x.contiguous(memory_format=torch.channels_last_3d)[:, :, :, 1:4]  # channels innermost, not dense
    for t in (x, band):
        torch.testing.assert_close(kernels.channel_rms_norm(t, gamma, silu), rms64(t, gamma, silu).float())
