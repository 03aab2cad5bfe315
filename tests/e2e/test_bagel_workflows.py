"""End-to-end: the saved BAGEL workflows inside a real ComfyUI server (`COMFYUI_PATH`), on the tiny checkpoint.

One server per module (see conftest.py); `models/bagel` holds a tiny random BAGEL whose ae.safetensors is a
full-size random FLUX VAE, so the loader's VAE output also works with core VAEDecode. The saved API workflows
run with the tiny model, a small size, 3 steps and two CPU workers: text to image (decoded by Distributed VAE
Decode and by core VAEDecode, which must agree), image edit with the pool encoding the condition image, image
understanding (its text read back from /history through core PreviewAny), and a bad width refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import SERVER_MARKS, node_id, nodes_of, read_pngs, run_ok, saved_images, write_png

pytestmark = SERVER_MARKS

REPO = Path(__file__).resolve().parents[2]
TEXT_TO_IMAGE = REPO / "workflows" / "api" / "bagel_text_to_image.json"
IMAGE_EDIT = REPO / "workflows" / "api" / "bagel_image_edit.json"
DEVICES = "cpu:2"
SIZE = 64  # px; the tiny BAGEL draws multiples of 16 up to 128
STEPS = 3  # timesteps: 2 model evaluations
SAMPLERS = ("BagelVAEPP_TextToImage", "BagelVAEPP_ImageEdit")


def bagel_prompt(server, path: Path, prefix: str) -> dict:
    """A saved BAGEL workflow on the tiny checkpoint: 64x64, 3 steps, two CPU workers, a unique prefix."""
    prompt = json.loads(path.read_text())
    for load in nodes_of(prompt, "BagelVAEPP_LoadBagel"):
        load["inputs"]["model"] = server.bagel_name
    for sampler in [node for kind in SAMPLERS for node in nodes_of(prompt, kind)]:
        sampler["inputs"]["steps"] = STEPS
    for sampler in nodes_of(prompt, "BagelVAEPP_TextToImage"):
        sampler["inputs"].update(width=SIZE, height=SIZE)
    for pool in nodes_of(prompt, "BagelVAEPP_WorkerPool"):
        pool["inputs"]["devices"] = DEVICES
    (save,) = nodes_of(prompt, "SaveImage")
    save["inputs"]["filename_prefix"] = prefix
    return prompt


class TestTextToImage:
    """Load BAGEL → Text to Image → Distributed VAE Decode → SaveImage, and the same latent through VAEDecode."""

    def test_listed_by_the_loader(self, comfy_server):
        info = comfy_server.get_json("/object_info/BagelVAEPP_LoadBagel")["BagelVAEPP_LoadBagel"]
        assert comfy_server.bagel_name in info["input"]["required"]["model"][0], info["input"]["required"]["model"]

    def test_saved_workflow_runs(self, comfy_server):
        prompt = bagel_prompt(comfy_server, TEXT_TO_IMAGE, "e2e/bagel_t2i")
        run = run_ok(comfy_server, prompt)
        (path,) = saved_images(comfy_server, run)
        from PIL import Image

        assert Image.open(path).size == (SIZE, SIZE)
        sampler = node_id(prompt, "BagelVAEPP_TextToImage")
        progress = [e["data"] for e in run.events if e["type"] == "progress" and e["data"]["node"] == sampler]
        assert progress and progress[-1]["value"] == progress[-1]["max"] == STEPS - 1, progress

    def test_core_vae_decode_matches(self, comfy_server):
        """One BAGEL latent, two decoders: Distributed VAE Decode (2 CPU workers, exact) and core VAEDecode."""
        prompt = bagel_prompt(comfy_server, TEXT_TO_IMAGE, "e2e/bagel_ours")
        load, sampler = node_id(prompt, "BagelVAEPP_LoadBagel"), node_id(prompt, "BagelVAEPP_TextToImage")
        save = node_id(prompt, "SaveImage")
        prompt["90"] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": [load, 1]}}
        prompt["91"] = {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": "e2e/bagel_core"}}
        run = run_ok(comfy_server, prompt)
        (ours,), (core,) = read_pngs(comfy_server, run, save), read_pngs(comfy_server, run, "91")
        assert ours.shape == core.shape == (SIZE, SIZE, 3)
        diff = abs(ours - core)
        print(f"BAGEL latent, Distributed VAE Decode vs core VAEDecode: max {diff.max()}/255, mean {diff.mean():.4f}")
        assert diff.max() <= 1, f"max |ours - core| = {diff.max()}/255, mean {diff.mean():.3f}"
        assert core.std() > 1, "the decoded image is flat: the comparison would prove nothing"


class TestOnThePool:
    """The loader's optional pool (the saved workflow links it): BAGEL on CPU workers, as CFG groups (auto: 2x1 on
    the pool's 2 workers), tensor parallel (1x2, and 1x3 with uneven heads) or both, draws what it draws in
    ComfyUI's process (fp32 all, so the only difference is the order of the sums)."""

    def test_same_image_as_in_process(self, comfy_server):
        images = {}
        for devices, split in (("in-process", None), ("all", "auto"), ("all", "1x2"), ("cpu:3", "1x3"),
                               ("cpu:4", "2x2")):  # fmt: skip
            prompt = bagel_prompt(comfy_server, TEXT_TO_IMAGE, f"e2e/bagel_pool_{devices}_{split}")
            load, pool = node_id(prompt, "BagelVAEPP_LoadBagel"), node_id(prompt, "BagelVAEPP_WorkerPool")
            prompt[load]["inputs"]["dtype"] = "fp32"
            assert prompt[load]["inputs"].pop("pool") == [pool, 0]
            if split is not None:
                prompt[load]["inputs"].update(pool=[pool, 0], split=split)
                prompt[pool]["inputs"]["devices"] = devices
            run = run_ok(comfy_server, prompt)
            (images[devices, split],) = read_pngs(comfy_server, run, node_id(prompt, "SaveImage"))
        want = images["in-process", None]
        assert want.std() > 1
        for key, image in images.items():
            assert abs(image - want).max() <= 1, f"{key}: max {abs(image - want).max()}/255"


