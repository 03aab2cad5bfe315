"""VAE Worker Pool, Distributed VAE Decode and Distributed VAE Encode: declarations plus one engine call."""

from __future__ import annotations

import torch

from ..bagel_vae_pp.inputs import DTYPE_NAMES, MODES, parse_devices
from ..bagel_vae_pp.pool import PoolSpec, get_pool
from . import host

CATEGORY = "bagel-vae-pp/VAE"
POOL_TYPE = "VAE_POOL"
POOL_INPUT = (
    POOL_TYPE,
    {
        "tooltip": "Workers from a VAE Worker Pool node. Unconnected: every GPU (or 2 CPU "
        "workers when ComfyUI runs on CPU), dtype auto."
    },
)
MODE_INPUT = (
    list(MODES),
    {
        "default": "exact",
        "tooltip": "exact: split by rows with halo exchange, synchronised "
        "GroupNorm and global attention; equals a single-GPU run. tiled: independent "
        "overlapping tiles blended with a feather; approximate, for images too large even "
        "for exact mode (a video VAE's tiles are placed and blended as VAE Decode (Tiled) / VAE Encode (Tiled) do).",
    },
)
TILE_INPUT = (
    "INT",
    {"default": 1024, "min": 64, "max": 8192, "step": 64, "tooltip": "Tiled mode only: tile side in image pixels."},
)
OVERLAP_INPUT = (
    "INT",
    {
        "default": 128,
        "min": 0,
        "max": 2048,
        "step": 32,
        "tooltip": "Tiled mode only: overlap between tiles in image pixels (less than half a tile).",
    },
)

# Optional, so saved workflows without them stay valid; defaults and meaning are core VAE Decode (Tiled)'s.
TEMPORAL_INPUTS = {
    "temporal_size": (
        "INT",
        {
            "default": 64,
            "min": 8,
            "max": 4096,
            "step": 4,
            "tooltip": "Tiled mode with a video VAE only: frames per temporal tile (as VAE Decode (Tiled)).",
        },
    ),
    "temporal_overlap": (
        "INT",
        {
            "default": 8,
            "min": 4,
            "max": 4096,
            "step": 4,
            "tooltip": "Tiled mode with a video VAE only: frames shared by neighbouring temporal tiles (at most half "
            "of temporal_size).",
        },
    ),
}
# Optional too; only the LTX-Video VAE draws noise when it decodes (core draws it unseeded, a new picture each time).
SEED_INPUT = {
    "seed": (
        "INT",
        {
            "default": 0,
            "min": 0,
            "max": 0xFFFFFFFFFFFFFFFF,
            "step": 1,
            "tooltip": "LTX-Video VAE only: the seed of the noise its decoder adds (the same frames for the same "
            "seed, on any number of GPUs). Other VAEs ignore it.",
        },
    ),
}


def pool_for(spec: PoolSpec | None):
    return get_pool(spec or PoolSpec.parse("all", "auto", prefer_cpu=host.is_cpu_host()))


