"""Streamed decoder layers: BAGEL on a device that cannot hold it, with some language-model layers kept off it.

Everything but the decoder layers (token embedding, lm_head, final norms, the ViT, the connector, the latent
heads, the position tables) stays on the device, and so do as many decoder layers as fit (`plan_residency`).
The others ("streamed") keep their tensors, parameters and buffers alike (an Fp8Linear's FP8 weight and scales
are buffers), in CPU memory, pinned where CUDA is available; a pass copies each of them into one of two
reusable device layers, the slots, just before it runs. Streamed layers are spread evenly over the stack
(`streamed_layers`), so that resident layers compute while the next streamed one is copied. In the model,
`Qwen2MoTModel.layers` holds a weightless `StreamedLayer` where a streamed layer was, and `Qwen2MoTModel.stream`
(a `LayerStream`) hands its forward loop each layer in turn. A pass thus moves every streamed layer's bytes
once over the host link, and allocates no device memory beyond the two slots (made once); KV caches stay on
the device. ComfyUI's model management sees the resident part and the slots, not the pinned copies.

Copy protocol on CUDA (stream K = the current stream of the pass, stream C = the slots' copy stream; slot
q = j mod 2 takes streamed layer j):
  1. pass start: C waits for an event recorded on K, so a copy never overtakes work K was given before the
     pass (the previous pass still reading a slot; a `.to()` that moved the slots onto the device);
  2. copy j into slot q on C (pinned source, non_blocking), then record `copied[q]` on C; every slot tensor
     is `record_stream(C)`-marked so that, if the slots are freed or moved while the copy runs (ComfyUI
     offloading the model after an interrupt), the allocator does not reuse their memory before C is done;
  3. before layer j runs: K waits for `copied[q]`;
  4. after layer j's kernels are queued on K: record `freed[q]` on K, then issue the copy of layer j + 2
     into slot q, C first waiting for `freed[q]` (step 2). Layers 0 and 1 are copied at the pass start.
No copy is issued past the pass's last streamed layer, so when forward returns every copy has been waited
for on K and whatever runs next on K is ordered after them. The host never blocks: all waits are on the GPU.
On other devices (the CPU) a copy runs at step 3, when the compute waits for it: the latest moment a GPU could
finish it, which is what a missing wait would expose.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .config import BagelParams

logger = logging.getLogger(__name__)
GIB = 2**30
WORK_MARGIN_BYTES = GIB  # caching-allocator slack, cuBLAS workspaces, the edit's VAE encode (to be measured)


def plan_residency(layer_bytes: list[int], fixed_bytes: int, budget_bytes: int, work_bytes: int) -> int:
    """How many decoder layers stay on the device: the most that fit `budget_bytes`, the rest streamed.

    Resident for a count k: the layers not in `streamed_layers(n, n - k)`. The device then holds `fixed_bytes`
    (everything that is not a decoder layer), the resident layers, a slot per in-flight streamed layer (two;
    one if only one layer is streamed) as large as the largest streamed layer, and `work_bytes` (one pass's
    activations and the KV caches). Streaming one or two layers thus saves nothing over streaming none.

    Args:
        layer_bytes: bytes of each decoder layer's tensors, in layer order.
        fixed_bytes, budget_bytes, work_bytes: as above, in bytes.
    Raises ValueError naming the budget and the least it takes when no count fits.
    """
    n = len(layer_bytes)
    needs = []
    for k in range(n, -1, -1):
        streamed = streamed_layers(n, n - k)
        slots = min(2, len(streamed)) * max((layer_bytes[i] for i in streamed), default=0)
        needs.append(fixed_bytes + sum(layer_bytes) - sum(layer_bytes[i] for i in streamed) + slots + work_bytes)
        if needs[-1] <= budget_bytes:
            return k
    least = min(needs)
    raise ValueError(
        f"device budget {budget_bytes / GIB:.2f} GiB is too small for BAGEL: streaming its decoder layers it "
        f"still needs {least / GIB:.2f} GiB ({fixed_bytes / GIB:.2f} GiB outside the decoder layers, two layer "
        f"buffers, {work_bytes / GIB:.2f} GiB for a pass). Free memory on the device, or use weight dtype "
        "fp8_e4m3fn (half the bytes per layer)."
    )


def streamed_layers(n: int, count: int) -> tuple[int, ...]:
    """The `count` of `n` layers to stream, one in each of `count` equal bins of the stack (at its middle):
    resident layers sit between them and compute while the next streamed layer is copied."""
    assert 0 <= count <= n, (count, n)
    return tuple((2 * j + 1) * n // (2 * count) for j in range(count))


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (its state dict)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def pass_work_bytes(params: BagelParams, dtype: torch.dtype) -> int:
    """Device memory a step's passes need beyond the weights, estimated for the largest image of the checkpoint.

    A velocity pass at the largest size runs L = max_latent_size² + 2 tokens; a layer holds about 6 [L, D]
    tensors (residual, its norm, q, attention output, o_proj and cache copies) and 3 [L, intermediate] ones
    (gate, up, down input), for each of an edit's 3 guidance passes, which run batched (Bagel.velocities). An
    edit keeps three contexts' KV caches (image, ViT tokens and text each, up to L + vit_max_patches² + 512
    tokens). Plus WORK_MARGIN_BYTES. An estimate, checked by bench_bagel.py's peak.
    """
    llm, size = params.llm, dtype.itemsize
    L = params.max_latent_size**2 + 2
    context = L + params.vit_max_patches_per_side**2 + 512
    activations = 3 * L * (6 * llm.hidden_size + 3 * llm.intermediate_size) * size
    kv = 3 * llm.num_hidden_layers * 2 * context * llm.num_key_value_heads * llm.head_dim * size
    return activations + kv + WORK_MARGIN_BYTES


class StreamedLayer(nn.Module):
    """Holds the place of a streamed decoder layer in `Qwen2MoTModel.layers`; no tensors (see LayerStream)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def extra_repr(self) -> str:
        return f"layer {self.index}, streamed from CPU memory"