class TestImageEdit:
    """LoadImage → BAGEL Image Edit (condition encoded by the pool) → Distributed VAE Decode → SaveImage."""

    def test_saved_workflow_runs(self, comfy_server):
        write_png(comfy_server.input_dir / "e2e_bagel_edit.png", 96, 64)
        prompt = bagel_prompt(comfy_server, IMAGE_EDIT, "e2e/bagel_edit")
        (load,) = nodes_of(prompt, "LoadImage")
        load["inputs"]["image"] = "e2e_bagel_edit.png"
        run = run_ok(comfy_server, prompt)
        (path,) = saved_images(comfy_server, run)
        from PIL import Image

        assert Image.open(path).size == (96, 64)  # within the tiny model's 64..128 px resize range: kept


class TestUnderstanding:
    """LoadImage → BAGEL Image Understanding → core PreviewAny: the answer is in /history."""

    def test_returns_text(self, comfy_server):
        write_png(comfy_server.input_dir / "e2e_bagel_understand.png", 64, 64)
        question = {"bagel_model": ["1", 0], "image": ["2", 0], "prompt": "What is in the image?",
                    "max_new_tokens": 8, "temperature": 0.0, "seed": 0, "think": False}  # fmt: skip
        prompt = {
            "1": {"class_type": "BagelVAEPP_LoadBagel", "inputs": {"model": comfy_server.bagel_name, "dtype": "bf16"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "e2e_bagel_understand.png"}},
            "3": {"class_type": "BagelVAEPP_Understanding", "inputs": question},
            "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        }
        run = run_ok(comfy_server, prompt)
        (text,) = run.history["outputs"]["4"]["text"]
        assert isinstance(text, str) and text, run.history["outputs"]


class TestBadInputs:
    """A width the checkpoint cannot draw is refused with a message naming the input and its value."""

    @pytest.mark.parametrize("width", [72, 256], ids=["not-multiple-of-16", "over-tiny-max-128"])
    def test_bad_width(self, comfy_server, width):
        prompt = bagel_prompt(comfy_server, TEXT_TO_IMAGE, "e2e/bagel_bad_width")
        sampler = node_id(prompt, "BagelVAEPP_TextToImage")
        prompt[sampler]["inputs"]["width"] = width
        run = comfy_server.run_prompt(prompt)
        if run.http_status == 400:  # refused at validation
            message = json.dumps(run.response["node_errors"][sampler]["errors"])
        else:  # refused when the node runs
            assert run.status_str == "error", run.describe()
            (error,) = run.errors()
            assert error["node_id"] == sampler, run.describe()
            message = error["exception_message"]
        assert "width" in message and str(width) in message, message
        assert "Traceback" not in message and len(message) < 2000, message
