"""End-to-end: Distributed VAE Decode / Encode with a Wan 2.1 VAE inside a real ComfyUI server (`COMFYUI_PATH`).

ComfyUI's VAE Loader builds the Wan 2.1 VAE at its own fixed size (dim 96, 16 latent channels), so the test VAE is
the full-size random one, written (bf16) next to the image test VAE. Frames: two test pictures alternating, 6
frames (core encodes 1 + 4 of them, as it leaves a partial group out), 56x40 (5 latent rows over 2 workers).
"""

from __future__ import annotations

import pytest
import torch
from helpers import SERVER_MARKS, read_pngs, run_ok, write_png
from safetensors.torch import save_file

from bagel_vae_pp.wan import random_wan

pytestmark = [*SERVER_MARKS, pytest.mark.timeout(900)]

WAN_VAE_NAME = "bagel_vae_pp_e2e_wan21.safetensors"
POOL = {"class_type": "BagelVAEPP_WorkerPool", "inputs": {"devices": "cpu:2", "dtype": "fp32", "timeout_s": 600}}
EXACT = {"mode": "exact", "tile_size": 1024, "overlap": 128, "pool": ["pool", 0]}
DECODE, ENCODE = "BagelVAEPP_DistributedDecode", "BagelVAEPP_DistributedEncode"


@pytest.fixture(scope="module")
def server(e2e_models, request):
    path = e2e_models["vae"] / WAN_VAE_NAME
    if not path.exists():
        sd = random_wan("wan2.1", seed=7).state_dict()
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))
    return request.getfixturevalue("comfy_server")


def save(images: list, prefix: str) -> dict:
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def test_distributed_decode_and_encode_give_core_frames(server):
    for variant in (0, 1):
        write_png(server.input_dir / f"wan_{variant}.png", 56, 40, variant)
    vae, frames, latent = ["vae", 0], ["frames", 0], ["core_encode", 0]
    prompt = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": WAN_VAE_NAME}},
        "pool": POOL,
        "a": {"class_type": "LoadImage", "inputs": {"image": "wan_0.png"}},
        "b": {"class_type": "LoadImage", "inputs": {"image": "wan_1.png"}},
        "ab": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
        "frames": {"class_type": "RepeatImageBatch", "inputs": {"image": ["ab", 0], "amount": 3}},
        "core_encode": {"class_type": "VAEEncode", "inputs": {"pixels": frames, "vae": vae}},
        "core_decode": {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": vae}},
        "ours_decode": {"class_type": DECODE, "inputs": {"samples": latent, "vae": vae, **EXACT}},
        "ours_encode": {"class_type": ENCODE, "inputs": {"pixels": frames, "vae": vae, **EXACT}},
        "core_of_ours": {"class_type": "VAEDecode", "inputs": {"samples": ["ours_encode", 0], "vae": vae}},
        "s_core": save(["core_decode", 0], "wan/core"),
        "s_ours": save(["ours_decode", 0], "wan/ours"),
        "s_enc": save(["core_of_ours", 0], "wan/ours_encode"),
    }  # fmt: skip
    run = run_ok(server, prompt)
    core = read_pngs(server, run, "s_core")
    assert len(core) == 5 and core[0].shape == (40, 56, 3)
    assert max(c.std() for c in core) > 1, "core's frames are flat: the comparison would prove nothing"
    for what in ("s_ours", "s_enc"):
        ours = read_pngs(server, run, what)
        assert len(ours) == 5, f"{what}: {len(ours)} frames"
        worst = max(int(abs(a - b).max()) for a, b in zip(ours, core, strict=True))
        assert worst <= 1, f"{what}: max |ours - core| = {worst}/255"
