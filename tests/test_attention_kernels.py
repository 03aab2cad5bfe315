"""The mid-block attention kernels (flash, GEMM and split forms, kernels/*attention.py) against float64.

The kernel classes run the real kernels on CPU tensors through Triton's interpreter (`kernel_refs.interp`); the
fallback tests always run. Inputs are fresh random draws with non-zero means, so a wrong scale or shift shows.
"""

import pytest
import torch
from kernel_refs import ATTN_TOL, attention64, interpreted_kernels, needs_triton, rel_err  # noqa: F401

from bagel_vae_pp import kernels
from bagel_vae_pp.kernels.split_attention import LOG2E, pick_key_splits


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
