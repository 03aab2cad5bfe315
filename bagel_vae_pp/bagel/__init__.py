"""BAGEL-7B-MoT in our own code: config, tokenizer, Qwen2 MoT LLM, SigLIP NaViT, sampler, loader, pipelines."""

from .config import CONFIGS, BagelParams, LLMConfig, ViTConfig
from .loader import LoadedBagel, list_bagel_folders, load_bagel, resolve_folder
from .model import Bagel, Context
from .pipeline import autoencoder_moments, edit_image, text_to_image, understand_image
from .sampler import RENORM_TYPES, GuidanceOptions
from .tokenizer import BagelTokenizer

__all__ = [
    "CONFIGS",
    "RENORM_TYPES",
    "Bagel",
    "BagelParams",
    "BagelTokenizer",
    "Context",
    "GuidanceOptions",
    "LLMConfig",
    "LoadedBagel",
    "ViTConfig",
    "autoencoder_moments",
    "edit_image",
    "list_bagel_folders",
    "load_bagel",
    "resolve_folder",
    "text_to_image",
    "understand_image",
]
