"""Tiled mode of the video VAEs through the pool against ComfyUI's own tiled video decode / encode (`COMFYUI_PATH`, run
by `COMFYUI_PYTHON`): `comfy.sd.VAE.decode_tiled` / `encode_tiled`, what core VAE Decode (Tiled) / VAE Encode (Tiled)
call, with the same tiles, fp32, on the full-size random VAE of each kind as the VAE Loader builds it.

Tiles: 4 latent units a side overlapping by 1, so rows and columns each take two tiles, the second cut short; 4 latent
frames overlapping by 2 (16 / 8 frames, core's feather of 5 frames), the second temporal tile cut short too. Wan 2.2's
full-size VAE is the slowest on CPU: a smaller grid there (one column tile; 2 latent frames overlapping by 1). The
pool has 2 CPU workers, so tiles are dealt and strips handed over.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import comfy_run, max_rel_err

from bagel_vae_pp.hunyuan_video import random_hunyuan_video
from bagel_vae_pp.vae_kinds import vae_from_state_dict
from bagel_vae_pp.wan import random_wan
from bagel_vae_pp.wan22 import random_wan22

SCRIPT = "comfy_video_ref.py"
pytestmark = [
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set: no ComfyUI to compare"),
    pytest.mark.timeout(900),
]
VAES = {
    "wan2.1": lambda: random_wan("wan2.1", seed=4),
    "wan2.2": lambda: random_wan22("wan2.2", seed=4),
    "hunyuan-video": lambda: random_hunyuan_video("hunyuan-video", seed=4),
}
# kind -> latent (T, h, w), (temporal_size, temporal_overlap) in frames
GRIDS = {"wan2.1": ((5, 7, 6), (16, 8)), "wan2.2": ((3, 5, 4), (8, 4)), "hunyuan-video": ((5, 7, 6), (16, 8))}


@pytest.mark.parametrize("kind", list(VAES))
def test_pool_tiled_decode_and_encode_give_comfyuis_tiled(tmp_path, cpu_pool, kind):
    model = VAES[kind]()
    sd, s, z_channels = model.state_dict(), model.params.downscale, model.params.z_channels
    (T, h, w), (temporal_size, temporal_overlap) = GRIDS[kind]
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(1, z_channels, T, h, w, generator=gen)
    frames = torch.rand(4 * T - 1, h * s + 3, w * s + 2, 3, generator=gen)  # centre-cropped; a partial group dropped
    tt, to = temporal_size, temporal_overlap
    config = {  # decode_tiled takes latent units, encode_tiled pixels and frames, as the core nodes hand them over
        "decode": {"tile_x": 4, "tile_y": 4, "overlap": 1, "tile_t": tt // 4, "overlap_t": to // 4},
        "encode": {"tile_x": 4 * s, "tile_y": 4 * s, "overlap": s, "tile_t": tt, "overlap_t": to},
    }
    ref = comfy_run(SCRIPT, tmp_path, "tiled", sd, z, frames, config)
    ours, pool = vae_from_state_dict(sd), cpu_pool(2)  # the very keys comfy.sd.VAE was given
    temporal = {"temporal_size": temporal_size, "temporal_overlap": temporal_overlap}
    decoded = pool.decode(ours, z, "tiled", 4 * s, s, **temporal)
    encoded = pool.encode(ours, frames, "tiled", 4 * s, s, **temporal)
    core_frames = ref["decoded"].flatten(0, 1)  # [B, T, H, W, 3] -> the IMAGE batch core's node returns
    assert decoded.shape == core_frames.shape == (4 * T - 3, h * s, w * s, 3)
    assert encoded.shape == ref["encoded"].shape == (1, z_channels, T, h, w)
    diff, rel = (decoded - core_frames).abs().max().item(), max_rel_err(encoded, ref["encoded"])
    print(f"{kind}: decode max |ours - core| {diff:.2e}, encode max rel err {rel:.2e}")
    assert diff <= 1 / 255
    assert rel <= 1e-4
