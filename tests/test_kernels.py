"""Triton kernels (attention in three forms, GroupNorm statistics / apply) against float64 torch references.

The kernel tests run the real kernels on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)
and are skipped where Triton is not installed; the fallback tests always run. Inputs are fresh random
draws with non-zero means (randn * 3 + 2 and the like), so a wrong mean or variance shows.
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bagel_vae_pp import kernels
from bagel_vae_pp.kernels.gemm_attention import softmax_rows
from bagel_vae_pp.kernels.split_attention import LOG2E, pick_key_splits

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRETING),
    reason="triton is not installed (CI): only the fallbacks run"
    if not HAS_TRITON
    else "needs TRITON_INTERPRET=1 from the start: test_interpreted_kernels_in_subprocess runs these in a child",
)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def sdpa64(q, k, v):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def stats64(x, groups):
    var, mean = torch.var_mean(x.reshape(x.shape[0], groups, -1).double(), dim=-1, correction=0)
    return mean, var


def apply64(x, mean, rstd, w, b, groups, silu):
    B, C = x.shape[:2]
    y = x.double().reshape(B, groups, -1) - mean.double()[:, :, None]
    y = (y * rstd.double()[:, :, None]).reshape(x.shape) * w.double()[:, None, None] + b.double()[:, None, None]
    return F.silu(y) if silu else y


def _fp32_dot_for_bf16(create_dot):
    """Triton's interpreter multiplies bf16 tiles as their raw uint16 bits (3.6 and 3.9): widen them first."""

    def widened(self, a, b, d, *args):
        from triton.runtime.interpreter import TensorHandle

        def fp32(h):
            if h.data.dtype != np.uint16:  # bf16 is the only 16-bit type stored as uint16
                return h
            return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), d.dtype.scalar)

        return create_dot(self, fp32(a), fp32(b), d, *args)

    return widened


@pytest.fixture(scope="module")
def interp():
    """The kernels modules, with the interpreter's bf16 dot widened to fp32 for this module's tests.

    The interpreter also rounds fp32 -> bf16 toward zero (the GPU rounds to nearest even), so bf16 results
    here carry about twice the GPU's rounding error; the tolerances allow for it.
    """
    from triton.runtime.interpreter import InterpreterBuilder

    from bagel_vae_pp.kernels import group_norm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_dot", _fp32_dot_for_bf16(InterpreterBuilder.create_dot))
        yield kernels, group_norm


def test_interpreted_kernels_in_subprocess():
    """Triton picks the interpreter when it is imported, so the kernel classes run in a child with the flag set."""
    if not HAS_TRITON or INTERPRETING:
        pytest.skip("no triton (CI)" if not HAS_TRITON else "interpreting already: the kernel classes run here")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    select = "Kernel and not subprocess"  # every Test*Kernel* class
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", select]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


