"""The saved round-trip workflow (`workflows/api/vae_roundtrip_4k.json`) as the server tests run it, and the check
that our decode's pixels equal core VAEDecode's of the same latent."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import node_id, nodes_of, read_pngs

ROUNDTRIP = Path(__file__).resolve().parents[2] / "workflows" / "api" / "vae_roundtrip_4k.json"
DEVICES = "cpu:2"


def roundtrip_prompt(server, image_name: str, prefix: str) -> dict:
    """The saved round-trip workflow with the test image, test VAE, two CPU workers and a unique prefix."""
    prompt = json.loads(ROUNDTRIP.read_text())
    (load,) = nodes_of(prompt, "LoadImage")
    load["inputs"]["image"] = image_name
    for vae in nodes_of(prompt, "VAELoader"):
        vae["inputs"]["vae_name"] = server.vae_name
    for pool in nodes_of(prompt, "BagelVAEPP_WorkerPool"):
        pool["inputs"]["devices"] = DEVICES
    (save,) = nodes_of(prompt, "SaveImage")
    save["inputs"]["filename_prefix"] = prefix
    return prompt


def checked_roundtrip_prompt(server, image_name: str, prefix: str, batch: int = 1) -> tuple[dict, str, str]:
    """The saved round trip on `batch` copies of the image, plus core VAEDecode of the latent our encode made.

    Returns (prompt, id of our SaveImage, id of the core decode's SaveImage): both must hold the same pixels.
    """
    prompt = roundtrip_prompt(server, image_name, prefix)
    load, vae, save = node_id(prompt, "LoadImage"), node_id(prompt, "VAELoader"), node_id(prompt, "SaveImage")
    encode = node_id(prompt, "BagelVAEPP_DistributedEncode")
    prompt["90"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [load, 0], "amount": batch}}
    prompt[encode]["inputs"]["pixels"] = ["90", 0]
    prompt["91"] = {"class_type": "VAEDecode", "inputs": {"samples": [encode, 0], "vae": [vae, 0]}}
    prompt["92"] = {"class_type": "SaveImage", "inputs": {"images": ["91", 0], "filename_prefix": f"{prefix}_core"}}
    return prompt, save, "92"


def assert_decodes_match_core(server, run, ours: str, core: str, batch: int, what: str) -> None:
    """Our decode's PNGs equal core VAEDecode's of the same latent within 1/255 (rounding to 8 bits)."""
    ours_png, core_png = read_pngs(server, run, ours), read_pngs(server, run, core)
    assert len(ours_png) == len(core_png) == batch, f"{what}: {len(ours_png)} and {len(core_png)} images saved"
    for i, (a, b) in enumerate(zip(ours_png, core_png, strict=True)):
        assert a.shape == b.shape, f"{what}, image {i}: {a.shape} vs core {b.shape}"
        diff = abs(a - b)
        assert diff.max() <= 1, (
            f"{what}, image {i}: max |ours - core VAEDecode| = {diff.max()}/255, mean {diff.mean():.2f}: "
            "the job returned other pixels than its own latent's"
        )
        assert b.std() > 1, f"{what}, image {i}: the decoded image is flat: the comparison would prove nothing"


def core_roundtrip_prompt(server, image_name: str, prefix: str) -> dict:
    """The same round trip with core VAEEncode / VAEDecode: the reference for exact mode."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": server.vae_name}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }
