"""End-to-end: Distributed VAE Decode / Encode with a Wan 2.1, a HunyuanVideo or an LTX-Video VAE inside a real
ComfyUI server (`COMFYUI_PATH`).

ComfyUI's VAE Loader builds these VAEs at their own fixed sizes (Wan 2.1: dim 96, 16 latent channels), so each test
VAE is the full-size random one, written (bf16) next to the image test VAE. Frames: two test pictures alternating,
6 frames (Wan's core encode keeps 1 + 4 of them, leaving a partial group out), 56x40 (5 latent rows over 2
workers). LTX-Video (version 0, the one core decodes without noise): 9 frames of 64x64 (2 latent rows).
"""

from __future__ import annotations

import pytest
import torch
from helpers import SERVER_MARKS, read_pngs, run_ok, write_png
from safetensors.torch import save_file

from bagel_vae_pp.hunyuan_video import random_hunyuan_video
from bagel_vae_pp.ltx_video import random_ltx_video
from bagel_vae_pp.wan import random_wan

pytestmark = [*SERVER_MARKS, pytest.mark.timeout(900)]

VAES = {  # file name -> a random full-size VAE of that kind, as ComfyUI's VAE Loader builds it
    "bagel_vae_pp_e2e_wan21.safetensors": lambda: random_wan("wan2.1", seed=7),
    "bagel_vae_pp_e2e_hunyuan_video.safetensors": lambda: random_hunyuan_video("hunyuan-video", seed=7),
    "bagel_vae_pp_e2e_ltx_video.safetensors": lambda: random_ltx_video(0, seed=7),
}
LTX = "bagel_vae_pp_e2e_ltx_video.safetensors"
POOL = {"class_type": "BagelVAEPP_WorkerPool", "inputs": {"devices": "cpu:2", "dtype": "fp32", "timeout_s": 600}}
EXACT = {"mode": "exact", "tile_size": 1024, "overlap": 128, "pool": ["pool", 0]}
DECODE, ENCODE = "BagelVAEPP_DistributedDecode", "BagelVAEPP_DistributedEncode"


@pytest.fixture(scope="module")
def server(e2e_models, request):
    for name, make in VAES.items():
        path = e2e_models["vae"] / name
        if not path.exists():
            sd = make().state_dict()
            save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))
    return request.getfixturevalue("comfy_server")


def save(images: list, prefix: str) -> dict:
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def core_and_ours(server, vae_name: str, tag: str, size: tuple[int, int], frames: dict) -> list:
    """Core VAE Decode of core VAE Encode's latent of the frames that `frames` (nodes over two test pictures "a" and
    "b", ending in node "frames") makes, against our decode of that latent and core's decode of our encode: each
    within 1/255. Returns core's frames."""
    for variant in (0, 1):
        write_png(server.input_dir / f"{tag}_{variant}.png", *size, variant)
    vae, latent = ["vae", 0], ["core_encode", 0]
    prompt = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}},
        "pool": POOL,
        "a": {"class_type": "LoadImage", "inputs": {"image": f"{tag}_0.png"}},
        "b": {"class_type": "LoadImage", "inputs": {"image": f"{tag}_1.png"}},
        "ab": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
        **frames,
        "core_encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["frames", 0], "vae": vae}},
        "core_decode": {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": vae}},
        "ours_decode": {"class_type": DECODE, "inputs": {"samples": latent, "vae": vae, **EXACT}},
        "ours_encode": {"class_type": ENCODE, "inputs": {"pixels": ["frames", 0], "vae": vae, **EXACT}},
        "core_of_ours": {"class_type": "VAEDecode", "inputs": {"samples": ["ours_encode", 0], "vae": vae}},
        "s_core": save(["core_decode", 0], f"{tag}/core"),
        "s_ours": save(["ours_decode", 0], f"{tag}/ours"),
        "s_enc": save(["core_of_ours", 0], f"{tag}/ours_encode"),
    }  # fmt: skip
    run = run_ok(server, prompt)
    core = read_pngs(server, run, "s_core")
    assert max(c.std() for c in core) > 1, "core's frames are flat: the comparison would prove nothing"
    for what in ("s_ours", "s_enc"):
        ours = read_pngs(server, run, what)
        assert len(ours) == len(core), f"{what}: {len(ours)} frames, core {len(core)}"
        worst = max(int(abs(a - b).max()) for a, b in zip(ours, core, strict=True))
        assert worst <= 1, f"{what}: max |ours - core| = {worst}/255"
    return core


@pytest.mark.parametrize("vae_name", [name for name in VAES if name != LTX])
def test_distributed_decode_and_encode_give_core_frames(server, vae_name):
    six = {"frames": {"class_type": "RepeatImageBatch", "inputs": {"image": ["ab", 0], "amount": 3}}}
    core = core_and_ours(server, vae_name, "wan", (56, 40), six)
    assert len(core) in (5, 9) and core[0].shape == (40, 56, 3)  # 1 + 4k frames: core's encode kept 5 or padded to 9


def test_ltx_video_decode_and_encode_give_core_frames(server):
    """The VAE object ComfyUI's VAE Loader builds (its own LTX module, whose block lists the pool reads) through our
    nodes, against core VAE Decode / VAE Encode on 9 frames (LTX encodes 1 + 8k)."""
    nine = {
        "eight": {"class_type": "RepeatImageBatch", "inputs": {"image": ["ab", 0], "amount": 4}},
        "frames": {"class_type": "ImageBatch", "inputs": {"image1": ["eight", 0], "image2": ["a", 0]}},
    }
    core = core_and_ours(server, LTX, "ltx", (64, 64), nine)
    assert len(core) == 9 and core[0].shape == (64, 64, 3)
