"""Random-weight BAGEL models: a tiny checkpoint folder in the real file layout, and in-memory full size.

`write_tiny_checkpoint` writes what the HF repo ByteDance-Seed/BAGEL-7B-MoT holds (json configs, bf16
ema.safetensors with the real key names, the FLUX ae.safetensors, Qwen2.5-style tokenizer files) at test
size, so that the loader, the pipelines and the nodes run end to end on CPU in seconds. Its tokenizer is a
small byte-level BPE whose special tokens carry the Qwen2.5 ids (151643...); the ids in between are filler
vocabulary entries that no merge produces. `random_bagel` builds any named size directly on a device.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch
from safetensors.torch import save_file

from ..autoencoder import AutoEncoder, random_autoencoder
from .config import CONFIGS, BagelParams, LLMConfig
from .model import Bagel, sincos_2d_table

# Tensor-parallel tests need more heads than "tiny" has: 8 query heads on 2 KV heads split evenly on 2 ranks,
# straddle a GQA group on 3 (3, 3, 2 heads; rank 1 reads both KV heads), replicate the KV heads on 4; the 176
# MLP rows split unevenly on 3 (59, 59, 58).
TINY_TP_PARAMS = replace(CONFIGS["tiny"], llm=LLMConfig(128, 176, 2, 8, 2, 151680, 1_000_000.0, 1e-6, "silu"))
QWEN25_FIRST_SPECIAL_ID = 151643
# Qwen2.5 added tokens in id order from 151643; the bool says whether the tokenizer marks it special.
QWEN25_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]  # fmt: skip
# Qwen2's pre-tokenizer split (digits one by one).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TINY_MERGES = [("Ġ", "a"), ("t", "h"), ("th", "e"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("i", "n"), ("Ġ", "the")]


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in byte order (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = {b: 256 + i for i, b in enumerate(b for b in range(256) if b not in keep)}
    return [chr(b if b in keep else shifted[b]) for b in range(256)]


def tiny_vocab() -> dict[str, int]:
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    for a, b in TINY_MERGES:
        vocab[a + b] = len(vocab)
    for i in range(len(vocab), QWEN25_FIRST_SPECIAL_ID):
        vocab[f"<filler{i}>"] = i  # never produced: no merge builds it
    return vocab


def tokenizer_files() -> dict[str, str]:
    """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json as text."""
    vocab = tiny_vocab()
    added = [
        {"id": QWEN25_FIRST_SPECIAL_ID + i, "content": text, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": special}
        for i, (text, special) in enumerate(QWEN25_ADDED_TOKENS)
    ]  # fmt: skip
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
             "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": vocab, "merges": [f"{a} {b}" for a, b in TINY_MERGES]}  # fmt: skip
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                 "normalizer": {"type": "NFC"},
                 "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]},
                 "post_processor": byte_level, "decoder": byte_level, "model": model}  # fmt: skip
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    return {
        "tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in TINY_MERGES),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }


def config_files(params: BagelParams) -> dict[str, dict]:
    llm, vit = params.llm, params.vit
    llm_config = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "hidden_act": llm.hidden_act, "hidden_size": llm.hidden_size, "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size, "max_position_embeddings": 32768, "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers, "num_key_value_heads": llm.num_key_value_heads,
        "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "vocab_size": llm.vocab_size,
    }  # fmt: skip
    vit_config = {
        "architectures": ["SiglipVisionModel"], "attention_dropout": 0.0, "hidden_act": vit.hidden_act,
        "hidden_size": vit.hidden_size, "image_size": vit.image_size, "intermediate_size": vit.intermediate_size,
        "layer_norm_eps": vit.layer_norm_eps, "model_type": "siglip_vision_model",
        "num_attention_heads": vit.num_attention_heads, "num_channels": vit.num_channels,
        "num_hidden_layers": vit.num_hidden_layers, "patch_size": vit.patch_size, "torch_dtype": "bfloat16",
    }  # fmt: skip
    # Like the real config.json this one is not authoritative: its max_latent_size is stale on purpose.
    bagel_config = {
        "visual_gen": True, "visual_und": True, "latent_patch_size": 2, "max_latent_size": 32,
        "vit_max_num_patch_per_side": params.vit_max_patches_per_side, "connector_act": "gelu_pytorch_tanh",
        "interpolate_pos": False, "timestep_shift": 1.0,
        "vae_config": {"z_channels": params.vae_z_channels, "downsample": params.vae_downsample},
    }  # fmt: skip
    return {"llm_config.json": llm_config, "vit_config.json": vit_config, "config.json": bagel_config}


@torch.no_grad()
def init_random_(model: Bagel, seed: int) -> Bagel:
    """Seeded random weights in place, on the model's device: scaled matrices, norms near 1, sin-cos tables."""
    generator = torch.Generator(model.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("pos_embed.pos_embed"):
            p.copy_(sincos_2d_table(int(p.shape[0] ** 0.5), p.shape[1]))
            continue
        noise = torch.randn(p.shape, generator=generator, device=p.device)
        if p.ndim == 1:
            is_gain = name.endswith("weight")  # RMSNorm / LayerNorm gains
            p.copy_((1.0 if is_gain else 0.0) + (0.1 if is_gain else 0.02) * noise)
        elif "embed_tokens" in name or "position_embedding" in name:
            p.copy_(noise)
        else:
            p.copy_(noise * p.shape[1] ** -0.5)
    return model


def random_bagel(params: BagelParams, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> Bagel:
    """A random-weight Bagel built straight on `device` (no CPU copy of a full-size model)."""
    with torch.device("meta"):
        model = Bagel(params).to(dtype)  # cast on meta: full size never exists in fp32
    model = model.to_empty(device=device)
    return init_random_(model, seed).eval().requires_grad_(False)


def write_tiny_checkpoint(
    folder: str,
    seed: int = 0,
    vae_in_subfolder: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    vae: AutoEncoder | None = None,
    vae_dtype: torch.dtype = torch.float32,
    params: BagelParams = CONFIGS["tiny"],
) -> str:
    """Write a tiny random BAGEL checkpoint folder in the real layout; returns the folder.

    Args:
        vae_in_subfolder: put the autoencoder at vae/ae.safetensors (the DF11 layout) instead of the top.
        dtype: ema.safetensors dtype (bf16 like the real file; values load exactly into fp32).
        vae: the autoencoder written as ae.safetensors; None: a random "tiny" one. It must have z = 16 and
            downsample 8, like FLUX; pass a full-size random_autoencoder("flux") for hosts whose own VAE
            loader only accepts the real FLUX widths (ComfyUI's comfy.sd.VAE).
        vae_dtype: ae.safetensors dtype (bf16 halves the bytes of a full-size VAE; loaders cast to fp32).
        params: the model's sizes; CONFIGS["tiny"] or a variant of it such as TINY_TP_PARAMS.
    """
    os.makedirs(folder, exist_ok=True)
    for name, content in config_files(params).items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    for name, text in tokenizer_files().items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    model = random_bagel(params, seed)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "ema.safetensors")
    )
    vae_dir = os.path.join(folder, "vae") if vae_in_subfolder else folder
    os.makedirs(vae_dir, exist_ok=True)
    vae = random_autoencoder("tiny", seed=seed) if vae is None else vae
    if (vae.params.z_channels, vae.params.downscale) != (params.vae_z_channels, params.vae_downsample):
        raise ValueError(
            f"vae has z_channels {vae.params.z_channels} and downsample {vae.params.downscale}; the "
            f"tiny BAGEL needs {params.vae_z_channels} and {params.vae_downsample} (a FLUX-layout VAE)."
        )
    vae_sd = {k: v.to(vae_dtype).contiguous() for k, v in vae.state_dict().items()}
    save_file(vae_sd, os.path.join(vae_dir, "ae.safetensors"))
    return folder
