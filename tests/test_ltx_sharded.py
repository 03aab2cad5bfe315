"""The band-parallel LTX-Video VAE against the single-process module: real gloo ranks, fp32, 9 frames.

Each rank runs its rows of the whole video (halo rows; at the true edge the encoder's zero rows and the decoder's
reflection; a group-norm config's statistics merged across ranks; its rows of each full-size noise map); the parent
stitches the bands and compares with `LTXVideoVAE.decode` / `encode` of the whole video (max rel err <= 1e-4).
Configs: version 0's block kinds (pixel norm, no noise), version 1's (timestep conditioning, injected spatial noise)
and version 2's (space-to-depth encoder) with group norm, all at a small width.
"""

import pytest
import torch
import torch.distributed as dist
from ranks import gloo_group, run_ranks
from video_checks import assert_bands_equal_the_module, max_rel_err, module_frames

from bagel_vae_pp import ltx_config, ltx_video
from bagel_vae_pp.bands import plan_bands
from bagel_vae_pp.collectives import Shard
from bagel_vae_pp.ltx_sharded import decode_band, encode_band

SEED = 6
TIMEOUT_S = 180
pytestmark = pytest.mark.timeout(2 * TIMEOUT_S)
NOISY, QUIET, UP = {"num_layers": 1, "inject_noise": True}, {"num_layers": 1}, {"residual": True, "multiplier": 2}
V0 = [("res_x", 1), ("compress_all", 1), ("res_x_y", 1), ("compress_all", 1), ("res_x_y", 1), ("compress_all", 1),
      ("res_x", 1)]  # fmt: skip
CONFIGS = {
    "v0": dict(encoder_blocks=V0, decoder_blocks=V0),
    "v1": dict(
        encoder_blocks=[("res_x", 1), ("compress_all", {}), ("res_x_y", 1), ("compress_all", {}), ("compress_all", {}),
                        ("res_x", 1)],
        decoder_blocks=[("res_x", NOISY), ("compress_all", UP), ("res_x", NOISY), ("compress_all", {"residual": True}),
                        ("res_x", NOISY), ("compress_all", {"residual": True}), ("res_x", QUIET)],
    ),
    "v2-group-norm": dict(
        encoder_blocks=[("res_x", 1), ("compress_space_res", {"multiplier": 2}),
                        ("compress_time_res", {"multiplier": 1}), ("compress_all_res", {"multiplier": 1}),
                        ("compress_all_res", {"multiplier": 2}), ("res_x", 1)],
        decoder_blocks=[("res_x", QUIET), ("compress_all", UP), ("compress_all", {"residual": True}), ("res_x", QUIET),
                        ("compress_all", {"residual": True}), ("res_x", QUIET)],
        norm_layer="group_norm",
    ),
}  # fmt: skip
BASE = {"v0": 16, "v1": 16, "v2-group-norm": 32}


def tiny(name: str) -> ltx_video.LTXVideoVAE:
    config = dict(CONFIGS[name])
    blocks = {k: ltx_config._blocks(config.pop(k)) for k in ("encoder_blocks", "decoder_blocks")}
    version = 0 if name == "v0" else 1 if name == "v1" else 2
    return ltx_video.random_ltx_video(ltx_config.config_params(version, BASE[name], **blocks, **config), seed=SEED)


