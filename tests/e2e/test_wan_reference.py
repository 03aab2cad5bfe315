"""Our Wan 2.1 VAE against ComfyUI's own (`COMFYUI_PATH`, run by `COMFYUI_PYTHON`), single process, fp32.

ComfyUI's layers skip weight initialisation, so both sides load the same seeded random state dict drawn here.
`model`: ComfyUI's Wan 2.1 / 2.2 WanVAE of a tiny config, raw decode/encode, 9 frames and a partial chunk. `core`:
the full-size Wan 2.1 / 2.2 VAE through comfy.sd.VAE (what the VAE Loader builds from these keys), decode and
encode as the core nodes call them, against our module plus ComfyUI's pixel mapping.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import as_core_vae, comfy_run, max_rel_err

from bagel_vae_pp.vae_kinds import vae_from_state_dict
from bagel_vae_pp.wan import random_wan
from bagel_vae_pp.wan22 import random_wan22

SCRIPT = "comfy_video_ref.py"
pytestmark = [
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set: no ComfyUI to compare"),
    pytest.mark.timeout(600),
]


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiny_model_decodes_and_encodes_as_comfyui(tmp_path, version):
    ours = random_wan("tiny", seed=3) if version == "2.1" else random_wan22("tiny", seed=3)
    p, s = ours.params, ours.params.downscale
    config = {"kind": f"wan{version}", "dim": p.dim, "z_dim": p.z_channels, "dim_mult": list(p.dim_mult),
              "num_res_blocks": p.num_res_blocks, "temperal_downsample": list(p.temporal_down)}  # fmt: skip
    if version == "2.2":
        config["dec_dim"] = p.decoder_dim
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, p.z_channels, 3, 7, 4, generator=gen)  # 9 frames, 7 latent rows (not divisible by 2 or 3)
    x = (
        torch.rand(1, 3, 11, 7 * s, 5 * s, generator=gen) * 2 - 1
    )  # 11 frames: two chunks of 4 after the first, 2 dropped
    ref = comfy_run(SCRIPT, tmp_path, "model", ours.state_dict(), z, x, config)
    with torch.inference_mode():
        decoded, encoded = ours.decode(z), ours.encode(x)
    assert decoded.shape == (1, 3, 9, 7 * s, 4 * s)
    assert encoded.shape == (1, p.z_channels, 3, 7, 5)
    assert max_rel_err(decoded, ref["decoded"]) <= 1e-4
    assert max_rel_err(encoded, ref["encoded"]) <= 1e-4


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_full_size_vae_through_core_decode_and_encode(tmp_path, version):
    model = random_wan("wan2.1", seed=4) if version == "2.1" else random_wan22("wan2.2", seed=4)
    sd, s, z_channels = model.state_dict(), model.params.downscale, model.params.z_channels
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, z_channels, 2, 5, 3, generator=gen)  # 5 frames of 5 x 3 latent pixels
    frames = torch.rand(9, 5 * s + 3, 3 * s + 2, 3, generator=gen)  # an IMAGE batch: 9 frames, centre-cropped by core
    ref = comfy_run(SCRIPT, tmp_path, "core", sd, z, frames)
    decoded, encoded = as_core_vae(vae_from_state_dict(sd), z, frames)  # the very keys comfy.sd.VAE was given
    assert max_rel_err(decoded, ref["decoded"]) <= 1e-4
    assert max_rel_err(encoded, ref["encoded"]) <= 1e-4