class VAEWorkerPool:
    TITLE = "VAE Worker Pool"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Starts one worker process per device (kept across prompts) for the Distributed VAE nodes. "
        "Free model and node cache stops them; the next prompt starts them again."
    )
    FUNCTION = "execute"
    RETURN_TYPES = (POOL_TYPE,)
    RETURN_NAMES = ("pool",)
    OUTPUT_TOOLTIPS = ("The worker pool, for Distributed VAE Decode / Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "devices": (
                    "STRING",
                    {
                        "default": "all",
                        "tooltip": "'all' (every GPU), GPU ids like '0,1,2,3', or 'cpu:N' for N CPU worker processes.",
                    },
                ),
                "dtype": (
                    list(DTYPE_NAMES),
                    {
                        "default": "auto",
                        "tooltip": "Compute dtype in the workers. auto: bf16 "
                        "on GPUs, fp32 on CPU. FLUX VAEs overflow in fp16.",
                    },
                ),
                "timeout_s": (
                    "INT",
                    {
                        "default": 120,
                        "min": 5,
                        "max": 86400,
                        "step": 5,
                        "tooltip": "A job running "
                        "longer than this (plus an allowance for its size) counts as stuck: the pool "
                        "is stopped and an error raised.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, devices):
        # Only `devices` is named here: ComfyUI skips its own range/combo checks for inputs listed in this signature.
        try:
            parse_devices(devices, torch.cuda.device_count(), host.is_cpu_host())
        except ValueError as e:
            return str(e)
        return True

    def execute(self, devices, dtype, timeout_s):
        spec = PoolSpec.parse(devices, dtype, timeout_s, prefer_cpu=host.is_cpu_host())
        get_pool(spec).start()
        return (spec,)


def host_hooks() -> dict:
    """What a pool job takes from ComfyUI: its interrupt, a progress bar, and room made on the pool's GPUs."""
    return {"interrupt": host.throw_if_interrupted, "progress": host.Progress(100), "make_room": host.make_room}


class DistributedVAEDecode:
    TITLE = "Distributed VAE Decode"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Decodes latents to images with the VAE split across several GPUs (or CPU workers); a video latent "
        "(Wan 2.1 / 2.2, HunyuanVideo or LTX-Video VAE) to its frames, one video after the other, as VAE Decode "
        "returns them. Exact mode gives the same image as VAE Decode on one device, with a fraction of the memory on "
        "each."
    )
    FUNCTION = "execute"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."}),
                "mode": MODE_INPUT,
                "tile_size": TILE_INPUT,
                "overlap": OVERLAP_INPUT,
            },
            "optional": {"pool": POOL_INPUT, **TEMPORAL_INPUTS, **SEED_INPUT},
        }

    def execute(self, samples, vae, mode, tile_size, overlap, pool=None, temporal_size=64, temporal_overlap=8,
                seed=0):  # fmt: skip
        temporal = {"temporal_size": temporal_size, "temporal_overlap": temporal_overlap}
        workers = pool_for(pool)
        return (workers.decode(host.vae_module(vae), samples["samples"], mode, tile_size, overlap, **temporal,
                               seed=seed, **host_hooks()),)  # fmt: skip


class DistributedVAEEncode:
    TITLE = "Distributed VAE Encode"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Encodes images to latents with the VAE split across several GPUs (or CPU workers). Sizes "
        "that are not multiples of 8 are centre-cropped like VAE Encode; the result is the "
        "deterministic posterior mean, the same as VAE Encode gives. With a video VAE the images are the frames of one "
        "video: frame 1, then whole groups of 4 (a last partial group is left out, as VAE Encode leaves it); the "
        "LTX-Video VAE needs 1 + 8k frames, as VAE Encode does."
    )
    FUNCTION = "execute"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The encoded latent, in the VAE's raw space (as VAE Encode returns it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "The image to be encoded."}),
                "vae": ("VAE", {"tooltip": "The VAE model used for encoding the image."}),
                "mode": MODE_INPUT,
                "tile_size": TILE_INPUT,
                "overlap": OVERLAP_INPUT,
            },
            "optional": {"pool": POOL_INPUT, **TEMPORAL_INPUTS},
        }

    def execute(self, pixels, vae, mode, tile_size, overlap, pool=None, temporal_size=64, temporal_overlap=8):
        temporal = {"temporal_size": temporal_size, "temporal_overlap": temporal_overlap}
        latent = pool_for(pool).encode(host.vae_module(vae), pixels, mode, tile_size, overlap, **temporal,
                                       **host_hooks())  # fmt: skip
        return ({"samples": latent},)


NODE_CLASSES = {
    "BagelVAEPP_WorkerPool": VAEWorkerPool,
    "BagelVAEPP_DistributedDecode": DistributedVAEDecode,
    "BagelVAEPP_DistributedEncode": DistributedVAEEncode,
}
