"""BAGEL Model Loader, Text to Image, Image Edit and Image Understanding: declarations plus one engine call."""

from __future__ import annotations

from dataclasses import dataclass

from ..bagel_vae_pp.bagel.loader import DTYPES, LoadedBagel, list_bagel_folders, load_bagel, resolve_folder
from ..bagel_vae_pp.bagel.pipeline import (
    DEFAULT_IMAGE_SIDE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_THINK_TOKENS,
    autoencoder_moments,
    edit_image,
    text_to_image,
    understand_image,
)
from ..bagel_vae_pp.bagel.quantize import WEIGHT_DTYPES
from ..bagel_vae_pp.bagel.sampler import DEFAULT_GUIDANCE, MAX_STEP_CACHE, RENORM_TYPES, GuidanceOptions
from ..bagel_vae_pp.bagel.stream import is_streamed, pass_work_bytes, stream_to_fit_, tensor_bytes
from ..bagel_vae_pp.bagel_job import load_on_pool
from ..bagel_vae_pp.pool import get_pool
from . import host

CATEGORY = "bagel-vae-pp/BAGEL"
MODEL_TYPE = "BAGEL_MODEL"
MAX_SEED = 0xFFFFFFFFFFFFFFFF

MODEL_INPUT = (MODEL_TYPE, {"tooltip": "A BAGEL model from the BAGEL Model Loader."})
PROMPT_INPUT = ("STRING", {"default": "", "multiline": True, "tooltip": "The text BAGEL follows (no chat template)."})
SEED_INPUT = (
    "INT",
    {
        "default": 0,
        "min": 0,
        "max": MAX_SEED,
        "step": 1,
        "control_after_generate": True,
        "tooltip": "Seeds the CPU generator, drawn in the official order; same seed, same result.",
    },
)
THINK_INPUT = (
    "BOOLEAN",
    {
        "default": False,
        "tooltip": "Let BAGEL plan in text (greedy) before drawing; the plan is returned as the thinking output.",
    },
)
THINK_TOKENS_INPUT = (
    "INT",
    {
        "default": DEFAULT_MAX_THINK_TOKENS,
        "min": 1,
        "max": 4096,
        "step": 1,
        "tooltip": "Think mode only: at most this many planning tokens.",
    },
)


@dataclass
class ManagedBagel:
    """What a BAGEL_MODEL link carries: the loaded model and ComfyUI's handle that moves it on and off the GPU."""

    loaded: LoadedBagel
    handle: object

    def on_device(self) -> LoadedBagel:
        """The model on ComfyUI's GPU: whole where it fits there, else with decoder layers streamed (stream.py)."""
        b = self.loaded
        if self.handle is None:  # the model lives in a worker pool, outside ComfyUI's management
            return b
        if not is_streamed(b.model):
            room = host.device_room(self.handle, pass_work_bytes(b.model.params, b.model.dtype))
            if room is not None and stream_to_fit_(b.model, room - tensor_bytes(b.vae), host.offload_device()):
                self.handle = host.managed(b.model, b.vae)  # ComfyUI holds the resident part and the slots
        host.load_for_compute(self.handle)
        return b