@needs_triton
class TestAttentionKernel:
    """The Triton attention under the interpreter."""

    @pytest.mark.parametrize(
        "D, Lq, L, config",
        [
            (64, 70, 45, None),
            (128, 64, 100, "m64n32w8s2"),
            (256, 33, 64, "m64n32w8s2c128"),
            (64, 130, 200, "m64n64w8s1"),
            (512, 64, 40, None),
            (512, 20, 72, "m64n32w8s2c128"),
        ],
    )
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_matches_fp64_sdpa(self, interp, D, Lq, L, config, dtype):
        torch.manual_seed(1000 * D + Lq + L)
        q = (torch.randn(2, 1, Lq, D) * 2 + 0.5).to(dtype)
        k = (torch.randn(2, 1, L, D) + 0.3).to(dtype)
        v = (torch.randn(2, 1, L, D) * 3 + 2).to(dtype)
        out = interp[0].attention(q, k, v, config=config)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, sdpa64(q, k, v)) < 1e-2

    def test_engine_layout_and_out_buffer(self, interp):
        """Token-contiguous views of NCHW maps (as `to_tokens` gives); out= is fully written, layout kept."""
        torch.manual_seed(7)
        C, H, W = 128, 6, 11
        maps = [(torch.randn(1, C, H, W) * 2 + 1).half() for _ in range(3)]
        q, k, v = (m.reshape(1, 1, C, H * W).transpose(-1, -2) for m in maps)  # [1, 1, 66, 128], stride 1 on L
        out = torch.full_like(q, float("nan"))
        got = interp[0].attention(q, k, v, out=out)
        assert got is out and not out.isnan().any()
        assert rel_err(out, sdpa64(q, k, v)) < 1e-2
        assert interp[0].attention(q, k, v).stride() == q.stride()
        three_d = interp[0].attention(q[:, 0].contiguous(), k[:, 0].contiguous(), v[:, 0].contiguous())  # [B, L, D]
        torch.testing.assert_close(three_d, out[:, 0])

    def test_large_scores_stay_finite(self, interp):
        """Scores of several hundred (softmax near one-hot) must not overflow the online rescale."""
        torch.manual_seed(3)
        q = (torch.randn(1, 1, 64, 64) * 8).half()
        k = (torch.randn(1, 1, 96, 64) * 8).half()
        v = torch.randn(1, 1, 96, 64).half()
        out = interp[0].attention(q, k, v, config="m64n32w8s2")
        assert out.isfinite().all() and rel_err(out, sdpa64(q, k, v)) < 1e-2


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
        gn = interp[1]
        monkeypatch.setattr(gn, "STATS_PROGRAMS", programs)
        torch.manual_seed(sum(shape) + programs)
        x = (torch.randn(shape) * 3 + 2).to(dtype)
        assert_stats_match_fp64(gn, x, groups, (1e-5, 1e-5), (1e-5, 1e-5))

    def test_stats_large_mean_small_spread(self, interp, monkeypatch):
        """mean 1000, std 0.01: a sum of squares in fp32 would lose every digit of the variance."""
        gn = interp[1]
        monkeypatch.setattr(gn, "STATS_PROGRAMS", 2)
        torch.manual_seed(11)
        x = torch.randn(1, 4, 64, 80) * 0.01 + 1000
        assert_stats_match_fp64(gn, x, 2, (1e-6, 0), (1e-3, 0))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize("silu", [False, True])
    def test_apply_matches_torch_path(self, interp, dtype, silu):
        torch.manual_seed(5 + int(silu))
        B, C, H, W, G = 2, 16, 13, 21, 4
        x = (torch.randn(B, C, H, W) * 3 + 2).to(dtype)
        mean, var = stats64(x, G)
        mean, rstd = mean.float(), torch.rsqrt(var.float() + 1e-6)
        w = (torch.randn(C) + 1).to(dtype)
        b = torch.randn(C).to(dtype)
        out = interp[0].group_norm_apply(x, mean, rstd, w, b, G, silu=silu, config="b2048w4")
        torch_path = interp[1]._apply_torch(x, mean, rstd, w, b, G, silu)
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out, torch_path)  # dtype-default tolerances: at most an ulp apart
        assert rel_err(out, apply64(x, mean, rstd, w, b, G, silu)) < (1e-5 if dtype == torch.float32 else 1e-2)

    def test_apply_without_affine(self, interp):
        torch.manual_seed(9)
        x = torch.randn(1, 8, 5, 7) * 2 - 1
        mean, var = stats64(x, 2)
        rstd = torch.rsqrt(var.float() + 1e-6)
        out = interp[0].group_norm_apply(x, mean.float(), rstd, None, None, 2)
        ref = F.group_norm(x.double(), 2, eps=1e-6)
        assert rel_err(out, ref) < 1e-5


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


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
        gn = interp[1]
        monkeypatch.setattr(gn, "STATS_PROGRAMS", programs)
        torch.manual_seed(sum(shape) + programs)
        x = channels_last((torch.randn(shape) * 3 + 2).to(dtype))
        assert gn._kernel_layout(x) == "nhwc"
        assert_stats_match_fp64(gn, x, groups, (1e-5, 1e-5), (1e-5, 1e-5))

    def test_stats_large_mean_small_spread(self, interp, monkeypatch):
        """mean 1000, std 0.01: a sum of squares in fp32 would lose every digit of the variance."""
        gn = interp[1]
        monkeypatch.setattr(gn, "STATS_PROGRAMS", 2)
        torch.manual_seed(12)
        x = channels_last(torch.randn(1, 64, 24, 40) * 0.01 + 1000)
        assert_stats_match_fp64(gn, x, 8, (1e-6, 0), (1e-3, 0))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    @pytest.mark.parametrize("silu", [False, True])
    def test_apply_matches_torch_path(self, interp, dtype, silu):
        torch.manual_seed(15 + int(silu))
        B, C, H, W, G = 2, 64, 13, 21, 8  # 273 pixels: the last tile of 32 is ragged
        x = channels_last((torch.randn(B, C, H, W) * 3 + 2).to(dtype))
        mean, var = stats64(x, G)
        mean, rstd = mean.float(), torch.rsqrt(var.float() + 1e-6)
        w = (torch.randn(C) + 1).to(dtype)
        b = torch.randn(C).to(dtype)
        out = interp[0].group_norm_apply(x, mean, rstd, w, b, G, silu=silu, config="b2048w4")
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, interp[1]._apply_torch(x, mean, rstd, w, b, G, silu))  # an ulp apart at most
        assert rel_err(out, apply64(x, mean, rstd, w, b, G, silu)) < (1e-5 if dtype == torch.float32 else 1e-2)

    def test_apply_writes_every_element(self, interp, monkeypatch):
        """Output poisoned with NaN; padded channels (C = 96) and a ragged last tile must not leave holes."""
        monkeypatch.setattr(torch, "empty_like", lambda t: torch.full_like(t, float("nan")))
        torch.manual_seed(17)
        B, C, H, W, G = 2, 96, 7, 5, 32
        x = channels_last(torch.randn(B, C, H, W) * 2 + 1)
        mean, var = stats64(x, G)
        mean, rstd = mean.float(), torch.rsqrt(var.float() + 1e-6)
        w, b = torch.randn(C) + 1, torch.randn(C)
        out = interp[0].group_norm_apply(x, mean, rstd, w, b, G, silu=True, config="b2048w4")
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.isnan().any()
        assert rel_err(out, apply64(x, mean, rstd, w, b, G, True)) < 1e-5

    def test_apply_without_affine(self, interp):
        torch.manual_seed(19)
        x = channels_last(torch.randn(1, 32, 5, 7) * 2 - 1)
        mean, var = stats64(x, 8)
        rstd = torch.rsqrt(var.float() + 1e-6)
        out = interp[0].group_norm_apply(x, mean.float(), rstd, None, None, 8)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(out, F.group_norm(x.double(), 8, eps=1e-6)) < 1e-5

    def test_layouts_agree(self, interp):
        """The same values in NCHW and NHWC give the same statistics and the same output."""
        torch.manual_seed(23)
        x = (torch.randn(1, 32, 6, 7) * 3 + 2).bfloat16()
        w, b = torch.randn(32) + 1, torch.randn(32)
        outs = []
        for t in (x, channels_last(x)):
            mean, var = interp[0].group_stats(t, 8)
            outs.append(interp[0].group_norm_apply(t, mean, torch.rsqrt(var + 1e-6), w, b, 8, silu=True))
        torch.testing.assert_close(outs[1], outs[0])
        assert outs[0].is_contiguous() and outs[1].is_contiguous(memory_format=torch.channels_last)

    def test_dispatch(self, interp):
        """C == 1 or H*W == 1 is contiguous both ways and keeps the NCHW kernels; other strides take torch."""
        layout = interp[1]._kernel_layout
        x = torch.randn(2, 8, 4, 6)
        assert layout(x) == "nchw" and layout(channels_last(x)) == "nhwc"
        assert layout(channels_last(torch.randn(2, 1, 4, 6))) == "nchw"
        assert layout(channels_last(torch.randn(2, 8, 1, 1))) == "nchw"
        assert layout(x.transpose(2, 3)) is None and layout(x.double()) is None
        assert layout(torch.randn(2, 8, 5)) == "nchw" and layout(torch.randn(2, 8, 5).transpose(1, 2)) is None


