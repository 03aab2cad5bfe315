"""Tensor-parallel BAGEL: every rank of a process group holds a slice of each language-model layer.

The split is Megatron's, written out plainly (gpt-fast's tp.py is the model), for both MoT experts alike:
- attention: rank r owns a contiguous block of query heads (balanced: 28 heads on 3 ranks are 10, 9, 9) and the
  KV heads those heads read. Where the world divides the KV heads each rank owns whole GQA groups; otherwise a
  KV head whose group straddles two ranks is held by both (its projection replicated, its cache too). The
  rank's q/k/v_proj rows and biases, and o_proj's input columns; q/k norms act per head and are whole.
- MLP: gate/up_proj rows and down_proj columns, contiguous blocks in units of MLP_UNIT rows where the size
  allows it (aligned leading dimensions for half-precision GEMMs).
- the token embedding, final norms, lm_head and everything outside the LLM (ViT, connector, latent heads,
  position tables) are replicated.
So o_proj and down_proj end in partial sums over the rank's heads or MLP rows: one all-reduce after each, two
per layer per model call, shared by the experts (each writes its own rows of one partial tensor); the residual
stream stays replicated, identical on every rank. The KV caches hold the rank's KV heads only.

Each rank reads only its slices from ema.safetensors (`get_slice(name)[rows]` or `[:, cols]`) into a model
built on the meta device and loaded with `assign=True` after the strict key check of loader.py.

FP8 weights (quantize.py) shard so that every rank holds exactly its slice of the whole model's FP8 tensors:
a row split's scales are its rows' own (one per output channel); a column split (o_proj, down_proj) keeps every
output channel, whose scale is its whole row's, so each rank quantizes its columns with the row maxima taken
over all ranks' columns (an all-reduce MAX of [out] fp32 per weight at load; an FP8 checkpoint stores whole-row
scales already). With fp8_e4m3fn_fast the activations of a column split are scaled per token over the rank's
columns only (each partial GEMM is the FP8 GEMM of its slice; no coarser than the whole row's scale), so tensor
parallel changes that mode's rounding slightly.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn

from ..kernels.dequant import dequantize_rows
from .config import BagelParams, LLMConfig
from .llm import Qwen2MoTForCausalLM
from .loader import check_folder, check_keys, read_folder_params
from .model import Bagel
from .quantize import (
    check_weight_dtype,
    fp8_key,
    is_fp8_checkpoint,
    is_quantized_weight,
    quantize_llm_,
    quantize_rows,
    quantizer,
    row_amax,
    scale_key,
    stored_layout,
)

MLP_UNIT = 64  # MLP rows per rank come in multiples of this when the size has enough of them (18944 = 296 x 64)
# Linear of a layer (either expert, without `_moe_gen`) -> (dim of the weight [out, in] that is split, which block).
SPLITS = {
    "q_proj": (0, "heads"),
    "k_proj": (0, "kv_heads"),
    "v_proj": (0, "kv_heads"),
    "o_proj": (1, "heads"),
    "gate_proj": (0, "mlp"),
    "up_proj": (0, "mlp"),
    "down_proj": (1, "mlp"),
}


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` holds of every layer; blocks are [start, stop) element ranges."""

    rank: int
    world: int
    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]  # the KV heads those query heads read
    kv_groups: tuple[int, ...]  # query heads of this rank per KV head it holds, in order (sum = query heads)
    mlp: tuple[int, int]  # MLP rows (gate/up outputs, down inputs)
    head_dim: int

    def block(self, kind: str) -> tuple[int, int]:
        """The element range of a weight dimension split by `kind` (a SPLITS value)."""
        if kind == "mlp":
            return self.mlp
        a, b = getattr(self, kind)
        return a * self.head_dim, b * self.head_dim


