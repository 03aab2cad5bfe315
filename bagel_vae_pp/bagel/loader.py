"""Find and load a BAGEL-7B-MoT checkpoint folder (the HF repo layout) strictly, without a second copy.

A folder holds `llm_config.json`, `vit_config.json`, `ema.safetensors` (all of BAGEL, bf16), the Qwen2.5
`tokenizer.json`, and the FLUX `ae.safetensors` at the top or in `vae/`. The model is built on the meta
device; each tensor is read from safetensors straight to its device and dtype and assigned
(`load_state_dict(strict=True, assign=True)`), after a key and shape check that names what differs.
`max_latent_size` and the ViT table side come from the position-table shapes, not from config.json.
With a weight dtype other than "bf16" the decoder-layer Linears are stored in FP8 (quantize.py): quantized
as they are read from a bf16 file, or read as they are from an FP8 checkpoint (tools/quantize_bagel_fp8.py).
Hosts whose VAE class builds only the released widths (ComfyUI's) ask for those to be checked first.
With a device budget the model is read into CPU memory and the decoder layers that do not fit the device are
streamed from there (stream.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..autoencoder import (
    AutoEncoder,
    AutoEncoderParams,
    autoencoder_from_state_dict,
    describe_keys,
    detect_params,
    strip_prefixes,
)
from .config import BagelParams, LLMConfig, ViTConfig
from .model import Bagel
from .quantize import check_weight_dtype, is_fp8_checkpoint, quantize_llm_, read_weights, stored_layout
from .stream import fit_, tensor_bytes
from .tokenizer import BagelTokenizer

REQUIRED_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors", "tokenizer.json")
VAE_LOCATIONS = ("ae.safetensors", os.path.join("vae", "ae.safetensors"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The released BAGEL's ae.safetensors (FLUX's): base width, width multipliers, resnets per encoder level.
# ComfyUI's VAE class builds exactly these for a FLUX-layout file and fails on others, one line per tensor.
RELEASED_VAE_WIDTHS = (128, (1, 2, 4, 4), 2)


@dataclass
class LoadedBagel:
    model: Bagel
    tokenizer: BagelTokenizer
    vae: AutoEncoder  # our FLUX autoencoder (fp32), used for the edit's conditioning encode
    vae_state_dict: dict  # ae.safetensors as loaded, for a host VAE object
    folder: str


def find_vae_file(folder: str) -> str | None:
    for rel in VAE_LOCATIONS:
        if os.path.isfile(os.path.join(folder, rel)):
            return os.path.join(folder, rel)
    return None


def is_bagel_folder(folder: str) -> bool:
    files_ok = all(os.path.isfile(os.path.join(folder, name)) for name in REQUIRED_FILES)
    return files_ok and find_vae_file(folder) is not None


def check_folder(folder: str) -> None:
    """Raise, naming the files that are missing, unless `folder` holds a complete BAGEL checkpoint."""
    if not is_bagel_folder(folder):
        resolve_folder([os.path.dirname(folder)], os.path.basename(folder))


def list_bagel_folders(roots: list[str]) -> list[str]:
    """Sub-folders (one or two levels deep) of the roots that hold a complete BAGEL checkpoint, sorted."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            candidates = [entry.path] + [e.path for e in os.scandir(entry.path) if e.is_dir()]
            found.update(os.path.relpath(c, root) for c in candidates if is_bagel_folder(c))
    return sorted(p.replace(os.sep, "/") for p in found)


def resolve_folder(roots: list[str], name: str) -> str:
    for root in roots:
        path = os.path.join(root, name)
        if is_bagel_folder(path):
            return path
    raise FileNotFoundError(
        f"BAGEL model {name!r} not found in {roots}: a model folder needs {', '.join(REQUIRED_FILES)} and "
        "ae.safetensors (or vae/ae.safetensors). Download ByteDance-Seed/BAGEL-7B-MoT into models/bagel/<name>."
    )


def read_vae_params(path: str) -> AutoEncoderParams:
    """The autoencoder's configuration from an ae.safetensors header (no weights read)."""
    with safe_open(path, framework="pt") as f:
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    return detect_params(strip_prefixes(shapes))


def check_released_vae_widths(path: str) -> None:
    """Refuse an autoencoder file whose widths are not the released BAGEL's, reading only its header."""
    p = read_vae_params(path)
    if (p.ch, p.ch_mult, p.num_res_blocks) != RELEASED_VAE_WIDTHS:
        ch, ch_mult, blocks = RELEASED_VAE_WIDTHS
        raise ValueError(
            f"{path}: the autoencoder is {p.ch} channels wide (ch_mult {p.ch_mult}, {p.num_res_blocks} resnets per "
            f"level); ComfyUI's VAE class builds only the released BAGEL's, {ch} wide (ch_mult {ch_mult}, {blocks} "
            "resnets). Use the ae.safetensors of ByteDance-Seed/BAGEL-7B-MoT (a tiny test checkpoint: "
            "tools/make_tiny_bagel.py --vae-size flux)."
        )


