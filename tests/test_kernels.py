"""The memory-bound kernels (GroupNorm statistics / apply in NCHW and NHWC, a conv's bias folded into them or into
the residual sum, the sub-pixel upsample's phase interleave) against float64 references written here.

The kernel classes run the real kernels on CPU tensors through Triton's interpreter (`kernel_refs.interp`); the
fallback tests always run. Inputs are fresh random draws with non-zero means (randn * 3 + 2 and the like), so a
wrong mean or variance shows.
"""

import pytest
import torch
from kernel_refs import (  # noqa: F401
    apply64,
    assert_rounded_from,
    channels_last,
    interpreted_kernels,
    needs_triton,
    norm64,
    stats64,
)

from bagel_vae_pp import kernels


def assert_stats_match_fp64(gn, x, groups, mean_tol, var_tol):
    """The kernel statistics of x (config b2048w4): fp32 [B, G] each, within (rtol, atol) of float64."""
    mean, var = gn.group_stats(x, groups, config="b2048w4")
    ref_mean, ref_var = stats64(x, groups)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (x.shape[0], groups)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=mean_tol[0], atol=mean_tol[1])
    torch.testing.assert_close(var.double(), ref_var, rtol=var_tol[0], atol=var_tol[1])


@needs_triton
class TestGroupNormKernels:
    """The Triton GroupNorm statistics and apply under the interpreter."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("shape, groups, programs", [((2, 64, 7, 9), 32, 4096), ((1, 8, 40, 50), 2, 3)])
    def test_stats_match_fp64(self, interp, monkeypatch, dtype, shape, groups, programs):
        """Several blocks per program plus a ragged tail (programs=3), and one program per tiny group."""
        gn = interp.group_norm
        monkeypatch.setattr(gn, "STATS_PROGRAMS", programs)
        torch.manual_seed(sum(shape) + programs)
        x = (torch.randn(shape) * 3 + 2).to(dtype)
        assert_stats_match_fp64(gn, x, groups, (1e-5, 1e-5), (1e-5, 1e-5))

    def test_stats_large_mean_small_spread(self, interp, monkeypatch):
        """mean 1000, std 0.01: a sum of squares in fp32 would lose every digit of the variance."""
        gn = interp.group_norm
        monkeypatch.setattr(gn, "STATS_PROGRAMS", 2)
        torch.manual_seed(11)
        x = torch.randn(1, 4, 64, 80) * 0.01 + 1000
        assert_stats_match_fp64(gn, x, 2, (1e-6, 0), (1e-3, 0))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("silu", [False, True])
    def test_apply_matches_fp64(self, interp, dtype, silu):
        torch.manual_seed(5 + int(silu))
        B, C, H, W, G = 2, 16, 13, 21, 4  # 273 pixels a plane: the last block of 2048 is ragged
        x = (torch.randn(B, C, H, W) * 3 + 2).to(dtype)
        mean, var = stats64(x, G)
        mean, rstd = mean.float(), torch.rsqrt(var.float() + 1e-6)
        w = (torch.randn(C) + 1).to(dtype)
        b = torch.randn(C).to(dtype)
        out = interp.kernels.group_norm_apply(x, mean, rstd, w, b, G, silu=silu, config="b2048w4")
        assert out.dtype == dtype and out.shape == x.shape
        assert_rounded_from(out, apply64(x, mean, rstd, w, b, G, silu))

    def test_apply_without_affine(self, interp):
        torch.manual_seed(9)
        x = torch.randn(1, 8, 5, 7) * 2 - 1
        mean, var = stats64(x, 2)
        rstd = torch.rsqrt(var.float() + 1e-6)
        out = interp.kernels.group_norm_apply(x, mean.float(), rstd, None, None, 2)
        assert_rounded_from(out, apply64(x, mean, rstd, torch.ones(8), torch.zeros(8), 2, False))


@needs_triton
class TestGroupNormKernelsNHWC:
    """The channels_last GroupNorm kernels under the interpreter: [pixels, C] tiles, groups sorted per program."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    @pytest.mark.parametrize(
        "shape, groups, programs",
        [
            ((2, 64, 7, 9), 32, 2),  # one full step of 32 pixels and a ragged tail
            ((2, 128, 13, 21), 8, 3),  # two slices a sample, 144 + 129 pixels at 16 a step: 1-pixel tail
            ((2, 32, 10, 30), 32, 2),  # one channel per group
            ((1, 96, 5, 11), 32, 4096),  # C not a power of two: padded to 128, 3 channels per group; 4 slices
            ((1, 48, 9, 10), 8, 2),  # padded, 6 channels per group
        ],
    )
    def test_stats_match_fp64(self, interp, monkeypatch, dtype, shape, groups, programs):
        gn = interp.group_norm
        monkeypatch.setattr(gn, "STATS_PROGRAMS", programs)
        torch.manual_seed(sum(shape) + programs)
        x = channels_last((torch.randn(shape) * 3 + 2).to(dtype))
        assert gn._kernel_layout(x) == "nhwc"
        assert_stats_match_fp64(gn, x, groups, (1e-5, 1e-5), (1e-5, 1e-5))

    def test_stats_large_mean_small_spread(self, interp, monkeypatch):
        """mean 1000, std 0.01: a sum of squares in fp32 would lose every digit of the variance."""
        gn = interp.group_norm
        monkeypatch.setattr(gn, "STATS_PROGRAMS", 2)
        torch.manual_seed(12)
        x = channels_last(torch.randn(1, 64, 24, 40) * 0.01 + 1000)
        assert_stats_match_fp64(gn, x, 8, (1e-6, 0), (1e-3, 0))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    @pytest.mark.parametrize("silu", [False, True])
    def test_apply_matches_fp64(self, interp, dtype, silu):
        torch.manual_seed(15 + int(silu))
        B, C, H, W, G = 2, 64, 13, 21, 8  # 273 pixels: the last tile of 32 is ragged
        x = channels_last((torch.randn(B, C, H, W) * 3 + 2).to(dtype))
        mean, var = stats64(x, G)
        mean, rstd = mean.float(), torch.rsqrt(var.float() + 1e-6)
        w = (torch.randn(C) + 1).to(dtype)
        b = torch.randn(C).to(dtype)
        out = interp.kernels.group_norm_apply(x, mean, rstd, w, b, G, silu=silu, config="b2048w4")
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
        assert_rounded_from(out, apply64(x, mean, rstd, w, b, G, silu))

    def test_apply_writes_every_element(self, interp, monkeypatch):
        """Output poisoned with NaN; padded channels (C = 96) and a ragged last tile must not leave holes."""
        monkeypatch.setattr(torch, "empty_like", lambda t: torch.full_like(t, float("nan")))
        torch.manual_seed(17)
        B, C, H, W, G = 2, 96, 7, 5, 32
        x = channels_last(torch.randn(B, C, H, W) * 2 + 1)
        mean, var = stats64(x, G)
        mean, rstd = mean.float(), torch.rsqrt(var.float() + 1e-6)
        w, b = torch.randn(C) + 1, torch.randn(C)
        out = interp.kernels.group_norm_apply(x, mean, rstd, w, b, G, silu=True, config="b2048w4")
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.isnan().any()
        assert_rounded_from(out, apply64(x, mean, rstd, w, b, G, True))

    def test_apply_without_affine(self, interp):
        torch.manual_seed(19)
        x = channels_last(torch.randn(1, 32, 5, 7) * 2 - 1)
        mean, var = stats64(x, 8)
        rstd = torch.rsqrt(var.float() + 1e-6)
        out = interp.kernels.group_norm_apply(x, mean.float(), rstd, None, None, 8)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_rounded_from(out, apply64(x, mean, rstd, torch.ones(32), torch.zeros(32), 8, False))

    def test_both_layouts_end_to_end(self, interp):
        """The same bf16 values in NCHW and NHWC: statistics and output of each layout's kernels against float64."""
        torch.manual_seed(23)
        x = (torch.randn(1, 32, 6, 7) * 3 + 2).bfloat16()
        norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
        torch.nn.init.normal_(norm.weight, 1.0), torch.nn.init.normal_(norm.bias)
        ref = norm64(norm, x, silu=True)
        for t in (x, channels_last(x)):
            mean, var = interp.kernels.group_stats(t, 8)
            out = interp.kernels.group_norm_apply(t, mean, torch.rsqrt(var + 1e-6), norm.weight, norm.bias, 8, True)
            assert out.stride() == t.stride()
            assert_rounded_from(out, ref)

    def test_dispatch(self, interp):
        """C == 1 or H*W == 1 is contiguous both ways and keeps the NCHW kernels; other strides take torch."""
        layout = interp.group_norm._kernel_layout
        x = torch.randn(2, 8, 4, 6)
        assert layout(x) == "nchw" and layout(channels_last(x)) == "nhwc"
        assert layout(channels_last(torch.randn(2, 1, 4, 6))) == "nchw"
        assert layout(channels_last(torch.randn(2, 8, 1, 1))) == "nchw"
        assert layout(x.transpose(2, 3)) is None and layout(x.double()) is None
        assert layout(torch.randn(2, 8, 5)) == "nchw" and layout(torch.randn(2, 8, 5).transpose(1, 2)) is None