class _CudaCopies:
    """Steps 1-4 of the module docstring, for the slots of one CUDA device."""

    def __init__(self, device: torch.device, n_slots: int):
        self.stream = torch.cuda.Stream(device)
        self.copied = [torch.cuda.Event() for _ in range(n_slots)]
        self.freed: list[torch.cuda.Event | None] = [None] * n_slots

    def begin(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self.freed = [None] * len(self.freed)

    def start(self, q: int, pairs: list[tuple[Tensor, Tensor]]) -> None:
        with torch.cuda.stream(self.stream):
            if self.freed[q] is not None:
                self.stream.wait_event(self.freed[q])
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                dst.record_stream(self.stream)
            self.copied[q].record(self.stream)

    def finish(self, q: int) -> None:
        torch.cuda.current_stream(self.stream.device).wait_event(self.copied[q])

    def release(self, q: int) -> None:
        self.freed[q] = torch.cuda.Event()
        self.freed[q].record(torch.cuda.current_stream(self.stream.device))


class _DeferredCopies:
    """The same protocol where there are no streams: a slot's copy runs when the compute waits for it."""

    def __init__(self, n_slots: int):
        self.pending: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(n_slots)]

    def begin(self) -> None:
        self.pending = [[] for _ in self.pending]  # copies of a pass that stopped half-way are moot

    def start(self, q: int, pairs: list[tuple[Tensor, Tensor]]) -> None:
        assert not self.pending[q], "slot refilled before its copy was waited for"
        self.pending[q] = pairs

    def finish(self, q: int) -> None:
        for dst, src in self.pending[q]:
            dst.copy_(src)
        self.pending[q] = []

    def release(self, q: int) -> None:
        pass  # the compute ran synchronously: the slot is free


class LayerStream(nn.Module):
    """The streamed layers' CPU tensors, the device slots they are copied into, and the per-pass schedule.

    `slots` is a ModuleList (moved by `.to()` and counted by ComfyUI with the resident part); `host` is a
    plain list (never moved), one {name: CPU tensor} per streamed layer, names as in `slots[q].state_dict()`.
    """

    def __init__(self, streamed: tuple[int, ...], host: list[dict[str, Tensor]], slots: list[nn.Module]):
        super().__init__()
        self.streamed, self.host = streamed, host
        self.slots = nn.ModuleList(slots)
        self.copies: _CudaCopies | _DeferredCopies | None = None

    def layers(self, modules: nn.ModuleList):
        """Yield the module that runs each layer in order: resident ones as they are, streamed ones in a slot
        holding their weights (the caller queues the layer's work before asking for the next one)."""
        copies = self._copies()
        copies.begin()
        n_slots = len(self.slots)
        for j in range(n_slots):
            self._start(j)
        j = 0
        for module in modules:
            if not isinstance(module, StreamedLayer):
                yield module
                continue
            assert module.index == self.streamed[j], (module.index, self.streamed)
            q = j % n_slots
            copies.finish(q)
            yield self.slots[q]
            copies.release(q)
            if j + n_slots < len(self.streamed):
                self._start(j + n_slots)
            j += 1

    def _start(self, j: int) -> None:
        q = j % len(self.slots)
        slot = self.slots[q].state_dict(keep_vars=True)
        self.copies.start(q, [(slot[name].data, src) for name, src in self.host[j].items()])

    def _copies(self) -> _CudaCopies | _DeferredCopies:
        """The copy machinery for the slots' current device (made again after the slots moved)."""
        device = next(self.slots.parameters()).device
        if device.type != "cuda":
            if not isinstance(self.copies, _DeferredCopies):
                self.copies = _DeferredCopies(len(self.slots))
        elif not isinstance(self.copies, _CudaCopies) or self.copies.stream.device != device:
            self.copies = _CudaCopies(device, len(self.slots))
        return self.copies

    def streamed_bytes(self) -> int:
        """Bytes copied to the device per pass."""
        return sum(t.numel() * t.element_size() for layer in self.host for t in layer.values())


