"""Our LTX-Video VAE against ComfyUI's own (`COMFYUI_PATH`, run by `COMFYUI_PYTHON`), single process, fp32.

ComfyUI's layers skip weight initialisation, so both sides load the same seeded random state dict drawn here, and
core's unseeded decode noise (the latent mix, version 1's spatial maps) is replaced in its process by the noise
ours draws. `guess`: our three versions are ComfyUI's guessed configs, with its keys and shapes. `core`: a full-size
version 0 VAE through comfy.sd.VAE (ComfyUI guesses its version from the weights). `metadata`: versions 1 and 2's
block kinds in smaller configs (the full sizes hold 0.9 and 1.2 G parameters) given to comfy.sd.VAE as the file's
metadata config, as the VAE Loader passes it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import comfy_run, max_rel_err

from bagel_vae_pp import ltx_config, ltx_video
from bagel_vae_pp.autoencoder import load_strict
from bagel_vae_pp.vae_kinds import vae_from_state_dict

SCRIPT = "comfy_ltx_ref.py"
pytestmark = [
    pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set: no ComfyUI to compare"),
    pytest.mark.timeout(600),
]
NOISY = {"num_layers": 1, "inject_noise": True}
QUIET = {"num_layers": 1, "inject_noise": False}
CONFIGS = {  # smaller configs of versions 1 and 2's block kinds (ComfyUI's base width, 128, is fixed)
    1: {
        "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {}], ["res_x_y", 1], ["compress_all", {}],
                           ["compress_all", {}], ["res_x", {"num_layers": 1}]],
        "decoder_blocks": [["res_x", NOISY], ["compress_all", {"residual": True, "multiplier": 2}], ["res_x", NOISY],
                           ["compress_all", {"residual": True, "multiplier": 1}], ["res_x", NOISY],
                           ["compress_all", {"residual": True, "multiplier": 1}], ["res_x", QUIET]],
    },
    2: {
        "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_space_res", {"multiplier": 2}],
                           ["res_x", {"num_layers": 1}], ["compress_time_res", {"multiplier": 1}],
                           ["compress_all_res", {"multiplier": 1}], ["compress_all_res", {"multiplier": 2}],
                           ["res_x", {"num_layers": 1}]],
        "decoder_blocks": [["res_x", QUIET], ["compress_all", {"residual": True, "multiplier": 2}], ["res_x", QUIET],
                           ["compress_all", {"residual": True, "multiplier": 1}], ["res_x", QUIET],
                           ["compress_all", {"residual": True, "multiplier": 1}], ["res_x", QUIET]],
    },
}  # fmt: skip
COMMON = {"dims": 3, "latent_channels": 128, "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform",
          "causal_decoder": False, "timestep_conditioning": True}  # fmt: skip


class Recording(ltx_video.Whole):
    """The single-process forward, keeping each spatial-noise map it draws (to hand core the same)."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.maps = []

    def noise_rows(self, index, x):
        self.maps.append(super().noise_rows(index, x))
        return self.maps[-1]


def ours_as_core(vae: ltx_video.LTXVideoVAE, z, frames, seed: int):
    """Our decode / encode as comfy.sd.VAE calls ComfyUI's (pixels in [0, 1], frames centre-cropped to 32), and the
    noise our decode drew, named as comfy_ltx_ref.py takes it."""
    band, s = Recording(seed), vae.params.downscale
    top, left = frames.shape[1] % s // 2, frames.shape[2] % s // 2
    video = frames[:, top : top + frames.shape[1] // s * s, left : left + frames.shape[2] // s * s]
    with torch.inference_mode():
        decoded = vae.decode_forward(vae.noised(z, seed), band)
        encoded = vae.encode(video.permute(3, 0, 1, 2)[None] * 2 - 1)
    noise = {f"map.{i}": m for i, m in enumerate(band.maps)}
    if vae.params.timestep_conditioning:
        noise["latent_noise"] = ltx_video.latent_noise(tuple(z.shape), seed)
    return ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1), encoded, noise


def inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 128, 2, 3, 2, generator=gen)  # 9 frames of 3 x 2 latent pixels
    frames = torch.rand(9, 2 * 32 + 5, 3 * 32 + 2, 3, generator=gen)  # centre-cropped to 64 x 96 by core
    return z, frames


def test_versions_are_comfyuis_guesses(tmp_path):
    found = comfy_run(SCRIPT, tmp_path, "guess", {}, torch.zeros(1), torch.zeros(1))
    guessed = json.loads(bytes(found["json"].tolist()).decode())
    for version, (encoder_blocks, decoder_blocks, conditioned) in ltx_config.VERSIONS.items():
        config = guessed[str(version)]["config"]
        assert ltx_config._blocks(config.get("encoder_blocks", config.get("blocks"))) == encoder_blocks
        assert ltx_config._blocks(config.get("decoder_blocks", config.get("blocks"))) == decoder_blocks
        assert config.get("timestep_conditioning", False) == conditioned
        with torch.device("meta"):
            ours = ltx_video.LTXVideoVAE(ltx_config.config_params(version))
        theirs = guessed[str(version)]["shapes"]
        assert {k: list(v.shape) for k, v in ours.state_dict().items()} == theirs
        sd = ours.state_dict()
        assert ltx_config.detect_params(sd) == ltx_config.config_params(version)  # the version read off the weights


def test_full_size_version_0_through_core(tmp_path):
    sd = ltx_video.random_ltx_video(0, seed=4).state_dict()
    vae = vae_from_state_dict(sd)  # the version read off the weights, as the pool's workers do
    z, frames = inputs(1)
    decoded, encoded, noise = ours_as_core(vae, z, frames, seed=0)
    ref = comfy_run(SCRIPT, tmp_path, "core", sd, z, frames, extra=noise)
    assert decoded.shape == (1, 9, 96, 64, 3) and encoded.shape == (1, 128, 2, 2, 3)
    assert max_rel_err(decoded, ref["decoded"]) <= 1e-4
    assert max_rel_err(encoded, ref["encoded"]) <= 1e-4


@pytest.mark.parametrize("version", [1, 2])
def test_metadata_config_through_core(tmp_path, version):
    config = {**COMMON, **CONFIGS[version]}
    sd = ltx_video.random_ltx_video(ltx_config.config_params(version, **kinds(config)), seed=5).state_dict()
    vae = load_strict(ltx_video.LTXVideoVAE, ltx_config.detect_params(sd, config), sd, "cpu", None)
    z, frames = inputs(2)
    decoded, encoded, noise = ours_as_core(vae, z, frames, seed=7)
    assert len(noise) == (7 if version == 1 else 1)  # v1: 3 noisy res blocks, 2 maps each; both: the latent mix
    ref = comfy_run(SCRIPT, tmp_path, "metadata", sd, z, frames, config, extra=noise)
    assert max_rel_err(decoded, ref["decoded"]) <= 1e-4
    assert max_rel_err(encoded, ref["encoded"]) <= 1e-4


def kinds(config: dict) -> dict:
    return {k: ltx_config._blocks(config[k]) for k in ("encoder_blocks", "decoder_blocks")}
