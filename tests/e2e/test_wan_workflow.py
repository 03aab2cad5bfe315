"""End-to-end: the saved Wan video workflow (`workflows/api/wan_video_distributed_decode.json`) in a real ComfyUI.

Empty HunyuanLatentVideo → Distributed VAE Decode (2 CPU workers) → Create Video → Save Video, with the full-size
random Wan 2.1 VAE (ComfyUI's VAE Loader builds only that size; see test_video_server.py), shrunk to 64x48 and 9
frames. The MP4 is read back with PyAV in ComfyUI's Python (`COMFYUI_PYTHON`: the pack's tests do not need PyAV).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SERVER_MARKS, node_id, read_pngs, run_ok
from safetensors.torch import save_file

from bagel_vae_pp.wan import random_wan

pytestmark = [*SERVER_MARKS, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "workflows" / "api" / "wan_video_distributed_decode.json"
WAN_VAE_NAME = "bagel_vae_pp_e2e_wan21.safetensors"
WIDTH, HEIGHT, FRAMES = 64, 48, 9  # 9 = 1 + 4·2 frames: 3 latent frames of 6x8 (6 rows over 2 workers)
# Reads a video file (argv[1]) with PyAV: its RGB frames go to argv[2] (.npy), its frame rate to stdout.
READ_VIDEO = """
import sys, av, numpy as np
with av.open(sys.argv[1]) as container:
    stream = container.streams.video[0]
    frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    print(float(stream.average_rate))
np.save(sys.argv[2], np.stack(frames))
"""


@pytest.fixture(scope="module")
def server(e2e_models, request):
    path = e2e_models["vae"] / WAN_VAE_NAME
    if not path.exists():  # the same file test_video_server.py writes, when that module ran first
        sd = random_wan("wan2.1", seed=7).state_dict()
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))
    return request.getfixturevalue("comfy_server")


def wan_prompt(prefix: str) -> dict:
    """The saved workflow on the test VAE and two CPU workers, a WIDTH x HEIGHT x FRAMES latent, a unique prefix."""
    prompt = json.loads(WORKFLOW.read_text())
    prompt[node_id(prompt, "VAELoader")]["inputs"]["vae_name"] = WAN_VAE_NAME
    prompt[node_id(prompt, "BagelVAEPP_WorkerPool")]["inputs"]["devices"] = "cpu:2"
    prompt[node_id(prompt, "EmptyHunyuanLatentVideo")]["inputs"].update(width=WIDTH, height=HEIGHT, length=FRAMES)
    prompt[node_id(prompt, "SaveVideo")]["inputs"]["filename_prefix"] = prefix
    return prompt


def saved_video(server, run, node: str, tmp_path: Path) -> tuple[np.ndarray, float]:
    """The one file SaveVideo node `node` wrote, as uint8 frames [T, H, W, 3] and its frame rate."""
    (entry,) = run.history["outputs"][node]["images"]  # SaveVideo reports its file under "images"
    path = server.output_dir / entry["subfolder"] / entry["filename"]
    assert entry["type"] == "output" and path.is_file(), entry
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    frames_path = tmp_path / f"{path.stem}.npy"
    done = subprocess.run([python, "-c", READ_VIDEO, str(path), str(frames_path)], capture_output=True, text=True)
    assert done.returncode == 0, f"reading {path} with PyAV failed:\n{done.stderr}"
    return np.load(frames_path), float(done.stdout)


def test_saved_workflow_writes_the_video(server, tmp_path):
    prompt = wan_prompt("e2e/wan_video")
    run = run_ok(server, prompt)
    frames, fps = saved_video(server, run, node_id(prompt, "SaveVideo"), tmp_path)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3), frames.shape
    assert fps == prompt[node_id(prompt, "CreateVideo")]["inputs"]["fps"]


def test_video_holds_the_decoded_frames(server, tmp_path):
    """A random latent (Load Latent) in place of the empty one: frame i of the video is core VAE Decode's frame i.

    H.264 is lossy (at Save Video's default quality these noisy 64x48 frames come back 11-18 levels off on average,
    against 45 or more between different frames), so each video frame must be near its core frame and nearer to it than
    to any other frame: a dropped, repeated or reordered frame fails.
    """
    shape = (1, 16, 1 + (FRAMES - 1) // 4, HEIGHT // 8, WIDTH // 8)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    # The version key tells Load Latent that the tensor is stored as is (no SD1 scale factor to undo).
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, server.input_dir / "wan.latent")
    prompt = wan_prompt("e2e/wan_video_random")
    decode, vae = node_id(prompt, "BagelVAEPP_DistributedDecode"), node_id(prompt, "VAELoader")
    prompt["90"] = {"class_type": "LoadLatent", "inputs": {"latent": "wan.latent"}}
    prompt[decode]["inputs"]["samples"] = ["90", 0]
    prompt["91"] = {"class_type": "VAEDecode", "inputs": {"samples": ["90", 0], "vae": [vae, 0]}}
    prompt["92"] = {"class_type": "SaveImage", "inputs": {"images": ["91", 0], "filename_prefix": "e2e/wan_core"}}
    run = run_ok(server, prompt)
    video, _ = saved_video(server, run, node_id(prompt, "SaveVideo"), tmp_path)
    core = np.stack(read_pngs(server, run, "92"))
    assert video.shape == core.shape == (FRAMES, HEIGHT, WIDTH, 3), (video.shape, core.shape)
    # mean |video frame i - core frame j| over pixels, for every pair
    error = abs(video[:, None].astype(np.float32) - core[None].astype(np.float32)).mean(axis=(2, 3, 4))
    others = np.where(np.eye(FRAMES, dtype=bool), np.inf, error).min(axis=1)
    print(f"Wan video vs core VAE Decode, mean |diff| (of 255): own frame {np.diag(error).round(1)}, nearest other "
          f"frame {others.round(1)}")  # fmt: skip
    assert (error.argmin(axis=1) == np.arange(FRAMES)).all(), f"video frames vs core frames (mean |diff|):\n{error}"
    assert np.diag(error).max() < 30, f"video frames far from core's: mean |diff| {np.diag(error)}"
    assert min(core[i].std() for i in range(FRAMES)) > 1, "core's frames are flat: the comparison would prove nothing"
