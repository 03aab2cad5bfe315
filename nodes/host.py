"""The pack's only contact with ComfyUI internals: folders, interrupts, progress, VAE objects, unload hooks.

Everything else in `nodes/` goes through these functions, so tests stub just `folder_paths`,
`comfy.model_management` and `comfy.utils` (and `comfy.sd` for VAE wrapping).
"""

from __future__ import annotations

import functools
import os

import comfy.model_management
import comfy.utils
import folder_paths

BAGEL_FOLDER = "bagel"


def register_model_folders() -> None:
    """Add models/bagel as a default location; appending keeps the user's extra_model_paths entries."""
    folder_paths.add_model_folder_path(BAGEL_FOLDER, os.path.join(folder_paths.models_dir, BAGEL_FOLDER))


def bagel_model_dirs() -> list[str]:
    return list(folder_paths.get_folder_paths(BAGEL_FOLDER))


def throw_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel (POST /interrupt)."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def is_cpu_host() -> bool:
    """ComfyUI started with --cpu (or no GPU): device "all" then means CPU workers."""
    return comfy.model_management.get_torch_device().type == "cpu"


def make_room(devices: tuple[str, ...], nbytes: int) -> None:
    """Have ComfyUI unload its own models from the pool's GPUs until each has `nbytes` free: the workers'
    memory is invisible to ComfyUI's model management, which would otherwise leave no room on a shared GPU."""
    import torch

    for device in devices:
        if device.startswith("cuda"):
            comfy.model_management.free_memory(nbytes, torch.device(device))


def torch_device():
    return comfy.model_management.get_torch_device()


def managed(*modules):
    """Put big modules under ComfyUI's model management, held on its offload device (normally the CPU).

    ComfyUI then moves them onto its GPU when `load_for_compute` asks, evicting other models for room, and
    may offload them again when another model (or a VAE pool's make_room) needs the memory. Returns the handle.
    """
    import comfy.model_patcher
    import torch.nn as nn

    holder = nn.ModuleList(modules)  # the patcher keeps its bookkeeping (device, loaded bytes) on this holder
    mm = comfy.model_management
    return comfy.model_patcher.ModelPatcher(holder, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())  # fmt: skip


def offload_device():
    return comfy.model_management.unet_offload_device()


def device_room(handle, work_bytes: int) -> int | None:
    """Bytes of ComfyUI's GPU that `handle`'s model may use (what of it is loaded there included), after ComfyUI
    unloaded other models to make room for the rest of it plus `work_bytes`, less the reserve ComfyUI keeps for
    other applications; None when ComfyUI runs on the CPU (nothing to plan)."""
    mm = comfy.model_management
    if mm.is_device_cpu(handle.load_device):
        return None
    mm.free_memory(handle.model_size() - handle.loaded_size() + work_bytes, handle.load_device)
    return mm.get_free_memory(handle.load_device) + handle.loaded_size() - mm.extra_reserved_memory()


def load_for_compute(handle) -> None:
    """Make sure a `managed` model sits whole on ComfyUI's GPU (our modules cannot run half offloaded)."""
    comfy.model_management.load_models_gpu([handle], force_full_load=True)


class Progress:
    """A ProgressBar that is only ever advanced from the node's own thread (it is an interrupt point)."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, done: int, total: int) -> None:
        self.bar.update_absolute(done, total)


def vae_module(vae):
    """The torch module inside a ComfyUI VAE object, whose state dict uses the LDM key names."""
    return vae.first_stage_model


def make_comfy_vae(state_dict: dict):
    """A core ComfyUI VAE object from an LDM/FLUX state dict, usable by VAEDecode/VAEEncode."""
    import comfy.sd

    vae = comfy.sd.VAE(sd=state_dict)
    vae.throw_exception_if_invalid()
    return vae


@functools.cache
def hook_unload(release) -> None:
    """Call `release()` whenever ComfyUI unloads all models ("Free model and node cache", OOM recovery).

    prompt_worker and the OOM handler look `unload_all_models` up on the module at call time, so a wrapper
    installed once at import is seen by both. functools.cache makes a second install a no-op.
    """
    original = comfy.model_management.unload_all_models

    @functools.wraps(original)
    def unload_all_models(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            release()

    comfy.model_management.unload_all_models = unload_all_models
