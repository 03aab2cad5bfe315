"""Triton kernels (attention in three forms, GroupNorm statistics / apply, the conv-bias sums, the phase interleave)
and the engine's calls into them, against float64 references written here.

The kernel classes run the real kernels on CPU tensors through Triton's interpreter (the `interp` fixture) and are
skipped only where Triton is not installed (the README's test command installs it); the fallback tests always
run. Inputs are fresh random draws with non-zero means (randn * 3 + 2 and the like), so a wrong mean or variance
shows.
"""

import importlib
import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bagel_vae_pp import kernels
from bagel_vae_pp.autoencoder import AttnBlock, ResnetBlock
from bagel_vae_pp.kernels.split_attention import LOG2E, pick_key_splits

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: only the fallbacks run")
# Attention against float64, relative. bf16: the output's own rounding is ~1.7e-3, which the interpreter's
# round-toward-zero doubles, and P's rounding adds as much again: 3.4e-3 (6e-3 through the split kernel's bf16
# store), as gemm_attention's P gives: bound 1e-2. fp16 carries 3 more bits: 2.4e-4, bound 1e-3. fp32 (P in fp32
# too): ~1e-7 an operation, sums of 512 products and of up to 300 probabilities stay under 1e-6: bound 1e-5.
ATTN_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}
COPIED = ("bagel_vae_pp.kernels", "bagel_vae_pp.collectives", "bagel_vae_pp.sharded")  # the kernels and their callers


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def attention64(q, k, v):
    """softmax(q k^T / sqrt(D)) v in float64, for [..., L, D] tensors."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [..., Lq, L]
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (p / p.sum(-1, keepdim=True)) @ v


def stats64(x, groups):
    """Per-(sample, group) mean and biased variance in float64, [B, G] each."""
    x = x.double().reshape(x.shape[0], groups, -1)
    mean = x.mean(-1)
    return mean, ((x - mean[..., None]) ** 2).mean(-1)


def apply64(x, mean, rstd, w, b, groups, silu):
    B, C = x.shape[:2]
    y = x.double().reshape(B, groups, -1) - mean.double()[:, :, None]
    y = (y * rstd.double()[:, :, None]).reshape(x.shape) * w.double()[:, None, None] + b.double()[:, None, None]
    return y * torch.sigmoid(y) if silu else y


def norm64(norm, x, silu=False):
    """nn.GroupNorm `norm` of x (then SiLU) in float64."""
    mean, var = stats64(x, norm.num_groups)
    return apply64(x, mean, 1 / torch.sqrt(var + norm.eps), norm.weight, norm.bias, norm.num_groups, silu)


def _fp32_dot_for_bf16(create_dot):
    """Triton's interpreter multiplies bf16 tiles as their raw uint16 bits (3.6 to 3.9): widen them first."""

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
    """The kernels, and the engine modules that call them, as a second copy imported with TRITON_INTERPRET=1.

    Triton makes a @triton.jit function compiled or interpreted when it is defined, i.e. on import. Everything
    imported before this module's tests (triton.language's own jit functions, the engine) is compiled, and
    compiled kernels cannot take CPU tensors. So for these tests: the jit functions of triton.language are swapped
    for interpreted ones, and the kernels, collectives and sharded modules are imported afresh with the flag set;
    when the module's tests end the rest of the run gets the compiled ones back. `interp.kernels` is the package,
    `interp.sharded` the engine, and each kernels submodule is there by name (`interp.group_norm`, ...).

    The interpreter's bf16 dot is widened to fp32 here. It also rounds fp32 -> bf16 toward zero (the GPU rounds
    to nearest even), so bf16 results carry about twice the GPU's rounding error; the tolerances allow for it.
    """
    from triton.runtime.interpreter import InterpretedFunction, InterpreterBuilder
    from triton.runtime.jit import JITFunction

    import bagel_vae_pp

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # also read while the kernels run
        for name, module in list(sys.modules.items()):
            if name.startswith("triton.language") and module is not None:
                for attr, value in list(vars(module).items()):
                    if isinstance(value, JITFunction):  # tl.zeros, tl.sum, tl.sigmoid, ...
                        mp.setattr(module, attr, InterpretedFunction(value.fn))
        mp.setattr(InterpreterBuilder, "create_dot", _fp32_dot_for_bf16(InterpreterBuilder.create_dot))
        for name in [n for n in sys.modules if n.startswith(COPIED)]:
            mp.delitem(sys.modules, name)
        for name in COPIED:  # else `from . import kernels` would find the compiled copy on the package
            mp.delattr(bagel_vae_pp, name.split(".")[1], raising=False)
        sharded = importlib.import_module("bagel_vae_pp.sharded")
        parts = {n.split(".")[2]: m for n, m in sys.modules.items() if n.startswith("bagel_vae_pp.kernels.")}
        yield SimpleNamespace(kernels=sys.modules["bagel_vae_pp.kernels"], sharded=sharded, **parts)


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
    def test_matches_fp64(self, interp, D, Lq, L, config, dtype):
        torch.manual_seed(1000 * D + Lq + L)
        q = (torch.randn(2, 1, Lq, D) * 2 + 0.5).to(dtype)
        k = (torch.randn(2, 1, L, D) + 0.3).to(dtype)
        v = (torch.randn(2, 1, L, D) * 3 + 2).to(dtype)
        out = interp.kernels.attention(q, k, v, config=config)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, attention64(q, k, v)) < ATTN_TOL[dtype]

    def test_engine_layout_and_out_buffer(self, interp):
        """Token-contiguous views of NCHW maps (as `to_tokens` gives); out= is fully written, layout kept."""
        torch.manual_seed(7)
        C, H, W = 128, 6, 11
        maps = [(torch.randn(1, C, H, W) * 2 + 1).half() for _ in range(3)]
        q, k, v = (m.reshape(1, 1, C, H * W).transpose(-1, -2) for m in maps)  # [1, 1, 66, 128], stride 1 on L
        out = torch.full_like(q, float("nan"))
        got = interp.kernels.attention(q, k, v, out=out)
        assert got is out and not out.isnan().any()
        assert rel_err(out, attention64(q, k, v)) < 1e-2
        assert interp.kernels.attention(q, k, v).stride() == q.stride()
        three_d = interp.kernels.attention(*(t[:, 0].contiguous() for t in (q, k, v)))  # [B, L, D]
        torch.testing.assert_close(three_d, out[:, 0])

    def test_large_scores_stay_finite(self, interp):
        """Scores of several hundred (softmax near one-hot) must not overflow the online rescale."""
        torch.manual_seed(3)
        q = (torch.randn(1, 1, 64, 64) * 8).half()
        k = (torch.randn(1, 1, 96, 64) * 8).half()
        v = torch.randn(1, 1, 96, 64).half()
        out = interp.kernels.attention(q, k, v, config="m64n32w8s2")
        assert out.isfinite().all() and rel_err(out, attention64(q, k, v)) < 1e-2


