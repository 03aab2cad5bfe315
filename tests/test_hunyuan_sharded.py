"""The band-parallel HunyuanVideo VAE against the single-process module: real gloo ranks, fp32, several frames.

Each rank runs its rows of the whole video (halo rows, GroupNorm statistics over all frames merged across ranks,
K/V gathered over all frames); the parent stitches the bands and compares with `HunyuanVideoVAE.decode` /
`encode` of the whole video (max rel err <= 1e-4). The inputs are offset by band so that band means differ.
"""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks
from video_checks import assert_bad_inputs_refused_then_decodes, max_rel_err, module_frames

from bagel_vae_pp.bands import plan_bands
from bagel_vae_pp.collectives import Shard
from bagel_vae_pp.hunyuan_sharded import decode_band, encode_band
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
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        vae = random_hunyuan_video("tiny", seed=SEED)
        s = vae.params.downscale
        z, video = inputs(h, w, s)
        bands = plan_bands(h, world)
        a, b = bands[rank]
        with torch.inference_mode():
            decoded = decode_band(vae, z[:, :, :, a:b], Shard(rank, world, dist.group.WORLD, bands))
            encoded = encode_band(vae, video[:, :, :, s * a : s * b], Shard(rank, world, dist.group.WORLD, bands))
        torch.save({"decoded": decoded, "encoded": encoded}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, h, w", [(2, 7, 4), (3, 7, 3), (3, 4, 5)])
def test_bands_decode_and_encode_as_the_whole_video(tmp_path, world, h, w):
    """7 latent rows over 2 or 3 ranks (no even split); 4 over 3 gives a band of one latent row."""
    store, outs = str(tmp_path / "store"), [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    run_ranks(rank_main, lambda r: (r, world, store, outs[r], h, w), world, TIMEOUT_S)
    parts = [torch.load(p) for p in outs]
    vae = random_hunyuan_video("tiny", seed=SEED)
    s = vae.params.downscale
    z, video = inputs(h, w, s)
    with torch.inference_mode():
        ref_decoded, ref_encoded = vae.decode(z), vae.encode(video)
    decoded = torch.cat([p["decoded"] for p in parts], dim=3)
    encoded = torch.cat([p["encoded"] for p in parts], dim=3)
    assert decoded.shape == (1, 3, 9, s * h, s * w)
    assert encoded.shape == (1, 4, 3, h, w)
    assert max_rel_err(decoded, ref_decoded) <= 1e-4
    assert max_rel_err(encoded, ref_encoded) <= 1e-4


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
