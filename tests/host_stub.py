"""Stand-ins for ComfyUI's interrupt exception and progress bar, behaving like the real ones where it matters.

ComfyUI's `ProgressBar.update_absolute` clamps the value to the total and calls the server's progress hook,
which first calls `throw_exception_if_processing_interrupted()`: a Cancel raises out of the progress bar, not
only out of the node's own interrupt checks. `InterruptProcessingException` derives from BaseException in
current ComfyUI, so an `except Exception` never catches it.
"""

from __future__ import annotations

from collections.abc import Callable


class InterruptProcessingException(BaseException):
    pass


def progress_bar_class(throw_if_interrupted: Callable[[], None], record: Callable[[int, int], None]):
    """A `comfy.utils.ProgressBar` whose hook checks for Cancel, then records (value, total)."""

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.node_id = total, 0, node_id

        def update_absolute(self, value, total=None, preview=None):
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            throw_if_interrupted()
            record(self.current, self.total)

        def update(self, value):
            self.update_absolute(self.current + value)

    return ProgressBar


class ModelPatcher:
    """`comfy.model_patcher.ModelPatcher` as far as the pack uses it: its model, the two devices, the bytes of the
    model's tensors (counted once, when the patcher is made, as ComfyUI does) and the bytes loaded on the GPU."""

    def __init__(self, model, load_device, offload_device, size=0):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.size = size or sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.loaded = 0

    def model_size(self) -> int:
        return self.size

    def loaded_size(self) -> int:
        return self.loaded


class GpuMemory:
    """`comfy.model_management`'s memory functions for one GPU of `total_bytes` holding ModelPatchers.

    Like ComfyUI: `free_memory` unloads the least recently loaded models until the bytes asked for are free (it
    never fails: it frees what it can), `get_free_memory` counts what loaded models leave, and a full load that
    does not fit runs out of memory. The GPU is pretended (`is_device_cpu` says False; tensors stay where the
    patcher's load_device says); `other_bytes` stand for memory held outside ComfyUI's models.
    """

    def __init__(self, total_bytes: int, other_bytes: int = 0, reserved_bytes: int = 0):
        self.total, self.other, self.reserved = total_bytes, other_bytes, reserved_bytes
        self.held = []  # loaded patchers, most recently loaded first

    def install(self, mm) -> None:
        mm.is_device_cpu = lambda device: False
        mm.free_memory, mm.get_free_memory, mm.load_models_gpu = self.free_memory, self.get_free_memory, self.load
        mm.extra_reserved_memory = lambda: self.reserved

    def get_free_memory(self, dev=None, torch_free_too=False):
        free = self.total - self.other - sum(p.loaded for p in self.held)
        return (free, 0) if torch_free_too else free

    def free_memory(self, memory_required, device, keep_loaded=()):
        unloaded = []
        for patcher in [p for p in reversed(self.held) if p not in keep_loaded]:
            if self.get_free_memory(device) > memory_required:
                break
            self.held.remove(patcher)
            patcher.model.to(patcher.offload_device)
            patcher.loaded = 0
            unloaded.append(patcher)
        return unloaded

    def load(self, models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
             force_full_load=False):  # fmt: skip
        import torch

        for patcher in models:
            if patcher in self.held:
                self.held.remove(patcher)
            self.free_memory(patcher.model_size() - patcher.loaded + memory_required, patcher.load_device)
            if patcher.model_size() > self.get_free_memory() + patcher.loaded:
                raise torch.OutOfMemoryError(f"stub GPU: {patcher.model_size()} bytes do not fit")
            patcher.model.to(patcher.load_device)
            patcher.loaded = patcher.model_size()
            self.held.insert(0, patcher)