@needs_triton
class TestGemmAttentionKernel:
    """The GEMM-form attention (kernels/gemm_attention.py): its Triton row softmax under the interpreter."""

    @pytest.mark.parametrize("L", [1, 2047, 2500, 4096])
    def test_softmax_rows_matches_fp64(self, interp, L):
        torch.manual_seed(L)
        s = torch.randn(5, L) * 40 + 7  # spread wide enough that most exp() underflow
        s[1] *= 1e3
        p = softmax_rows(s, 0.125, torch.bfloat16)
        ref = torch.softmax(s.double() * 0.125, dim=-1)
        assert p.dtype == torch.bfloat16 and p.shape == s.shape
        assert (p.double() - ref).abs().max().item() < 4e-3
        assert torch.allclose(p.double().sum(-1), torch.ones(5, dtype=torch.float64), atol=2e-2)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_matches_fp64_sdpa_over_query_blocks(self, interp, dtype):
        torch.manual_seed(5)
        q = (torch.randn(2, 70, 512) * 2 + 0.5).to(dtype)
        k = (torch.randn(2, 300, 512) + 0.3).to(dtype)
        v = (torch.randn(2, 300, 512) * 3 + 2).to(dtype)
        out = interp[0].gemm_attention(q, k, v, score_bytes=4 * 300 * 16)  # 16 query rows a block: 5 blocks
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, sdpa64(q[:, None], k[:, None], v[:, None])[:, 0]) < 1e-2