def assert_rounded_from(out, ref):
    """out is the float64 ref rounded to out's dtype, within that dtype's default tolerances: the kernels compute in
    fp32 and round once, so they land within an ulp (bf16 1.6e-2, fp16 1e-3, fp32 1.3e-6 relative, atol 1e-5)."""
    torch.testing.assert_close(out, ref.to(out.dtype))


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


@needs_triton
class TestGemmAttentionKernel:
    """The GEMM-form attention (kernels/gemm_attention.py): its Triton row softmax under the interpreter."""

    @pytest.mark.parametrize("L", [1, 2047, 2500, 4096])
    def test_softmax_rows_matches_fp64(self, interp, L):
        torch.manual_seed(L)
        s = torch.randn(5, L) * 40 + 7  # spread wide enough that most exp() underflow
        s[1] *= 1e3
        p = interp.gemm_attention.softmax_rows(s, 0.125, torch.bfloat16)
        ref = torch.softmax(s.double() * 0.125, dim=-1)
        assert p.dtype == torch.bfloat16 and p.shape == s.shape
        assert (p.double() - ref).abs().max().item() < 4e-3
        assert torch.allclose(p.double().sum(-1), torch.ones(5, dtype=torch.float64), atol=2e-2)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_matches_fp64_over_query_blocks(self, interp, dtype):
        torch.manual_seed(5)
        q = (torch.randn(2, 70, 512) * 2 + 0.5).to(dtype)
        k = (torch.randn(2, 300, 512) + 0.3).to(dtype)
        v = (torch.randn(2, 300, 512) * 3 + 2).to(dtype)
        out = interp.kernels.gemm_attention(q, k, v, score_bytes=4 * 300 * 16)  # 16 query rows a block: 5 blocks
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, attention64(q, k, v)) < ATTN_TOL[dtype]


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
    def test_matches_fp64(self, interp, D, Lq, L, configs, key_splits, dtype):
        torch.manual_seed(1000 * D + Lq + L)
        q = (torch.randn(2, Lq, D) * 2 + 0.5).to(dtype)
        k = (torch.randn(2, L, D) + 0.3).to(dtype)
        v = (torch.randn(2, L, D) * 3 + 2).to(dtype)
        configs = dict(scores_config=configs[0], pv_config=configs[1], key_splits=key_splits)
        out = interp.kernels.split_attention(q, k, v, **configs)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, attention64(q, k, v)) < ATTN_TOL[dtype]

    def test_takes_what_the_engine_passes(self, interp):
        """The engine's q, k, v (bf16 tokens, D = 512) reach the kernels; what they cannot take falls back."""
        attention, split_attention = interp.attention, interp.split_attention  # the modules, not the functions
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
        out = interp.kernels.split_attention(q, k, v)
        assert out.isfinite().all() and rel_err(out, attention64(q, k, v)) < 1e-2

    @pytest.mark.parametrize("merge_tiles", [64, 2])
    def test_tile_maxima_far_apart(self, interp, monkeypatch, merge_tiles):
        """Rows whose key tiles' maxima differ by > 100 in log2 units, the winning tile first or last (ragged):
        the losing tiles' rescale underflows to 0. merge_tiles=2 merges the 3 tiles' stats in two steps."""
        monkeypatch.setattr(interp.split_attention, "MERGE_TILES", merge_tiles)
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
        out = interp.kernels.split_attention(q, k, v)
        assert out.isfinite().all() and rel_err(out, attention64(q, k, v)) < 1e-2

    def test_query_blocks_give_the_same_result(self, interp):
        """A byte budget of one 64-row tile: 150 queries in 3 blocks (the last 22 rows), bit-identical output."""
        torch.manual_seed(6)
        q = (torch.randn(2, 150, 128) * 2 + 0.5).bfloat16()
        k = (torch.randn(2, 200, 128) + 0.3).bfloat16()
        v = (torch.randn(2, 200, 128) * 3 + 2).bfloat16()
        small = dict(scores_config="m64n64k64w4s2", pv_config="m64n64k64w4s2", key_splits=2)
        whole = interp.kernels.split_attention(q, k, v, **small)
        blocks = interp.kernels.split_attention(q, k, v, p_bytes=64 * 256 * 2, **small)  # 64 rows x 256 padded keys
        assert torch.equal(blocks, whole)
        assert rel_err(blocks, attention64(q, k, v)) < 1e-2

    @pytest.mark.parametrize("key_splits", [1, 2])
    def test_engine_layout_and_out_buffer(self, interp, key_splits):
        """q/k/v as linear_1x1 gives them (contiguous [B, L, C]) and as token-major views of NCHW maps; out= a
        strided view, fully written, returned; both paths of the epilogue (direct, summed key splits)."""
        torch.manual_seed(7)
        C, H, W = 128, 6, 11
        maps = [(torch.randn(2, C, H, W) * 2 + 1).half() for _ in range(3)]
        q, k, v = (m.flatten(2).transpose(1, 2) for m in maps)  # [2, 66, 128] views, stride 1 along L
        out = torch.full((2, C, H * W), float("nan"), dtype=torch.float16).transpose(1, 2)  # [2, 66, 128] view
        got = interp.kernels.split_attention(q, k, v, out=out, key_splits=key_splits)
        assert got is out and not out.isnan().any()
        assert rel_err(out, attention64(q, k, v)) < 1e-3
        tokens = [t.contiguous() for t in (q, k, v)]  # the engine's layout
        torch.testing.assert_close(interp.kernels.split_attention(*tokens, key_splits=key_splits), out, rtol=0, atol=0)


