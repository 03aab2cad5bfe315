"""Our HunyuanVideo VAE against ComfyUI's own (`COMFYUI_PATH`, run by `COMFYUI_PYTHON`), single process, fp32.

ComfyUI's layers skip weight initialisation, so both sides load the same seeded random state dict drawn here.
`model`: ComfyUI's LDM autoencoder in 3-D of a tiny config, raw decode/encode, 9 frames and a frame count that is
not 1 + 4k. `core`: the full-size VAE through comfy.sd.VAE (what the VAE Loader builds from these keys), decode
and encode as the core nodes call them, against our module plus ComfyUI's pixel mapping.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import as_core_vae, comfy_run, max_rel_err

from bagel_vae_pp.hunyuan_video import random_hunyuan_video
from bagel_vae_pp.vae_kinds import vae_from_state_dict

pytestmark = [
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set: no ComfyUI to compare"),
    pytest.mark.timeout(600),
]
SCRIPT = "comfy_video_ref.py"


@pytest.mark.parametrize("frames", [9, 7])
def test_tiny_model_decodes_and_encodes_as_comfyui(tmp_path, frames):
    ours = random_hunyuan_video("tiny", seed=3)
    p, s = ours.params, ours.params.downscale
    config = {"kind": "hunyuan-video", "ch": p.ch, "ch_mult": list(p.ch_mult), "num_res_blocks": p.num_res_blocks,
              "z_channels": p.z_channels}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, p.z_channels, 3, 7, 4, generator=gen) * 2 + 0.5  # 9 frames, 7 latent rows
    x = torch.rand(1, 3, frames, 7 * s, 5 * s, generator=gen) * 2 - 1
    ref = comfy_run(SCRIPT, tmp_path, "model", ours.state_dict(), z, x, config)
    with torch.inference_mode():
        decoded, encoded = ours.decode(z), ours.encode(x)
    assert decoded.shape == (1, 3, 9, 7 * s, 4 * s)
    assert encoded.shape == (1, p.z_channels, p.latent_frames(frames), 7, 5)
    assert max_rel_err(decoded, ref["decoded"]) <= 1e-4
    assert max_rel_err(encoded, ref["encoded"]) <= 1e-4


def test_full_size_vae_through_core_decode_and_encode(tmp_path):
    model = random_hunyuan_video("hunyuan-video", seed=4)
    sd, s = model.state_dict(), model.params.downscale
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, 2, 3, 2, generator=gen)  # 5 frames of 3 x 2 latent pixels
    frames = torch.rand(9, 3 * s + 3, 2 * s + 2, 3, generator=gen)  # an IMAGE batch: 9 frames, centre-cropped by core
    ref = comfy_run(SCRIPT, tmp_path, "core", sd, z, frames)
    decoded, encoded = as_core_vae(vae_from_state_dict(sd), z, frames)  # the very keys comfy.sd.VAE was given
    assert decoded.shape == (1, 5, 3 * s, 2 * s, 3)
    assert max_rel_err(decoded, ref["decoded"]) <= 1e-4
    assert max_rel_err(encoded, ref["encoded"]) <= 1e-4