def split_blocks(n: int, world: int, unit: int = 1) -> list[tuple[int, int]]:
    """Contiguous [start, stop) blocks of range(n), one per rank, in whole units; the first n/unit % world ranks
    get one unit more."""
    assert n % unit == 0 and n // unit >= world, (n, unit, world)
    base, extra = divmod(n // unit, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + (base + (r < extra)) * unit)
    return list(zip(bounds[:-1], bounds[1:]))


def shard_plan(cfg: LLMConfig, rank: int, world: int) -> ShardPlan:
    """The slices of rank `rank` in a tensor-parallel group of `world` ranks (1 to num_attention_heads)."""
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if not 1 <= world <= H:
        even = [w for w in range(1, H + 1) if H % w == 0]
        raise ValueError(
            f"tensor-parallel group of {world} ranks: BAGEL's language model has {H} query heads and every rank "
            f"needs at least one, so use 1 to {H} ranks ({', '.join(map(str, even))} split them evenly)."
        )
    assert 0 <= rank < world, (rank, world)
    a, b = split_blocks(H, world)[rank]
    kv_of_head = [h // (H // Hkv) for h in range(a, b)]  # GQA: query head h reads KV head h // (H / Hkv)
    kv_heads = (kv_of_head[0], kv_of_head[-1] + 1)
    kv_groups = tuple(kv_of_head.count(j) for j in range(*kv_heads))
    n = cfg.intermediate_size
    unit = MLP_UNIT if n % MLP_UNIT == 0 and n // MLP_UNIT >= world else 1
    return ShardPlan(rank, world, (a, b), kv_heads, kv_groups, split_blocks(n, world, unit)[rank], cfg.head_dim)


def split_of(plan: ShardPlan, key: str) -> tuple[int, int, int] | None:
    """(dim, start, stop) of this rank's slice of the Bagel parameter `key` (an ema.safetensors name), or None
    for a parameter every rank holds whole. Biases (q/k/v only) follow their weight's rows."""
    parts = key.split(".")
    linear = parts[-2].removesuffix("_moe_gen")
    if parts[:3] != ["language_model", "model", "layers"] or linear not in SPLITS:
        return None
    dim, kind = SPLITS[linear]
    assert dim == 0 or parts[-1] == "weight", key  # a bias split by columns would be added once per rank
    return (dim, *plan.block(kind))


def shard_(model: Bagel, plan: ShardPlan) -> None:
    """Turn a Bagel built on the meta device into this rank's shard, in place: the split Linears' shapes and
    the attention's head counts (weights still empty, on meta)."""
    for key, p in list(model.named_parameters()):
        split = split_of(plan, key)
        if split is None:
            continue
        dim, a, b = split
        module_name, attr = key.rsplit(".", 1)
        linear = model.get_submodule(module_name)
        shape = list(p.shape)
        shape[dim] = b - a
        setattr(linear, attr, nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"), requires_grad=False))
        linear.out_features, linear.in_features = linear.weight.shape
    for layer in model.language_model.model.layers:
        attn = layer.self_attn
        attn.n_heads, attn.n_kv, attn.kv_groups = sum(plan.kv_groups), len(plan.kv_groups), plan.kv_groups


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum x over the ranks of `group`, in place, and return it; a no-op without a group or on one rank."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_reduce_max(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """The elementwise maximum of x over the ranks of `group`, in place; a no-op without a group or on one rank."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def attach_group(lm: Qwen2MoTForCausalLM, group: dist.ProcessGroup) -> None:
    """Make every layer of a shard sum its attention and MLP partials over `group` (the ranks of its plan)."""
    reduce = functools.partial(all_reduce_sum, group=group)
    for layer in lm.model.layers:
        layer.reduce = reduce


def shard_model(params: BagelParams, plan: ShardPlan, dtype: torch.dtype, weight_dtype: str) -> Bagel:
    """The empty shard of `plan` on the meta device: the split Linears' shapes, then their `weight_dtype` form
    (quantize.quantize_llm_: FP8 shells with [out] scales), computed in `dtype`."""
    with torch.device("meta"):
        model = Bagel(params).to(dtype)
    shard_(model, plan)
    return quantize_llm_(model, weight_dtype)


def shard_nbytes(params: BagelParams, rank: int, world: int, dtype: torch.dtype, weight_dtype: str = "bf16") -> int:
    """Bytes of the weights (and FP8 scales) that rank `rank` of `world` holds, from the shapes (nothing is
    allocated): `dtype` for everything but the decoder-layer Linears, which weight_dtype may store in FP8."""
    model = shard_model(params, shard_plan(params.llm, rank, world), dtype, weight_dtype)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def read_slice(f, key: str, split: tuple[int, int, int] | None) -> Tensor:
    """One tensor of an open safetensors file, or only its rows/columns [start, stop) along `dim`."""
    if split is None:
        return f.get_tensor(key)
    dim, a, b = split
    return f.get_slice(key)[a:b] if dim == 0 else f.get_slice(key)[:, a:b]


def scale_split(split: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """The slice of a weight's [out] scales that goes with the weight's slice `split`: a row split's rows; all of
    them for a column split (every output channel stays, and its scale is its whole row's)."""
    return split if split is not None and split[0] == 0 else None


def quantize_slice(t: Tensor, split: tuple[int, int, int] | None, group: dist.ProcessGroup | None):
    """quantize_rows of this rank's slice `t` of a weight, with the whole weight's scales (module docstring): the
    rows of a column split are completed by the maximum over the group's ranks."""
    amax = row_amax(t)  # [out]
    if split is not None and split[0] == 1:
        all_reduce_max(amax, group)
    return quantize_rows(t, amax)


def read_shard(f, plan: ShardPlan, weight_dtype: str, device, dtype: torch.dtype, group: dist.ProcessGroup | None):
    """(model key, tensor) for this rank's slice of every tensor of an open ema.safetensors in either layout, one
    read at a time, as quantize.read_weights gives them for the whole model (same keys, slices of the same values):
    decoder-layer Linears of an FP8 file sliced with their scales (scale_split); from a bf16 file, quantized on
    `device` right after reading (quantize_slice: collectives in file order, the same on every rank); with "bf16"
    from an FP8 file, dequantized to `dtype`. Everything else goes to `dtype`."""
    keys = list(f.keys())
    stored_fp8, quantized = is_fp8_checkpoint(keys), quantizer(weight_dtype) is not None
    for key in keys:
        if key.endswith(".weight_scale"):
            continue  # read with its weight
        split = split_of(plan, key)
        t = read_slice(f, key, split).to(device)
        if not is_quantized_weight(key, t.shape) or not (stored_fp8 or quantized):
            yield key, t.to(dtype)
            continue
        if stored_fp8:
            q, s = t, read_slice(f, scale_key(key), scale_split(split)).to(device)
        else:
            q, s = quantize_slice(t, split, group)
        if quantized:
            yield fp8_key(key), q
            yield scale_key(key), s
        else:
            yield key, dequantize_rows(q, s, dtype)


def load_bagel_shard(
    folder: str,
    rank: int,
    world: int,
    device,
    dtype: torch.dtype,
    group: dist.ProcessGroup | None = None,
    weight_dtype: str = "bf16",
) -> Bagel:
    """Load rank `rank`'s shard of a BAGEL checkpoint folder: its slices of the language model, the rest whole.

    Args:
        folder: a BAGEL-7B-MoT model folder (loader.py); only ema.safetensors, the json files and the header of
            ae.safetensors are read, and of the LLM weights only this rank's slices.
        rank, world: this rank and the group size (1 to num_attention_heads; 1 = the whole model).
        device, dtype: where the weights go and in which dtype (bf16 on GPUs, fp32 for exact tests).
        group: the process group of the `world` ranks, whose all-reduces complete every layer (NCCL on GPUs,
            gloo on CPU); needed when world > 1.
        weight_dtype: storage of the decoder-layer Linears, as load_bagel's (quantize.WEIGHT_DTYPES); either file
            layout loads with any of them. Every rank holds the slices of what load_bagel would hold, bit for bit.
    Returns a Bagel whose methods (prefill_text, velocity, next_token_logits...) run the rank's part of each
    pass; every rank of the group must make the same calls in the same order.
    """
    if world > 1 and group is None:
        raise ValueError(f"a shard of a {world}-rank tensor-parallel group needs the group's process group.")
    check_weight_dtype(weight_dtype, device, dtype)
    check_folder(folder)
    ema_path = os.path.join(folder, "ema.safetensors")
    params = read_folder_params(folder)
    plan = shard_plan(params.llm, rank, world)
    with torch.device("meta"):
        whole = Bagel(params)
    with safe_open(ema_path, framework="pt") as f:
        found = {k: f.get_slice(k).get_shape() for k in f.keys()}
        check_keys(stored_layout(whole.state_dict(), is_fp8_checkpoint(found)), found, ema_path)
        model = shard_model(params, plan, dtype, weight_dtype)
        sd = dict(read_shard(f, plan, weight_dtype, device, dtype, group))  # one read at a time
    model.load_state_dict(sd, strict=True, assign=True)
    if world > 1:
        attach_group(model.language_model, group)
    return model.eval().requires_grad_(False)