def square_side(path: str, key: str, shapes: dict) -> int:
    if key not in shapes:
        raise ValueError(f"{path}: no {key!r} tensor; this is not a BAGEL-7B-MoT ema.safetensors.")
    n = shapes[key][0]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{path}: {key} has {n} rows, not a square position table.")
    return side


def read_params(folder: str, ema_path: str, vae_params) -> BagelParams:
    with safe_open(ema_path, framework="pt") as f:
        shapes = {
            k: f.get_slice(k).get_shape()
            for k in ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")
            if k in f.keys()
        }
    return BagelParams(
        llm=LLMConfig.from_json(os.path.join(folder, "llm_config.json")),
        vit=ViTConfig.from_json(os.path.join(folder, "vit_config.json")),
        max_latent_size=square_side(ema_path, "latent_pos_embed.pos_embed", shapes),
        vit_max_patches_per_side=square_side(ema_path, "vit_pos_embed.pos_embed", shapes),
        vae_z_channels=vae_params.z_channels,
        vae_downsample=vae_params.downscale,
    )


def read_folder_params(folder: str) -> BagelParams:
    """A checkpoint folder's sizes from its json configs and safetensors headers alone (no weights read)."""
    return read_params(folder, os.path.join(folder, "ema.safetensors"), read_vae_params(find_vae_file(folder)))


def check_keys(expected: dict, found: dict, what: str) -> None:
    """Raise naming counts and first keys if key sets differ, or the first tensor whose shape differs."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"{what}: weights do not match the BAGEL model built from the json configs: {len(missing)} missing "
            f"({describe_keys(missing)}), {len(unexpected)} unexpected ({describe_keys(unexpected)}). Check that "
            "the folder holds BAGEL-7B-MoT's ema.safetensors and the json files that came with it."
        )
    for key, tensor in expected.items():
        if tuple(found[key]) != tuple(tensor.shape):
            raise ValueError(f"{what}: {key} has shape {tuple(found[key])}, the configs expect {tuple(tensor.shape)}.")


def load_bagel_model(
    ema_path: str, params: BagelParams, device, dtype: torch.dtype, weight_dtype: str = "bf16"
) -> Bagel:
    with torch.device("meta"):
        model = Bagel(params).to(dtype)  # the Linears' dtype is the quantized layers' compute dtype
    with safe_open(ema_path, framework="pt") as f:
        found = {k: f.get_slice(k).get_shape() for k in f.keys()}
        check_keys(stored_layout(model.state_dict(), is_fp8_checkpoint(found)), found, ema_path)
        quantize_llm_(model, weight_dtype)  # empty FP8 shells on meta
        sd = dict(read_weights(f, weight_dtype, device, dtype))  # one tensor in flight
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_bagel(
    folder: str,
    device="cpu",
    dtype: torch.dtype | str = torch.bfloat16,
    released_vae_only: bool = False,
    weight_dtype: str = "bf16",
    compute_device=None,
    device_budget_bytes: int | None = None,
) -> LoadedBagel:
    """Load a BAGEL checkpoint folder.

    Args:
        folder: the model folder (see module docstring for its files).
        device: where the model and the autoencoder go.
        dtype: model weights and compute (bf16/fp16 on GPUs, fp32 for exact comparisons), a torch dtype or a
            DTYPES name; the VAE stays fp32.
        released_vae_only: refuse, before reading any weights, an ae.safetensors whose widths are not the
            released model's (for a host that builds its own VAE object from the file, as ComfyUI does).
        weight_dtype: storage of the language model's decoder-layer Linears (quantize.WEIGHT_DTYPES): "bf16" =
            `dtype`; "fp8_e4m3fn" = FP8 with per-channel scales, computed in `dtype`; "fp8_e4m3fn_fast" = FP8
            GEMMs (bf16, GPUs of compute capability 8.9 or newer). Either file layout loads with any of them.
        compute_device: where the model will run, if not `device` (a host that keeps it offloaded until use).
        device_budget_bytes: at most this much of `device` for the model, the autoencoder and a pass: the model
            is read into CPU memory, and the decoder layers that do not fit are streamed from there (stream.py).
            None: the whole model on `device`.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype is {dtype!r}; allowed values are {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    check_weight_dtype(weight_dtype, compute_device or device, dtype)
    check_folder(folder)
    if released_vae_only:
        check_released_vae_widths(find_vae_file(folder))
    vae_sd = load_file(find_vae_file(folder))
    vae = autoencoder_from_state_dict(vae_sd, device, torch.float32)
    ema_path = os.path.join(folder, "ema.safetensors")
    params = read_params(folder, ema_path, vae.params)
    if device_budget_bytes is None:
        model = load_bagel_model(ema_path, params, device, dtype, weight_dtype)
    else:
        model = load_bagel_model(ema_path, params, "cpu", dtype, weight_dtype)
        fit_(model, device, device_budget_bytes - tensor_bytes(vae))
    return LoadedBagel(model, BagelTokenizer.from_folder(folder), vae, vae_sd, folder)