def host_copy(t: Tensor, pin: bool) -> Tensor:
    """A CPU copy of t, in page-locked memory if `pin` (copies from it to a GPU are asynchronous)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t)


def is_streamed(model: nn.Module) -> bool:
    return model.language_model.model.stream is not None


def stream_layers_(model: nn.Module, resident: int, device) -> nn.Module:
    """Move a Bagel to `device` but for n - `resident` of its n decoder layers (streamed_layers), which are streamed
    (module docstring); in place, returns the model. Logs the plan in one line.

    Args:
        model: a Bagel on any device (a full-size one held whole on a GPU loses its streamed layers' memory
            there), not streamed yet and not a tensor-parallel shard.
        resident: how many decoder layers stay on `device` (plan_residency); all of them: a plain move.
        device: where everything but the streamed layers goes (a host that moves the model itself may pass its
            offload device: the slots and the resident part then travel with the model).
    """
    lm = model.language_model.model
    n = len(lm.layers)
    if any(layer.reduce is not None for layer in lm.layers):
        raise ValueError("streamed layers are not available on a tensor-parallel shard; use one device or a pool.")
    assert lm.stream is None, "the model is streamed already"
    streamed = streamed_layers(n, n - resident)
    moved = []
    for i in streamed:
        moved.append(lm.layers[i])
        lm.layers[i] = StreamedLayer(i)
    model.to(device)
    pin = torch.cuda.is_available()
    host, slots = [], []
    for j, layer in enumerate(moved):
        host.append({name: host_copy(t, pin) for name, t in layer.state_dict().items()})
        if j < 2:
            slots.append(layer.to(device))  # its own tensors become the slot's: no new device memory
        moved[j] = None  # the other layers' device tensors go now, one at a time
    if streamed:
        lm.stream = LayerStream(streamed, host, slots)
    per_pass = 0 if lm.stream is None else lm.stream.streamed_bytes()
    logger.info(
        "BAGEL: %d of %d decoder layers resident, %d streamed from %s CPU memory (%.1f MiB copied per pass)",
        resident, n, len(streamed), "pinned" if pin else "pageable", per_pass / 2**20,
    )  # fmt: skip
    return model


def plan_for(model: nn.Module, budget_bytes: int, work_bytes: int | None = None) -> int:
    """plan_residency for a Bagel (still whole, on any device) in `budget_bytes` of its compute device.

    Args:
        work_bytes: a pass's working memory; None: pass_work_bytes for the model's largest image.
    """
    layers = model.language_model.model.layers
    layer_bytes = [tensor_bytes(layer) for layer in layers]
    if work_bytes is None:
        work_bytes = pass_work_bytes(model.params, model.dtype)
    return plan_residency(layer_bytes, tensor_bytes(model) - sum(layer_bytes), budget_bytes, work_bytes)


def fit_(model: nn.Module, device, budget_bytes: int, work_bytes: int | None = None) -> int:
    """Put a Bagel on `device` within `budget_bytes`, streaming as few decoder layers as that allows (plan_for,
    whose ValueError says when even streaming does not fit); returns the number of resident layers."""
    resident = plan_for(model, budget_bytes, work_bytes)
    stream_layers_(model, resident, device)
    return resident


def stream_to_fit_(model: nn.Module, room_bytes: int, device) -> bool:
    """Stream decoder layers of a whole Bagel if it and a pass do not fit `room_bytes` of its compute device, the
    streamed model's resident part then on `device` (a host's offload device, see stream_layers_); returns
    whether it streamed. For a host that loads the model itself once it fits."""
    resident = plan_for(model, room_bytes)
    if resident < len(model.language_model.model.layers):
        stream_layers_(model, resident, device)
    return resident < len(model.language_model.model.layers)