def inputs(h: int, w: int, s: int = 32):
    """A latent of 2 frames (9 output frames) and a 9-frame video, brighter towards the bottom rows."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 128, 2, h, w, generator=gen) + torch.linspace(-1, 2, h)[:, None]
    video = torch.rand(1, 3, 9, s * h, s * w, generator=gen) * torch.linspace(0.2, 1, s * h)[:, None] * 2 - 1
    return z, video


def rank_main(rank, world, store_path, out_path, name, h, w):
    torch.set_num_threads(1)
    with gloo_group(rank, world, store_path, 90):
        vae = tiny(name)
        s = vae.params.downscale
        z, video = inputs(h, w, s)
        bands = plan_bands(h, world)
        a, b = bands[rank]
        with torch.inference_mode():
            noised = vae.noised(z, seed=0)  # the whole latent's, as every rank draws it
            decoded = decode_band(vae, noised[:, :, :, a:b], Shard(rank, world, dist.group.WORLD, bands))
            encoded = encode_band(vae, video[:, :, :, s * a : s * b], Shard(rank, world, dist.group.WORLD, bands))
        torch.save({"decoded": decoded, "encoded": encoded}, out_path)


@pytest.mark.parametrize(
    "name, world, h, w", [("v0", 2, 7, 2), ("v1", 3, 7, 2), ("v1", 3, 4, 2), ("v2-group-norm", 2, 5, 2)]
)
def test_bands_decode_and_encode_as_the_whole_video(tmp_path, name, world, h, w):
    """7 latent rows over 2 or 3 ranks (no even split); 4 over 3 gives one-row bands, the last at the reflected
    edge."""
    store, outs = str(tmp_path / "store"), [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    run_ranks(rank_main, lambda r: (r, world, store, outs[r], name, h, w), world, TIMEOUT_S)
    parts = [torch.load(p) for p in outs]
    vae = tiny(name)
    assert_bands_equal_the_module(parts, vae, *inputs(h, w, vae.params.downscale))


class TestPool:
    """The real pool (CPU workers, gloo) on a small version-1-kinds LTX-Video VAE (its config travels with the
    weights): what the nodes get, against the module."""

    @pytest.mark.parametrize("workers", [2, 3])
    def test_decode_and_encode_equal_the_module(self, cpu_pool, workers):
        vae = tiny("v1")
        z, video = inputs(5, 2)
        z = torch.cat([z, -z])  # two videos: their frames come back one video after the other, as core's
        frames = (video[0].permute(1, 2, 3, 0) + 1) / 2  # an IMAGE batch [9, 160, 64, 3] in [0, 1]
        pool = cpu_pool(workers)
        decoded, encoded = pool.decode(vae, z), pool.encode(vae, frames)
        with torch.inference_mode():
            ref_encoded = vae.encode(frames.permute(3, 0, 1, 2)[None] * 2 - 1)
        assert decoded.shape == (18, 160, 64, 3) and encoded.shape == (1, 128, 2, 5, 2)
        assert max_rel_err(decoded, module_frames(vae, z)) <= 1e-4
        assert max_rel_err(encoded, ref_encoded) <= 1e-4

    def test_the_seed_reaches_the_workers(self, cpu_pool):
        """The node's seed picks the decode noise: the module's frames for that seed, not seed 0's."""
        vae, pool = tiny("v1"), cpu_pool(2)
        z, _ = inputs(3, 2)
        decoded = pool.decode(vae, z, seed=2**64 - 1)  # the node's largest seed
        assert max_rel_err(decoded, module_frames(vae, z, seed=2**64 - 1)) <= 1e-4
        assert max_rel_err(decoded, module_frames(vae, z)) > 1e-2

    def test_bad_inputs_get_one_clear_error_each_and_harm_no_worker(self, cpu_pool):
        vae, pool = tiny("v1"), cpu_pool(2)
        z, video = inputs(3, 2)
        bad = z.clone()
        bad[0, 1, 1, 1, 1] = float("nan")
        frames = (video[0].permute(1, 2, 3, 0) + 1) / 2
        cases = [
            (lambda: pool.decode(vae, z[:, :, 0]), r"video VAE decodes a video latent \[B, C, T, H, W\]"),
            (lambda: pool.decode(vae, z[:, :16]), "the latent has 16 channels but this VAE takes 128"),
            (lambda: pool.decode(vae, bad), "contains 1 NaN/Inf"),
            (lambda: pool.encode(vae, frames[:8]), r"must have 1 \+ 8 \* x frames .* got 8"),
            (lambda: pool.decode(vae, z, mode="tiled"), "tiled mode does not run the LTX-Video VAE"),
        ]
        for call, message in cases:
            with pytest.raises(ValueError, match=message):
                call()
        assert max_rel_err(pool.decode(vae, z), module_frames(vae, z)) <= 1e-4