def sdpa64_3d(q, k, v):
    """fp64 attention of [B, L, D] tensors."""
    return sdpa64(q[:, None], k[:, None], v[:, None])[:, 0]


# bf16: the output's own rounding is ~1.7e-3 relative, which the interpreter's round-toward-zero doubles, and P's
# rounding adds as much again: 3.4e-3 (6e-3 through the kernel's bf16 store) here, as gemm_attention's P gives;
# 1e-2 as in the other attention tests. fp16 carries 3 more bits: 2.4e-4 here, bound 1e-3.
SPLIT_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


@needs_triton
class TestSplitAttentionKernel:
    """The split attention (kernels/split_attention.py): scores -> stored P, stats merge, scaled P v."""

    @pytest.mark.parametrize(
        "D, Lq, L, configs, key_splits",
        [
            (64, 70, 300, (None, None), None),  # keys 2 x 128 + 44, rows 70 of a 128-row tile
            (512, 33, 129, (None, None), 1),  # a 1-key last tile; the direct epilogue (no partial sums)
            (512, 20, 300, (None, None), 3),  # one key tile a split, the last one ragged
            (64, 150, 200, ("m64n64k64w4s2", "m64n64k64w4s2"), None),  # 3 row tiles, an 8-key tail step
            (128, 64, 96, ("m128n128k64w8s3", "m64n64k64w4s2"), 1),  # BM != BM2; 2 output column tiles
        ],
    )
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_matches_fp64_sdpa(self, interp, D, Lq, L, configs, key_splits, dtype):
        torch.manual_seed(1000 * D + Lq + L)
        q = (torch.randn(2, Lq, D) * 2 + 0.5).to(dtype)
        k = (torch.randn(2, L, D) + 0.3).to(dtype)
        v = (torch.randn(2, L, D) * 3 + 2).to(dtype)
        out = interp[0].split_attention(q, k, v, scores_config=configs[0], pv_config=configs[1], key_splits=key_splits)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, sdpa64_3d(q, k, v)) < SPLIT_TOL[dtype]

    def test_takes_what_the_engine_passes(self, interp):
        """The engine's q, k, v (bf16 tokens, D = 512) reach the kernels; what they cannot take falls back."""
        attention = importlib.import_module("bagel_vae_pp.kernels.attention")  # the package's names are functions
        split_attention = importlib.import_module("bagel_vae_pp.kernels.split_attention")
        q, k = torch.randn(1, 64, 512).bfloat16(), torch.randn(1, 80, 512).bfloat16()
        assert split_attention.is_supported(q, k, k) and attention.is_supported(q[:, None], k[:, None], k[:, None])
        assert not split_attention.is_supported(q.float(), k.float(), k.float())
        assert not split_attention.is_supported(q[..., :96], k[..., :96], k[..., :96])  # D not a power of two
        assert not split_attention.is_supported(q, k, k[:, :70])
        assert not attention.is_supported(q, k, k)  # the flash kernel takes [B, 1, L, D]

    def test_large_scores_stay_finite(self, interp):
        """Inputs x30: scores of thousands, one key per row dominates; p and the sums must not overflow."""
        torch.manual_seed(3)
        q, k, v = ((torch.randn(2, n, 64) * 30).bfloat16() for n in (70, 300, 300))
        v = v / 30
        out = interp[0].split_attention(q, k, v)
        assert out.isfinite().all() and rel_err(out, sdpa64_3d(q, k, v)) < 1e-2

    @pytest.mark.parametrize("merge_tiles", [64, 2])
    def test_tile_maxima_far_apart(self, interp, monkeypatch, merge_tiles):
        """Rows whose key tiles' maxima differ by > 100 in log2 units, the winning tile first or last (ragged):
        the losing tiles' rescale underflows to 0. merge_tiles=2 merges the 3 tiles' stats in two steps."""
        monkeypatch.setattr(importlib.import_module("bagel_vae_pp.kernels.split_attention"), "MERGE_TILES", merge_tiles)
        torch.manual_seed(4)
        D, Lq, L = 64, 40, 300  # key tiles [0, 128), [128, 256), [256, 300) at block_n = 128
        q, k = torch.randn(2, Lq, D), torch.randn(2, L, D)
        q[:, :, 0] = 32 * torch.tensor([1.0, -1.0]).repeat(Lq // 2)  # even rows favour tile 0, odd rows tile 2
        k[:, :, 0] = 32 * torch.cat([torch.ones(128), torch.zeros(128), -torch.ones(L - 256)])
        q, k, v = q.bfloat16(), k.bfloat16(), (torch.randn(2, L, D) * 3 + 2).bfloat16()
        s = (q.double() @ k.double().transpose(1, 2)) * (LOG2E / D**0.5)  # [B, Lq, L], log2 units
        tile_max = torch.stack([s[..., a : a + 128].amax(-1) for a in (0, 128, 256)], -1)  # [B, Lq, 3]
        gap = tile_max.amax(-1) - tile_max.median(-1).values  # the winner over the runner-up
        assert gap.min() > 100
        out = interp[0].split_attention(q, k, v)
        assert out.isfinite().all() and rel_err(out, sdpa64_3d(q, k, v)) < 1e-2

    def test_query_blocks_give_the_same_result(self, interp):
        """A byte budget of one 64-row tile: 150 queries in 3 blocks (the last 22 rows), bit-identical output."""
        torch.manual_seed(6)
        q = (torch.randn(2, 150, 128) * 2 + 0.5).bfloat16()
        k = (torch.randn(2, 200, 128) + 0.3).bfloat16()
        v = (torch.randn(2, 200, 128) * 3 + 2).bfloat16()
        small = dict(scores_config="m64n64k64w4s2", pv_config="m64n64k64w4s2", key_splits=2)
        whole = interp[0].split_attention(q, k, v, **small)
        blocks = interp[0].split_attention(q, k, v, p_bytes=64 * 256 * 2, **small)  # 64 rows x 256 padded keys
        assert torch.equal(blocks, whole)
        assert rel_err(blocks, sdpa64_3d(q, k, v)) < 1e-2

    @pytest.mark.parametrize("key_splits", [1, 2])
    def test_engine_layout_and_out_buffer(self, interp, key_splits):
        """q/k/v as linear_1x1 gives them (contiguous [B, L, C]) and as token-major views of NCHW maps; out= a
        strided view, fully written, returned; both paths of the epilogue (direct, summed key splits)."""
        torch.manual_seed(7)
        C, H, W = 128, 6, 11
        maps = [(torch.randn(2, C, H, W) * 2 + 1).half() for _ in range(3)]
        q, k, v = (m.flatten(2).transpose(1, 2) for m in maps)  # [2, 66, 128] views, stride 1 along L
        out = torch.full((2, C, H * W), float("nan"), dtype=torch.float16).transpose(1, 2)  # [2, 66, 128] view
        got = interp[0].split_attention(q, k, v, out=out, key_splits=key_splits)
        assert got is out and not out.isnan().any()
        assert rel_err(out, sdpa64_3d(q, k, v)) < 1e-3
        tokens = [t.contiguous() for t in (q, k, v)]  # the engine's layout
        torch.testing.assert_close(interp[0].split_attention(*tokens, key_splits=key_splits), out, rtol=0, atol=0)


class TestFallbacks:
    """Without Triton or off the interpreter, CPU tensors take the torch code."""

    @pytest.fixture(autouse=True)
    def plain_cpu(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not kernels.is_available("cpu")

    def test_split_attention_is_gemm_attention(self):
        torch.manual_seed(23)
        q, k, v = ((torch.randn(2, n, 512) * 2 + 1).to(torch.bfloat16) for n in (30, 50, 50))
        torch.testing.assert_close(kernels.split_attention(q, k, v), kernels.gemm_attention(q, k, v), rtol=0, atol=0)

    def test_gemm_attention_is_sdpa(self):
        torch.manual_seed(22)
        q, k, v = ((torch.randn(2, n, 512) * 2 + 1).to(torch.bfloat16) for n in (30, 50, 50))
        out = kernels.gemm_attention(q, k, v, score_bytes=4 * 50 * 8)  # 8 query rows a block
        assert out.dtype == torch.bfloat16
        assert rel_err(out, sdpa64(q[:, None], k[:, None], v[:, None])[:, 0]) < 1e-2

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_attention_is_sdpa(self, dtype):
        torch.manual_seed(21)
        q, k, v = ((torch.randn(1, 1, n, 64) * 2 + 1).to(dtype) for n in (30, 50, 50))
        out = kernels.attention(q, k, v)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
        assert rel_err(out, sdpa64(q, k, v)) < (1e-5 if dtype == torch.float32 else 1e-2)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_group_norm_matches_fp64(self, dtype):
        torch.manual_seed(22)
        B, C, G = 2, 32, 8
        x = (torch.randn(B, C, 9, 10) * 3 + 2).to(dtype)
        w, b = torch.randn(C) + 1, torch.randn(C)
        mean, var = kernels.group_stats(x, G)
        torch.testing.assert_close(var.double(), stats64(x, G)[1], rtol=1e-5, atol=1e-6)
        rstd = torch.rsqrt(var + 1e-6)
        out = kernels.group_norm_apply(x, mean, rstd, w, b, G, silu=True)
        ref = F.silu(F.group_norm(x.double(), G, w.double(), b.double(), eps=1e-6))
        assert out.dtype == dtype and rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)

    def test_group_norm_keeps_channels_last(self):
        torch.manual_seed(24)
        x = (torch.randn(2, 32, 5, 6) * 3 + 2).contiguous(memory_format=torch.channels_last)
        mean, var = kernels.group_stats(x, 8)
        out = kernels.group_norm_apply(x, mean, torch.rsqrt(var + 1e-6), None, None, 8)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(out, F.group_norm(x.double(), 8, eps=1e-6)) < 1e-5

    def test_groups_must_divide_channels(self):
        x = torch.randn(1, 12, 4, 4)
        with pytest.raises(ValueError, match="must divide"):
            kernels.group_stats(x, 5)
        with pytest.raises(ValueError, match="divisible by groups"):
            kernels.group_norm_apply(x, torch.zeros(1, 5), torch.ones(1, 5), None, None, 5)


class TestKeySplits:
    """How the split attention's PV launch cuts the keys to fill the GPU (pure arithmetic)."""

    def test_fills_the_sms(self):
        assert pick_key_splits(64, 2048, 132) == 2  # 4096 queries x 262144 keys: 128 programs, one wave
        assert pick_key_splits(128, 2048, 132) == 1  # 8192 queries fill 132 SMs alone
        assert pick_key_splits(2, 3, 132) == 3  # a tiny launch: one key tile a program

    def test_never_more_splits_than_key_tiles(self):
        for programs in (1, 7, 64, 200):
            for tiles in (1, 2, 5, 33):
                assert 1 <= pick_key_splits(programs, tiles, 132) <= tiles


@needs_triton
class TestConvBiasKernels:
    """A conv's bias left out of its output and folded into the next GroupNorm, or the residual sum, instead."""

    @pytest.mark.parametrize("layout", [channels_last, lambda t: t])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_norm_of_x_plus_bias(self, interp, monkeypatch, layout, dtype):
        monkeypatch.setattr(interp[1], "STATS_PROGRAMS", 3)
        torch.manual_seed(29)
        B, C, H, W, G = 2, 64, 9, 13, 8
        x = layout((torch.randn(B, C, H, W) * 3 + 2).to(dtype))
        xb = torch.randn(C) * 4  # per-channel shifts large against the spread, as conv biases can be
        w, b = torch.randn(C) + 1, torch.randn(C)
        # channels_last folds the bias into the kernels exactly; NCHW adds it first, rounded to x's dtype
        folded = interp[1]._kernel_layout(x) == "nhwc"
        ref = x.double() + xb.double()[:, None, None] if folded else interp[1].add_channel_bias(x, xb).double()
        mean, var = interp[0].group_stats(x, G, x_bias=xb)
        mean64, var64 = stats64(ref, G)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-5)
        rstd = torch.rsqrt(var + 1e-6)
        out = interp[0].group_norm_apply(x, mean, rstd, w, b, G, silu=True, x_bias=xb)
        assert out.dtype == dtype and out.stride() == x.stride()
        assert rel_err(out, apply64(ref, mean, rstd, w, b, G, True)) < (1e-5 if dtype == torch.float32 else 1e-2)

    def test_the_bias_is_added_once_where_the_kernels_cannot_fold_it(self, interp):
        x, xb = torch.randn(1, 8, 3, 4), torch.randn(8)
        folded, bias = interp[0].with_conv_bias(channels_last(x), xb)
        assert torch.equal(folded, channels_last(x)) and bias is xb  # channels_last: left to the kernels
        summed, bias = interp[0].with_conv_bias(x, xb)
        assert bias is None and torch.equal(summed, x + xb[:, None, None])

    @pytest.mark.parametrize("layout", [channels_last, lambda t: t])
    @pytest.mark.parametrize("with_bias", [True, False])
    def test_residual_add(self, interp, layout, with_bias):
        torch.manual_seed(31)
        h, skip = (layout(torch.randn(2, 48, 5, 7).bfloat16()) for _ in range(2))
        bias = torch.randn(48) if with_bias else None
        ref = h.double() + skip.double() + (bias.double()[:, None, None] if with_bias else 0)
        out = interp[0].residual_add_(h, skip, bias)
        assert out.data_ptr() == h.data_ptr() and out.stride() == skip.stride()
        torch.testing.assert_close(out.double(), ref.to(torch.bfloat16).double(), rtol=0, atol=0.07)
        assert rel_err(out, ref) < 4e-3

    def test_residual_add_mixed_layouts_take_torch(self, interp):
        h, skip = channels_last(torch.randn(1, 8, 3, 4)), torch.randn(1, 8, 3, 4)
        bias = torch.randn(8)
        ref = h + skip + bias[:, None, None]
        torch.testing.assert_close(interp[0].residual_add_(h, skip, bias), ref)


@needs_triton
class TestInterleaveKernel:
    """The sub-pixel upsample's phase interleave (+ bias) under the interpreter, against its torch path."""

    @pytest.mark.parametrize("Co, H, W", [(8, 3, 5), (48, 2, 7), (3, 1, 1)])  # Co = 48, 3: padded channel tiles
    @pytest.mark.parametrize("with_bias", [True, False])
    def test_matches_torch_path(self, interp, monkeypatch, Co, H, W, with_bias):
        torch.manual_seed(Co + H)
        z = torch.randn(2, 4 * Co, H + 1, W + 1)
        bias = torch.randn(Co) if with_bias else None
        ref = interp[0].interleave_phases(z, bias)  # contiguous z: the torch path
        empty = torch.empty
        monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))  # no holes
        out = interp[0].interleave_phases(channels_last(z), bias)
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        i, j = H - 1, W - 1  # spot-check the definition: Y[2i+a, 2j+b] = Z[phase 2a+b][i+a, j+b] + bias
        expected = z[:, 3 * Co : 4 * Co, i + 1, j + 1] + (bias if with_bias else 0)
        torch.testing.assert_close(ref[:, :, 2 * i + 1, 2 * j + 1], expected)
