"""Helpers shared by the `server` test modules: input images, API-graph edits and checked runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Every real-server test module: marked `server`, skipped with the reason when no ComfyUI checkout is named.
SERVER_MARKS = [
    pytest.mark.server,
    pytest.mark.skipif(
        not os.environ.get("COMFYUI_PATH"),
        reason="COMFYUI_PATH is not set: point it at a Comfy-Org/ComfyUI checkout (and COMFYUI_PYTHON at its "
        "Python) to run the real-server tests",
    ),
]


def write_png(path: Path, width: int, height: int, variant: int = 0) -> None:
    """A smooth colour ramp with a disc: structure that a wrong band or halo would visibly break.

    Another `variant` moves the disc: a different picture of the same size, so that a job's output can be
    told from an earlier job's.
    """
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx = width * ((0.5 + 0.3 * variant) % 1)
    disc = ((x - cx) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2).astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.3 + 0.5 * disc], axis=-1)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


def node_id(prompt: dict, class_type: str) -> str:
    (found,) = [i for i, node in prompt.items() if node["class_type"] == class_type]
    return found


def saved_images(server, run) -> list[Path]:
    paths = []
    for output in run.history.get("outputs", {}).values():
        for image in output.get("images", []):
            assert image["type"] == "output", image
            paths.append(server.output_dir / image["subfolder"] / image["filename"])
    return paths


def read_pngs(server, run, node: str) -> list:
    """The images that SaveImage node `node` wrote (one per batch item, in order), as int16 [H, W, C]."""
    import numpy as np
    from PIL import Image

    return [
        np.asarray(Image.open(server.output_dir / image["subfolder"] / image["filename"]), dtype=np.int16)
        for image in run.history["outputs"][node]["images"]
    ]


def run_ok(server, prompt):
    run = server.run_prompt(prompt)
    assert run.http_status == 200 and run.status_str == "success", run.describe()
    return run


def comfy_run(
    script: str, tmp_path: Path, mode: str, sd: dict, z, x, config: dict | None = None, extra: dict | None = None
) -> dict:
    """Run tests/e2e/`script` under ComfyUI's Python (cwd: COMFYUI_PATH) on a state dict and inputs (and `extra`
    tensors, by name); its outputs."""
    from safetensors.torch import load_file, save_file

    inp, out = tmp_path / f"{mode}_in.safetensors", tmp_path / f"{mode}_out.safetensors"
    save_file({**{f"sd.{k}": v.contiguous() for k, v in sd.items()}, "z": z, "x": x, **(extra or {})}, str(inp))
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    done = subprocess.run(
        [python, str(Path(__file__).with_name(script)), mode, str(inp), str(out), json.dumps(config or {})],
        cwd=os.environ["COMFYUI_PATH"], capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return load_file(str(out))


def as_core_vae(ours, z, frames):
    """Our video VAE module called the way comfy.sd.VAE's decode / encode call theirs: decode gives [B, T, H, W, 3]
    in [0, 1]; encode takes IMAGE frames [T, H, W, 3], centre-cropped to whole latent pixels, as one video."""
    s = ours.params.downscale
    H, W = frames.shape[1] - frames.shape[1] % s, frames.shape[2] - frames.shape[2] % s
    top, left = frames.shape[1] % s // 2, frames.shape[2] % s // 2
    with torch.inference_mode():
        decoded = ((ours.decode(z) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
        video = frames[:, top : top + H, left : left + W].permute(3, 0, 1, 2)[None] * 2 - 1  # [1, 3, T, H, W]
        return decoded, ours.encode(video)


def max_rel_err(out, ref) -> float:
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    return ((out - ref).abs().max() / ref.abs().max()).item()
