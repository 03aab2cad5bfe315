"""The band-parallel HunyuanVideo VAE against the single-process module: real gloo ranks, fp32, several frames.

Each rank runs its rows of the whole video (halo rows, GroupNorm statistics over all frames merged across ranks,
K/V gathered over all frames); the parent stitches the bands and compares with `HunyuanVideoVAE.decode` /
`encode` of the whole video (max rel err <= 1e-4). The inputs are offset by band so that band means differ.
The mid-block attention alone runs in several query chunks (the tiny sizes fit in one otherwise) against a float64
attention block written here.
"""

from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import gloo_group, run_ranks
from video_checks import (
    assert_bad_inputs_refused_then_decodes,
    assert_bands_equal_the_module,
    max_rel_err,
    module_frames,
)

from bagel_vae_pp import hunyuan_video
from bagel_vae_pp.bands import plan_bands
from bagel_vae_pp.collectives import Shard
from bagel_vae_pp.hunyuan_sharded import VIDEO_BAND, decode_band, encode_band
from bagel_vae_pp.hunyuan_video import random_hunyuan_video

SEED = 6
TIMEOUT_S = 120
pytestmark = pytest.mark.timeout(2 * TIMEOUT_S)


def inputs(h: int, w: int, s: int = 8):
    """A latent of 3 frames (9 output frames) and a 9-frame video, brighter towards the bottom rows."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 3, h, w, generator=gen) + torch.linspace(-1, 2, h)[:, None]
    video = torch.rand(1, 3, 9, s * h, s * w, generator=gen) * torch.linspace(0.2, 1, s * h)[:, None] * 2 - 1
    return z, video


def rank_main(rank, world, store_path, out_path, h, w):
    torch.set_num_threads(1)
    with gloo_group(rank, world, store_path):
        vae = random_hunyuan_video("tiny", seed=SEED)
        s = vae.params.downscale
        z, video = inputs(h, w, s)
        bands = plan_bands(h, world)
        a, b = bands[rank]
        with torch.inference_mode():
            decoded = decode_band(vae, z[:, :, :, a:b], Shard(rank, world, dist.group.WORLD, bands))
            encoded = encode_band(vae, video[:, :, :, s * a : s * b], Shard(rank, world, dist.group.WORLD, bands))
        torch.save({"decoded": decoded, "encoded": encoded}, out_path)


@pytest.mark.parametrize("world, h, w", [(2, 7, 4), (3, 7, 3), (3, 4, 5)])
def test_bands_decode_and_encode_as_the_whole_video(tmp_path, world, h, w):
    """7 latent rows over 2 or 3 ranks (no even split); 4 over 3 gives a band of one latent row."""
    store, outs = str(tmp_path / "store"), [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    run_ranks(rank_main, lambda r: (r, world, store, outs[r], h, w), world, TIMEOUT_S)
    parts = [torch.load(p) for p in outs]
    vae = random_hunyuan_video("tiny", seed=SEED)
    assert_bands_equal_the_module(parts, vae, *inputs(h, w, vae.params.downscale))


CHUNK = 4  # queries per chunk in the attention tests below (SCORE_BUDGET made small): several, the last ragged


def mid_attention_input(h: int):
    """The tiny model's decoder mid-block attention and a [2, 64, 3, h, 3] input for it, brighter towards the bottom."""
    vae = random_hunyuan_video("tiny", seed=SEED)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 3, h, 3, generator=gen) + torch.linspace(-1, 2, h)[:, None]
    return vae.decoder.mid.attn_1, x


def band_attention(block, x, shard):
    """VIDEO_BAND's attention on this rank's rows x, its queries in chunks of CHUNK against all T*H*W keys: the
    output and each SDPA call's (queries, keys)."""
    B, _, T, _, W = x.shape
    keys = T * shard.latent_bands[-1][1] * W
    sdpa = mock.Mock(wraps=F.scaled_dot_product_attention)
    with (
        mock.patch.object(hunyuan_video, "SCORE_BUDGET", B * keys * CHUNK),
        mock.patch.object(F, "scaled_dot_product_attention", sdpa),
    ):
        out = VIDEO_BAND.attention(block, x, shard)
    return out, [(c.args[0].shape[2], c.args[1].shape[2]) for c in sdpa.call_args_list]


def attention_block64(block, x):
    """x + proj_out(softmax(q k^T / sqrt(C)) v) over all T*H*W tokens of GroupNorm(x), in float64."""
    p = {name: t.double() for name, t in block.state_dict().items()}
    x = x.double()
    h = F.group_norm(x, block.norm.num_groups, p["norm.weight"], p["norm.bias"], block.norm.eps)
    tokens = h.flatten(2).transpose(1, 2)  # [B, T*H*W, C], frame-major
    q, k, v = (tokens @ p[f"{n}.weight"].flatten(1).T + p[f"{n}.bias"] for n in "qkv")
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5  # [B, L, L]
    out = torch.softmax(scores, dim=-1) @ v @ p["proj_out.weight"].flatten(1).T + p["proj_out.bias"]
    return x + out.transpose(1, 2).reshape(x.shape)