def guidance_inputs(defaults: GuidanceOptions) -> dict:
    """The sampler inputs shared by Text to Image and Image Edit, with each node's official defaults."""
    return {
        "steps": (
            "INT",
            {
                "default": defaults.num_timesteps,
                "min": 2,
                "max": 500,
                "step": 1,
                "tooltip": "Timesteps of the schedule "
                "(official num_timesteps): steps - 1 model evaluations, each up to 3 passes with CFG.",
            },
        ),
        "cfg_text_scale": (
            "FLOAT",
            {
                "default": defaults.cfg_text_scale,
                "min": 0.0,
                "max": 20.0,
                "step": 0.1,
                "tooltip": "Text "
                "guidance. At 1 or below all guidance is off, image guidance too (its pass is "
                "skipped, as its result would be discarded).",
            },
        ),
        "cfg_img_scale": (
            "FLOAT",
            {
                "default": defaults.cfg_img_scale,
                "min": 0.0,
                "max": 20.0,
                "step": 0.1,
                "tooltip": "Image guidance (against the context without images). Text to Image: without "
                "input images it strengthens text guidance to 1 + scale * (text - 1) at no "
                "extra cost; 1.5 is the official app's value.",
            },
        ),
        "cfg_interval_start": (
            "FLOAT",
            {
                "default": defaults.cfg_interval[0],
                "min": 0.0,
                "max": 1.0,
                "step": 0.01,
                "tooltip": "Guidance only where start < t <= end (t from 1 = noise to 0 = image, after the shift).",
            },
        ),
        "cfg_interval_end": (
            "FLOAT",
            {
                "default": defaults.cfg_interval[1],
                "min": 0.0,
                "max": 1.0,
                "step": 0.01,
                "tooltip": "Upper end of the guidance interval.",
            },
        ),
        "timestep_shift": (
            "FLOAT",
            {
                "default": defaults.timestep_shift,
                "min": 0.1,
                "max": 20.0,
                "step": 0.1,
                "tooltip": "Schedule shift s: t' = s*t / (1 + (s-1)*t); larger spends more steps near noise.",
            },
        ),
        "cfg_renorm_type": (
            list(RENORM_TYPES),
            {
                "default": defaults.cfg_renorm_type,
                "tooltip": "Rescale the guided velocity "
                "to at most the conditional norm: global (whole image), channel "
                "(per token), text_channel (per token, text guidance only). "
                "Blurry edits: try global.",
            },
        ),
        "cfg_renorm_min": (
            "FLOAT",
            {
                "default": defaults.cfg_renorm_min,
                "min": 0.0,
                "max": 1.0,
                "step": 0.01,
                "tooltip": "Lower bound of the renorm factor; 1.0 turns renorm off. 0 avoids "
                "over-exposure (maintainers' advice).",
            },
        ),
        "think": THINK_INPUT,
        "max_think_tokens": THINK_TOKENS_INPUT,
    }


# Optional (prompts saved before it existed still validate), so it sits after the other widgets.
STEP_CACHE_INPUT = ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_STEP_CACHE, "step": 0.01, "tooltip": "Speed-up, "
                    "off at 0: a step reuses the last computed velocity while the latent moved less than this "
                    "(relative L1) since then and guidance did not switch. Changes the image; 0 = the official "
                    "sampler."})  # fmt: skip


def guidance(kw: dict) -> GuidanceOptions:
    return GuidanceOptions(kw["steps"], kw["timestep_shift"], kw["cfg_text_scale"], kw["cfg_img_scale"],
                           (kw["cfg_interval_start"], kw["cfg_interval_end"]), kw["cfg_renorm_type"],
                           kw["cfg_renorm_min"], kw.get("step_cache", 0.0))  # fmt: skip


