"""BAGEL-7B-MoT configuration: the two HF json files of a checkpoint folder, plus what the weights say.

`llm_config.json` (a Qwen2 config) and `vit_config.json` (a SigLIP vision config) are read into frozen
dataclasses whose fields have no defaults: a missing key is an error naming the file. Values the official
code hard-codes in app.py (latent patch 2, connector GELU-tanh, qk-norm on, one ViT layer dropped) are module
constants; values the official code gets wrong for some checkpoints (`max_latent_size`) come from tensor
shapes (`BagelParams`). Named sizes for random-weight models live in `CONFIGS`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

# Hard-coded in the official app.py / inferencer, identical for every released BAGEL checkpoint.
LATENT_PATCH_SIZE = 2  # 2x2 VAE latent pixels per generation token
VAE_SCALE = 0.3611  # FLUX ae: BAGEL latent = VAE_SCALE * (raw - VAE_SHIFT)
VAE_SHIFT = 0.1159
TIMESTEP_FREQ_DIM = 256  # sinusoid width fed to time_embedder.mlp.0
VAE_RESIZE_MIN = 512  # ImageTransform(1024, 512, 16): short side >= 512 for a 1024 px model
VIT_RESIZE_MIN = 224  # ImageTransform(980, 224, 14)
MAX_PIXELS = 14 * 14 * 9 * 1024  # ImageTransform default max_pixels, used by both resizes

# The Qwen2.5 special tokens BAGEL uses (data_utils.add_special_tokens); ids come from the tokenizer file.
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
START_OF_IMAGE_TOKEN = "<|vision_start|>"
END_OF_IMAGE_TOKEN = "<|vision_end|>"


def _read_json(path: str, cls) -> dict:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    names = [f.name for f in fields(cls) if f.init]
    missing = [n for n in names if n not in raw]
    if missing:
        raise ValueError(
            f"{os.path.basename(path)}: missing keys {missing} (at {path}). Re-download the checkpoint's json "
            "files from ByteDance-Seed/BAGEL-7B-MoT."
        )
    return {n: raw[n] for n in names}


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2.5-7B as in llm_config.json; BAGEL adds q/k RMSNorm and a second (`*_moe_gen`) weight set."""

    hidden_size: int  # 3584
    intermediate_size: int  # 18944
    num_hidden_layers: int  # 28
    num_attention_heads: int  # 28
    num_key_value_heads: int  # 4 (GQA x7)
    vocab_size: int  # 152064
    rope_theta: float  # 1e6
    rms_norm_eps: float  # 1e-6
    hidden_act: str  # "silu"
    head_dim: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.hidden_act != "silu":
            raise ValueError(f"llm_config.json: hidden_act is {self.hidden_act!r}; BAGEL's Qwen2 uses 'silu'.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"llm_config.json: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}."
            )

    @classmethod
    def from_json(cls, path: str) -> LLMConfig:
        return cls(**_read_json(path, cls))


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP-so400m NaViT as in vit_config.json. The json counts 27 layers; BAGEL runs the first 26."""

    hidden_size: int  # 1152
    intermediate_size: int  # 4304
    num_hidden_layers: int  # 27 as written in the json
    num_attention_heads: int  # 16
    num_channels: int  # 3
    patch_size: int  # 14
    image_size: int  # 980
    layer_norm_eps: float  # 1e-6
    hidden_act: str  # "gelu_pytorch_tanh"
    layers_used: int = field(init=False)  # num_hidden_layers - 1: penultimate features (vit_select_layer=-2)

    def __post_init__(self):
        object.__setattr__(self, "layers_used", self.num_hidden_layers - 1)
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"vit_config.json: hidden_act is {self.hidden_act!r}; expected 'gelu_pytorch_tanh'.")

    @classmethod
    def from_json(cls, path: str) -> ViTConfig:
        return cls(**_read_json(path, cls))

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class BagelParams:
    """Everything the model code needs, from the json files and the checkpoint's tensor shapes."""

    llm: LLMConfig
    vit: ViTConfig
    max_latent_size: int  # generation tokens per side (64 -> 1024 px); from latent_pos_embed.pos_embed
    vit_max_patches_per_side: int  # 70; from vit_pos_embed.pos_embed
    vae_z_channels: int  # 16; from ae.safetensors
    vae_downsample: int  # 8; from ae.safetensors
    latent_downsample: int = field(init=False)  # pixels per generation token side (16)
    patch_latent_dim: int = field(init=False)  # channels of one generation token (2*2*16 = 64)

    def __post_init__(self):
        object.__setattr__(self, "latent_downsample", self.vae_downsample * LATENT_PATCH_SIZE)
        object.__setattr__(self, "patch_latent_dim", LATENT_PATCH_SIZE**2 * self.vae_z_channels)

    @property
    def max_image_size(self) -> int:
        return self.max_latent_size * self.latent_downsample


# Named sizes for random-weight models: the real architecture (benchmarks) and the tests' tiny one.
CONFIGS = {
    "7b-mot": BagelParams(
        llm=LLMConfig(3584, 18944, 28, 28, 4, 152064, 1_000_000.0, 1e-6, "silu"),
        vit=ViTConfig(1152, 4304, 27, 16, 3, 14, 980, 1e-6, "gelu_pytorch_tanh"),
        max_latent_size=64,
        vit_max_patches_per_side=70,
        vae_z_channels=16,
        vae_downsample=8,
    ),
    # Vocabulary covers the Qwen2.5 special-token ids (151643..151664); ViT 10x10 patches; <= 128 px images.
    "tiny": BagelParams(
        llm=LLMConfig(64, 128, 2, 4, 2, 151680, 1_000_000.0, 1e-6, "silu"),
        vit=ViTConfig(32, 64, 3, 2, 3, 14, 140, 1e-6, "gelu_pytorch_tanh"),
        max_latent_size=8,
        vit_max_patches_per_side=10,
        vae_z_channels=16,
        vae_downsample=8,
    ),
}