def expected_chunks(queries: int, keys: int) -> list[tuple[int, int]]:
    return [(min(CHUNK, queries - i), keys) for i in range(0, queries, CHUNK)]


def attention_rank_main(rank, world, store_path, out_path, h):
    torch.set_num_threads(1)
    with gloo_group(rank, world, store_path):
        block, x = mid_attention_input(h)
        bands = plan_bands(h, world)
        a, b = bands[rank]
        with torch.inference_mode():
            out, chunks = band_attention(block, x[:, :, :, a:b], Shard(rank, world, dist.group.WORLD, bands))
        torch.save({"out": out, "chunks": chunks}, out_path)


class TestMidAttentionInQueryChunks:
    """VIDEO_BAND's mid-block attention runs several query chunks, the last one short, and equals the float64
    attention over all T*H*W tokens: one rank, and two gloo ranks whose bands' queries see every rank's keys."""

    def test_one_rank(self):
        block, x = mid_attention_input(5)
        with torch.inference_mode():
            out, chunks = band_attention(block, x, Shard(0, 1, None, [(0, 5)]))
        assert chunks == expected_chunks(45, 45)  # 11 chunks of 4, then 1
        ref = attention_block64(block, x)
        # measured 3.1e-7 (two ranks: 4.1e-7): fp32 GroupNorm statistics and GEMMs of 64 channels
        assert max_rel_err(out - x, ref - x.double()) <= 1e-5

    def test_two_ranks(self, tmp_path):
        store, outs = str(tmp_path / "store"), [str(tmp_path / f"rank{r}.pt") for r in range(2)]
        run_ranks(attention_rank_main, lambda r: (r, 2, store, outs[r], 5), 2, TIMEOUT_S)
        parts = [torch.load(p) for p in outs]
        # rows 0..2 and 3..4 of 5: 27 and 18 queries (3 frames x 3 columns a row) against all 45 keys
        assert [p["chunks"] for p in parts] == [expected_chunks(27, 45), expected_chunks(18, 45)]
        block, x = mid_attention_input(5)
        out = torch.cat([p["out"] for p in parts], dim=3)
        assert max_rel_err(out - x, attention_block64(block, x) - x.double()) <= 1e-5


class TestPool:
    """The real pool (CPU workers, gloo) on the tiny HunyuanVideo VAE: what the nodes get, against the module."""

    @pytest.mark.parametrize("workers", [2, 3])
    def test_decode_and_encode_equal_the_module(self, cpu_pool, workers):
        vae = random_hunyuan_video("tiny", seed=SEED)
        s = vae.params.downscale
        z, video = inputs(5, 3, s)
        z = torch.cat([z, -z])  # two videos: their frames come back one video after the other, as core's
        frames = (video[0].permute(1, 2, 3, 0) + 1) / 2  # an IMAGE batch [9, 5s, 3s, 3] in [0, 1]
        pool = cpu_pool(workers)
        decoded, encoded = pool.decode(vae, z), pool.encode(vae, frames)
        with torch.inference_mode():
            ref = module_frames(vae, z)
            ref_encoded = vae.encode(frames.permute(3, 0, 1, 2)[None] * 2 - 1)
        assert decoded.shape == (18, 5 * s, 3 * s, 3) and encoded.shape == (1, 4, 3, 5, 3)
        assert max_rel_err(decoded, ref) <= 1e-4
        assert max_rel_err(encoded, ref_encoded) <= 1e-4

    def test_room_asked_for_grows_with_the_frames_it_holds_at_once(self, cpu_pool):
        """HunyuanVideo runs a whole video in one forward (Wan one chunk): the room make_room hears scales with a
        video's frames, not with how many videos a job decodes."""
        vae, pool, asked = random_hunyuan_video("tiny", seed=SEED), cpu_pool(2), []
        for t in (2, 3):
            z = torch.randn(1, 4, t, 5, 3, generator=torch.Generator().manual_seed(t))
            for batch in (z, torch.cat([z, z])):
                pool.decode(vae, batch, make_room=lambda devices, n: asked.append(n))
        base = asked[0] - (1 << 30)  # less the fixed allowance per worker
        assert asked[0] == asked[1] and asked[2] == asked[3]
        assert asked[2] - (1 << 30) == base * 9 // 5  # 5 frames (2 latent) -> 9 frames (3 latent)

    def test_bad_inputs_get_one_clear_error_each_and_harm_no_worker(self, cpu_pool):
        vae, pool = random_hunyuan_video("tiny", seed=SEED), cpu_pool(2)
        z, _ = inputs(3, 2)
        assert_bad_inputs_refused_then_decodes(pool, vae, z)