class TestFallbacks:
    """Without Triton or off the interpreter, CPU tensors take the torch code."""

    @pytest.fixture(autouse=True)
    def plain_cpu(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not kernels.is_available("cpu")

    @pytest.mark.parametrize("layout", ["nchw", "nhwc"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_group_norm_matches_fp64(self, layout, dtype):
        torch.manual_seed(22)
        B, C, G = 2, 32, 8
        x = (torch.randn(B, C, 9, 10) * 3 + 2).to(dtype)
        x = channels_last(x) if layout == "nhwc" else x
        w, b = torch.randn(C) + 1, torch.randn(C)
        mean, var = kernels.group_stats(x, G)
        mean64, var64 = stats64(x, G)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-6)
        out = kernels.group_norm_apply(x, mean, torch.rsqrt(var + 1e-6), w, b, G, silu=True)
        assert out.stride() == x.stride()
        assert_rounded_from(out, apply64(x, mean64, 1 / torch.sqrt(var64 + 1e-6), w, b, G, True))

    def test_groups_must_divide_channels(self):
        x = torch.randn(1, 12, 4, 4)
        with pytest.raises(ValueError, match="must divide"):
            kernels.group_stats(x, 5)
        with pytest.raises(ValueError, match="divisible by groups"):
            kernels.group_norm_apply(x, torch.zeros(1, 5), torch.ones(1, 5), None, None, 5)


@needs_triton
class TestConvBiasKernels:
    """A conv's bias left out of its output and folded into the next GroupNorm, or the residual sum, instead."""

    @pytest.mark.parametrize("layout", ["nhwc", "nchw"])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_norm_of_x_plus_bias(self, interp, monkeypatch, layout, dtype):
        monkeypatch.setattr(interp.group_norm, "STATS_PROGRAMS", 3)
        torch.manual_seed(29)
        B, C, H, W, G = 2, 64, 9, 13, 8
        x = (torch.randn(B, C, H, W) * 3 + 2).to(dtype)
        x = channels_last(x) if layout == "nhwc" else x
        xb = torch.randn(C) * 4  # per-channel shifts large against the spread, as conv biases can be
        w, b = torch.randn(C) + 1, torch.randn(C)
        # channels_last folds the bias into the kernels exactly; NCHW adds it first, rounded to x's dtype
        ref = (x.double() + xb.double()[:, None, None]) if layout == "nhwc" else (x + xb.to(dtype)[:, None, None])
        mean, var = interp.kernels.group_stats(x, G, x_bias=xb)
        mean64, var64 = stats64(ref.double(), G)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-5)
        rstd = torch.rsqrt(var + 1e-6)
        out = interp.kernels.group_norm_apply(x, mean, rstd, w, b, G, silu=True, x_bias=xb)
        assert out.dtype == dtype and out.stride() == x.stride()
        assert_rounded_from(out, apply64(ref, mean, rstd, w, b, G, True))

    def test_the_bias_is_added_once_where_the_kernels_cannot_fold_it(self, interp):
        x, xb = torch.randn(1, 8, 3, 4), torch.randn(8)
        folded, bias = interp.kernels.with_conv_bias(channels_last(x), xb)
        assert torch.equal(folded, channels_last(x)) and bias is xb  # channels_last: left to the kernels
        summed, bias = interp.kernels.with_conv_bias(x, xb)
        assert bias is None and torch.equal(summed, x + xb[:, None, None])

    @pytest.mark.parametrize("layout", ["nhwc", "nchw"])
    @pytest.mark.parametrize("with_bias", [True, False])
    def test_residual_add(self, interp, layout, with_bias):
        torch.manual_seed(31)
        h, skip = (torch.randn(2, 48, 5, 7).bfloat16() for _ in range(2))
        h, skip = (channels_last(h), channels_last(skip)) if layout == "nhwc" else (h, skip)
        bias = torch.randn(48) if with_bias else None
        ref = h.double() + skip.double() + (bias.double()[:, None, None] if with_bias else 0)
        out = interp.kernels.residual_add_(h, skip, bias)
        assert out.data_ptr() == h.data_ptr() and out.stride() == skip.stride()
        assert_rounded_from(out, ref)

    def test_residual_add_mixed_layouts_take_torch(self, interp):
        h, skip = channels_last(torch.randn(1, 8, 3, 4)), torch.randn(1, 8, 3, 4)
        bias = torch.randn(8)
        ref = h.double() + skip.double() + bias.double()[:, None, None]
        assert_rounded_from(interp.kernels.residual_add_(h, skip, bias), ref)


def interleave64(z, bias):
    """Y[b, c, 2i+a, 2j+bb] = Z[b, (2a+bb)*Co + c, i+a, j+bb] + bias[c], in float64."""
    B, C4, H1, W1 = z.shape
    Co, H, W = C4 // 4, H1 - 1, W1 - 1
    y = torch.empty(B, Co, 2 * H, 2 * W, dtype=torch.float64)
    for a in (0, 1):
        for bb in (0, 1):
            phase = 2 * a + bb
            y[:, :, a::2, bb::2] = z[:, phase * Co : (phase + 1) * Co, a : a + H, bb : bb + W].double()
    return y if bias is None else y + bias.double()[:, None, None]


@needs_triton
class TestInterleaveKernel:
    """The sub-pixel upsample's phase interleave (+ bias): the kernel (channels_last) and the torch path."""

    @pytest.mark.parametrize("Co, H, W", [(8, 3, 5), (48, 2, 7), (3, 1, 1)])  # Co = 48, 3: padded channel tiles
    @pytest.mark.parametrize("with_bias", [True, False])
    @pytest.mark.parametrize("layout", ["nhwc", "nchw"])
    def test_matches_fp64(self, interp, monkeypatch, Co, H, W, with_bias, layout):
        torch.manual_seed(Co + H)
        z = torch.randn(2, 4 * Co, H + 1, W + 1)
        z = channels_last(z) if layout == "nhwc" else z
        bias = torch.randn(Co) if with_bias else None
        empty = torch.empty
        monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))  # no holes
        out = interp.kernels.interleave_phases(z, bias)
        assert interp.kernels.is_nhwc(out) == (layout == "nhwc") and not out.isnan().any()
        assert_rounded_from(out, interleave64(z, bias))