class BagelModelLoader:
    TITLE = "BAGEL Model Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads BAGEL-7B-MoT from a folder under models/bagel (llm_config.json, vit_config.json, "
        "ema.safetensors, tokenizer.json, ae.safetensors or vae/ae.safetensors). No flash-attn needed."
    )
    FUNCTION = "execute"
    RETURN_TYPES = (MODEL_TYPE, "VAE")
    RETURN_NAMES = ("bagel_model", "vae")
    OUTPUT_TOOLTIPS = ("The BAGEL model, for the BAGEL generation and understanding nodes.",
                       "The model's FLUX autoencoder, for VAE Decode or Distributed VAE Decode.")  # fmt: skip

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (list_bagel_folders(host.bagel_model_dirs()), {"tooltip": "A BAGEL model folder in "
                      "models/bagel, e.g. BAGEL-7B-MoT downloaded from ByteDance-Seed/BAGEL-7B-MoT."}),
            "dtype": (list(DTYPES), {"default": "bf16", "tooltip": "Weights and compute: bf16 (29 GB) on GPUs; "
                      "fp32 for exact comparisons. The VAE always stays fp32."}),
        }, "optional": {  # optional: prompts saved before these inputs existed still validate
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "bf16", "tooltip": "Storage of the language "
                             "model's layers: bf16 (27 GiB of parameters); fp8_e4m3fn (15 GiB, FP8 with a scale per "
                             "channel, computed in the dtype above, any GPU or CPU); fp8_e4m3fn_fast (FP8 matrix "
                             "products, bf16 only, GPUs of compute capability 8.9 or newer: RTX 40xx, H100). With a "
                             "pool, each worker holds its share in this storage."}),
            "pool": ("VAE_POOL", {"tooltip": "Run BAGEL in these workers (tensor parallel: 2 GPUs hold about 15 GiB "
                     "each in bf16, 9 GiB in FP8; 4 about 9 and 6). Unconnected: ComfyUI's own GPU, the whole model "
                     "on it."}),
            "split": ("STRING", {"default": "auto", "tooltip": "With a pool: its workers as GROUPSxTP, e.g. 2x2 = "
                      "2 groups that run the guidance passes of a step side by side, each 2 GPUs sharing the model "
                      "(tensor parallel). auto: the fewest GPUs per copy that fit, then up to 2 copies."}),
        }}  # fmt: skip

    def execute(self, model, dtype, weight_dtype="bf16", pool=None, split="auto"):
        folder = resolve_folder(host.bagel_model_dirs(), model)
        if pool is not None:  # ComfyUI's VAE object needs the released widths (released_vae_only)
            loaded = load_on_pool(get_pool(pool), folder, dtype, True, host.throw_if_interrupted, weight_dtype, split)
            return (ManagedBagel(loaded, None), host.make_comfy_vae(loaded.vae_state_dict))
        loaded = load_bagel(folder, host.offload_device(), dtype, True, weight_dtype, host.torch_device())
        managed = ManagedBagel(loaded, host.managed(loaded.model, loaded.vae))
        return (managed, host.make_comfy_vae(loaded.vae_state_dict))


class BagelTextToImage:
    TITLE = "BAGEL Text to Image"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Draws an image from a prompt with BAGEL's flow-matching sampler; the latent decodes with the "
        "loader's VAE (VAE Decode or Distributed VAE Decode)."
    )
    FUNCTION = "execute"
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "thinking")
    OUTPUT_TOOLTIPS = ("The image latent in ComfyUI's FLUX VAE space.", "The plan written in think mode, else empty.")

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": DEFAULT_IMAGE_SIDE, "min": 16, "max": 1024, "step": 16}
        return {"required": {
            "bagel_model": MODEL_INPUT, "prompt": PROMPT_INPUT, "seed": SEED_INPUT,
            "width": ("INT", {**size, "tooltip": "Multiple of 16, up to 1024 (BAGEL was tuned "
                      "at a long side of 1024; smaller images come out blurry)."}),
            "height": ("INT", {**size, "tooltip": "Multiple of 16, up to 1024."}),
            **guidance_inputs(DEFAULT_GUIDANCE["text_to_image"]),
        }, "optional": {"step_cache": STEP_CACHE_INPUT}}  # fmt: skip

    @classmethod
    def VALIDATE_INPUTS(cls, width, height):
        # ComfyUI checks min/max but not step; naming width/height here means we check all three, before queueing.
        for name, value in (("width", width), ("height", height)):
            if not 16 <= value <= 1024 or value % 16:
                return f"{name} is {value}; it must be a multiple of 16 from 16 to 1024."
        return True

    def execute(self, bagel_model, prompt, seed, width, height, **kw):
        progress = host.Progress(kw["steps"] - 1)
        bagel = bagel_model.on_device()
        latent, thinking = text_to_image(bagel.model, bagel.tokenizer, prompt, width, height, seed,
                                         guidance(kw), kw["think"], kw["max_think_tokens"], progress,
                                         host.throw_if_interrupted)  # fmt: skip
        return ({"samples": latent}, thinking)


