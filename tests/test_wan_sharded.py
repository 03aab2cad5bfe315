"""The band-parallel Wan 2.1 and 2.2 VAEs against the single-process module: real gloo ranks, fp32, several frames.

Each rank runs its rows of every frame chunk by chunk (halo rows, caches with halos, per-frame K/V gather); the
parent stitches the bands and compares with `WanVAE.decode` / `encode` of the whole video (max rel err <= 1e-4).
"""

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

from bagel_vae_pp.bands import plan_bands
from bagel_vae_pp.collectives import Shard
from bagel_vae_pp.vae_kinds import in_memory_format
from bagel_vae_pp.video_layout import is_ndhwc, to_layout
from bagel_vae_pp.wan import decode_chunks, random_wan, time_chunks
from bagel_vae_pp.wan22 import random_wan22
from bagel_vae_pp.wan_sharded import decode_chunk, encode_chunk

SEED = 5
LATENT_FRAMES = 3  # 9 output frames
TIMEOUT_S = 120
pytestmark = pytest.mark.timeout(2 * TIMEOUT_S)


def tiny(version: str):
    return random_wan("tiny", seed=SEED) if version == "2.1" else random_wan22("tiny", seed=SEED)


def inputs(h: int, w: int, s: int = 8):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, LATENT_FRAMES, h, w, generator=gen)
    video = torch.rand(1, 3, 9, s * h, s * w, generator=gen) * 2 - 1
    return z, video


def watch_conv_layouts(seen: list) -> None:
    """Record, for every 3-D conv this process runs, its input's shape and whether it was NDHWC."""
    conv3d = F.conv3d

    def watched(x, *args, **kwargs):
        seen.append((tuple(x.shape), is_ndhwc(x)))
        return conv3d(x, *args, **kwargs)

    F.conv3d = watched


def rank_main(rank, world, store_path, out_path, version, h, w, ndhwc=False, step=1):
    torch.set_num_threads(1)
    with gloo_group(rank, world, store_path):
        vae = tiny(version)
        s = vae.params.downscale
        z, video = inputs(h, w, s)
        layouts = []
        if ndhwc:  # as a GPU worker runs it: weights and activations channels-last from the first conv to the last
            vae = in_memory_format(vae, torch.channels_last)
            z, video = to_layout(z, True), to_layout(video, True)
            watch_conv_layouts(layouts)
        bands = plan_bands(h, world)
        shard = Shard(rank, world, dist.group.WORLD, bands)
        a, b = bands[rank]
        with torch.inference_mode():
            cache = {}
            chunks = decode_chunks(z.shape[2], step)
            decoded = torch.cat([decode_chunk(vae, z[:, :, t0:t1, a:b], cache, shard) for t0, t1 in chunks], 2)
            cache = {}
            chunks = time_chunks(video.shape[2], vae.params.time_scale)
            encoded = torch.cat(
                [encode_chunk(vae, video[:, :, f0:f1, s * a : s * b], cache, shard) for f0, f1 in chunks], 2
            )
        torch.save({"decoded": decoded, "encoded": encoded, "layouts": layouts}, out_path)


@pytest.mark.parametrize(
    "version, world, h, w, ndhwc, step",
    [
        ("2.1", 2, 7, 4, False, 1),
        ("2.1", 3, 7, 3, False, 1),
        ("2.1", 3, 4, 5, False, 1),
        ("2.2", 2, 5, 3, False, 1),
        ("2.2", 3, 4, 3, False, 1),
        ("2.1", 3, 7, 3, True, 1),
        ("2.2", 2, 5, 3, True, 1),
        ("2.1", 2, 7, 4, True, 2),
        ("2.2", 3, 4, 3, False, 2),
    ],
)
def test_bands_decode_and_encode_as_the_whole_video(tmp_path, version, world, h, w, ndhwc, step):
    """7 (2.2: 5) latent rows over 2 or 3 ranks (no even split); 4 over 3 gives a band of one latent row. NDHWC:
    the layout GPU workers use, against the NCDHW single-process module; no conv may see another layout. step 2:
    the decode runs latent frames 1-2 as one chunk, against the module's (ComfyUI's) one frame at a time."""
    store, outs = str(tmp_path / "store"), [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    run_ranks(rank_main, lambda r: (r, world, store, outs[r], version, h, w, ndhwc, step), world, TIMEOUT_S)
    parts = [torch.load(p) for p in outs]
    if ndhwc:
        for p in parts:
            assert len(p["layouts"]) > 20 and [s for s, ok in p["layouts"] if not ok] == []
    vae = tiny(version)
    assert_bands_equal_the_module(parts, vae, *inputs(h, w, vae.params.downscale))


class TestPool:
    """The real pool (CPU workers, gloo) on the tiny Wan VAEs: what the nodes get, against the module."""

    @pytest.fixture(scope="class")
    def vae(self):
        return random_wan("tiny", seed=SEED)

    @pytest.mark.parametrize("version, workers", [("2.1", 2), ("2.1", 3), ("2.2", 2)])
    def test_decode_and_encode_equal_the_module(self, cpu_pool, version, workers):
        vae = tiny(version)
        s = vae.params.downscale
        z, video = inputs(5, 3, s)
        z = torch.cat([z, -z])  # two videos: their frames come back one video after the other, as core's
        frames = (video[0].permute(1, 2, 3, 0) + 1) / 2  # an IMAGE batch [9, 5s, 3s, 3] in [0, 1]
        pool = cpu_pool(workers)
        decoded = pool.decode(vae, z)
        encoded = pool.encode(vae, frames)
        with torch.inference_mode():
            ref = module_frames(vae, z)
            ref_encoded = vae.encode(frames.permute(3, 0, 1, 2)[None] * 2 - 1)
        assert decoded.shape == (18, 5 * s, 3 * s, 3) and encoded.shape == (1, 4, 3, 5, 3)
        assert max_rel_err(decoded, ref) <= 1e-4
        assert max_rel_err(encoded, ref_encoded) <= 1e-4

    def test_bad_inputs_get_one_clear_error_each_and_harm_no_worker(self, cpu_pool, vae, tiny_vae):
        pool = cpu_pool(2)
        z, _ = inputs(3, 2)
        image_latent = (lambda: pool.decode(tiny_vae, torch.randn(1, 16, 2, 3, 2)), "image VAE decodes an image latent")
        assert_bad_inputs_refused_then_decodes(pool, vae, z, [image_latent])


def test_decode_chunks_cover_every_latent_frame_once_the_first_alone():
    for frames in range(1, 30):
        for step in range(1, 9):
            chunks = decode_chunks(frames, step)
            assert chunks[0] == (0, 1) and chunks[-1][1] == frames
            assert all(a == b for (_, b), (a, _) in zip(chunks, chunks[1:]))  # contiguous, in order
            assert all(0 < b - a <= step for a, b in chunks[1:])
            assert len(chunks) == 1 + -(-(frames - 1) // step)  # as few as the step allows