class TestFallbacks:
    """Without Triton or off the interpreter, CPU tensors take the torch code."""

    @pytest.fixture(autouse=True)
    def plain_cpu(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not kernels.is_available("cpu")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("form", ["split", "gemm in query blocks", "flash"])
    def test_attention_forms_match_fp64(self, form, dtype):
        """split -> gemm_attention (torch softmax), here in blocks of 8 query rows; flash -> SDPA."""
        torch.manual_seed(21)
        q, k, v = ((torch.randn(2, n, 512) * 2 + 1).to(dtype) for n in (30, 50, 50))
        if form == "gemm in query blocks":
            out = kernels.gemm_attention(q, k, v, score_bytes=4 * 50 * 8)
        else:
            out = (kernels.split_attention if form == "split" else kernels.attention)(q, k, v)
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, attention64(q, k, v)) < ATTN_TOL[dtype]

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


def conv64(conv, x, padding=0):
    return F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=padding)


def resnet64(block, x):
    """The resnet block in float64."""
    h = conv64(block.conv1, norm64(block.norm1, x, silu=True), padding=1)
    h = conv64(block.conv2, norm64(block.norm2, h, silu=True), padding=1)
    return (conv64(block.nin_shortcut, x) if hasattr(block, "nin_shortcut") else x.double()) + h


def linear64(conv, t):
    """A 1x1 conv applied to tokens [B, L, C] in float64."""
    return t.double() @ conv.weight.double().flatten(1).T + conv.bias.double()


def mid_attention64(attn, x):
    """The mid-block attention in float64: x + proj_out(softmax(q k^T / sqrt(C)) v) over the H*W tokens."""
    B, C, H, W = x.shape
    t = norm64(attn.norm, x).flatten(2).transpose(1, 2)  # [B, L, C]
    o = linear64(attn.proj_out, attention64(linear64(attn.q, t), linear64(attn.k, t), linear64(attn.v, t)))
    return x.double() + o.transpose(1, 2).reshape(B, C, H, W)