class BagelImageEdit:
    TITLE = "BAGEL Image Edit"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Edits an image following an instruction. The image is resized to a long side of at most 1024 "
        "and a short side of at least 512 (multiples of 16); the latent has that size."
    )
    FUNCTION = "execute"
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("latent", "thinking")
    OUTPUT_TOOLTIPS = ("The edited image latent in ComfyUI's FLUX VAE space.", "The plan written in think mode.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"bagel_model": MODEL_INPUT,
                         "image": ("IMAGE", {"tooltip": "The image to edit (one image)."}),
                         "prompt": PROMPT_INPUT, "seed": SEED_INPUT,
                         **guidance_inputs(DEFAULT_GUIDANCE["edit"])},
            "optional": {"pool": ("VAE_POOL", {"tooltip": "Encode the conditioning image with these VAE workers "
                                  "(posterior mean). Unconnected: the local VAE samples the posterior, as the "
                                  "official app does."}),
                         "step_cache": STEP_CACHE_INPUT},
        }  # fmt: skip

    def execute(self, bagel_model, image, prompt, seed, pool=None, **kw):
        image = single_image(image)
        bagel = bagel_model.on_device()
        encode = autoencoder_moments(bagel.vae) if pool is None else pool_encoder(pool, bagel.vae)
        latent, thinking = edit_image(bagel.model, bagel.tokenizer, image, prompt, encode,
                                      seed, guidance(kw), kw["think"], kw["max_think_tokens"],
                                      host.Progress(kw["steps"] - 1), host.throw_if_interrupted)  # fmt: skip
        return ({"samples": latent}, thinking)


class BagelImageUnderstanding:
    TITLE = "BAGEL Image Understanding"
    CATEGORY = CATEGORY
    DESCRIPTION = "Answers a question about an image (captioning, VQA) with BAGEL's understanding expert."
    FUNCTION = "execute"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    OUTPUT_TOOLTIPS = ("BAGEL's answer.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "bagel_model": MODEL_INPUT,
            "image": ("IMAGE", {"tooltip": "The image to look at (one image)."}),
            "prompt": PROMPT_INPUT,
            "max_new_tokens": ("INT", {"default": DEFAULT_MAX_NEW_TOKENS, "min": 1, "max": 8192, "step": 1,
                                       "tooltip": "At most this many answer tokens."}),
            "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                      "tooltip": "0: greedy (official default). Above 0: sample; 0.3 is the "
                                      "official app's sampling temperature."}),
            "seed": SEED_INPUT,
            "think": ("BOOLEAN", {"default": False, "tooltip": "Reason inside <think> </think> first; the "
                                  "reasoning is part of the answer."}),
        }}  # fmt: skip

    def execute(self, bagel_model, image, prompt, max_new_tokens, temperature, seed, think):
        image = single_image(image)
        bagel = bagel_model.on_device()
        text = understand_image(
            bagel.model,
            bagel.tokenizer,
            image,
            prompt,
            max_new_tokens,
            temperature,
            seed,
            think,
            host.Progress(max_new_tokens),
            host.throw_if_interrupted,
        )
        return (text,)


def single_image(image):
    if image.shape[0] != 1:
        raise ValueError(f"image is a batch of {image.shape[0]}; BAGEL nodes take one image (use an image batch "
                         "splitter or run the node per image).")  # fmt: skip
    return image[0]


def pool_encoder(spec, vae):
    """pixels -> posterior mean through the VAE worker pool."""
    return lambda pixels: get_pool(spec).encode(vae, pixels, mode="exact", interrupt=host.throw_if_interrupted)


NODE_CLASSES = {
    "BagelVAEPP_LoadBagel": BagelModelLoader,
    "BagelVAEPP_TextToImage": BagelTextToImage,
    "BagelVAEPP_ImageEdit": BagelImageEdit,
    "BagelVAEPP_Understanding": BagelImageUnderstanding,
}