def one_rank(interp, H):
    return interp.sharded.Shard(0, 1, None, [(0, H)])


class Launches:
    """Stands in for a @triton.jit kernel: counts its launches and runs it."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def count_launches(monkeypatch, *modules):
    """{name: Launches} for every `_*_kernel` of the modules, each put in its kernel's place."""
    launches = {}
    for module in modules:
        for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
            launches[name] = Launches(getattr(module, name))
            monkeypatch.setattr(module, name, launches[name])
    return launches


# Which Triton kernels each attention form launches: bf16 goes to the half-precision kernels; fp32 never does
# (on a GPU they would round it: P stored in bf16, tl.dot in TF32), only to the row softmax with P in fp32.
LAUNCHED = {
    ("split", torch.bfloat16): {"_scores_kernel", "_merge_stats_kernel", "_pv_kernel"},
    ("gemm", torch.bfloat16): {"_softmax_rows_kernel"},
    ("flash", torch.bfloat16): {"_attention_kernel"},
    ("split", torch.float32): {"_softmax_rows_kernel"},  # split -> gemm_attention
    ("gemm", torch.float32): {"_softmax_rows_kernel"},
    ("flash", torch.float32): set(),  # SDPA
}


@needs_triton
class TestEngineDispatch:
    """sharded.py's calls into the kernels, interpreted, against float64: fp32 stays fp32 on every path (a GPU
    pool's fp32 jobs), bf16 reaches the half-precision kernels."""

    @pytest.mark.parametrize("form", ["split", "gemm", "flash"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_mid_block_attention(self, interp, monkeypatch, form, dtype):
        monkeypatch.setenv(interp.sharded.ATTENTION_SWITCH, form)
        launches = count_launches(monkeypatch, interp.split_attention, interp.attention, interp.gemm_attention)
        torch.manual_seed(41)
        C, H, W = 128, 5, 13  # 65 tokens: ragged row and key tiles
        attn = AttnBlock(C).to(dtype)
        x = (torch.randn(1, C, H, W) * 0.02 + 0.01).to(dtype)  # small: the attention branch dominates the output
        with torch.no_grad():
            out = interp.sharded.attention(attn, x, one_rank(interp, H))
        assert out.dtype == dtype
        assert {n for n, launch in launches.items() if launch.count} == LAUNCHED[form, dtype]
        # bf16: five roundings in a row (normalised h; q, k, v; P; the attention output; proj_out), ~1.1e-3 rms each
        # and doubled by the interpreter's truncation in the kernels: 5e-3 to 7e-3 measured, bound 2e-2.
        assert rel_err(out, mid_attention64(attn, x)) < (1e-5 if dtype == torch.float32 else 2e-2)

    @pytest.mark.parametrize("layout", ["nhwc", "nchw"])
    def test_fp32_resnet_block(self, interp, layout):
        """GroupNorm kernels with conv1's bias folded into norm2, the residual kernel with conv2's and the shortcut's
        bias; 64 -> 96 channels (NHWC tiles padded to 128, 3 channels a group)."""
        torch.manual_seed(43)
        block = ResnetBlock(64, 96)
        for norm in (block.norm1, block.norm2):
            torch.nn.init.normal_(norm.weight, 1.0), torch.nn.init.normal_(norm.bias)
        x = torch.randn(1, 64, 7, 9) * 3 + 2
        x = channels_last(x) if layout == "nhwc" else x
        with torch.no_grad():
            out = interp.sharded.resnet(block, x, one_rank(interp, 7))
        assert out.dtype == torch.float32 and interp.kernels.is_nhwc(out) == (layout == "nhwc")
        assert rel_err(out, resnet64(block, x)) < 1e-5

    @pytest.mark.parametrize("layout", ["nhwc", "nchw"])
    def test_fp32_upsample(self, interp, layout):
        """The folded sub-pixel weights (summed in fp32) and the interleave kernel (+ bias in fp32)."""
        torch.manual_seed(47)
        conv = torch.nn.Conv2d(48, 24, 3, padding=1)
        torch.nn.init.normal_(conv.bias)
        x = torch.randn(1, 48, 5, 6) + 0.5
        x = channels_last(x) if layout == "nhwc" else x
        with torch.no_grad():
            out = interp.sharded.upsample_conv(conv, x, one_rank(interp, 5))
        assert out.dtype == torch.float32 and interp.kernels.is_nhwc(out) == (layout == "nhwc")
        assert rel_err(out, conv64(conv, F.interpolate(x.double(), scale_factor=2.0), padding=1)) < 1e-5
