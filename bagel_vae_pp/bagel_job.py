"""The host's side of BAGEL on a worker pool: `PoolBagel` has the model operations of pipeline.InProcess, run by
the pool's workers (bagel_rank.py), so pipeline.text_to_image / edit_image / understand_image take it in place of
a Bagel. The host keeps what decides results (every random number in the official order, the schedule, the
guidance arithmetic) and never holds the model: it reads the json configs and safetensors headers only.

Contexts (KV caches) live in the workers; the host holds `RemoteContext` handles, one object per context, so
the pipeline's identity checks (`cfg_img is gen`) hold as in-process. A handle the host drops is dropped by the
workers with the next operation (a generation's caches are hundreds of MB at 1024²); `release()` drops them all.
Each operation is one pool job: Cancel (the interrupt or ComfyUI's progress bar) stops within that operation.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from .autoencoder import autoencoder_from_state_dict
from .bagel.config import BagelParams
from .bagel.loader import (
    DTYPES,
    LoadedBagel,
    check_folder,
    check_released_vae_widths,
    find_vae_file,
    read_folder_params,
)
from .bagel.pipeline import ImageInput
from .bagel.quantize import check_weight_dtype
from .bagel.split import Split, choose_split, parse_split
from .bagel.stream import pass_work_bytes
from .bagel.tokenizer import BagelTokenizer, SpecialTokens
from .bagel.tp import shard_nbytes

LOAD_TIMEOUT_S = 600.0  # 29 GB of weights from disk on first use
ONE_WORKER = Split(1, 1)


@dataclass(frozen=True, eq=False)
class RemoteContext:
    id: int  # the workers' key; 0 is the empty context


def array(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


def check_pool_weight_dtype(pool, dtype: str, weight_dtype: str) -> None:
    """Refuse, in one line and before any worker starts, a weight dtype that some device of the pool cannot run
    (fp8_e4m3fn_fast on CPU workers or GPUs without FP8 tensor cores), as load_bagel does in-process."""
    for device in dict.fromkeys(pool.spec.devices):
        check_weight_dtype(weight_dtype, device, DTYPES[dtype])


class PoolBagel:
    """BAGEL held by a pool's workers as `split.groups` tensor-parallel groups of `split.tp` workers each, its
    decoder-layer Linears stored as `weight_dtype` says (quantize.py)."""

    empty_context = RemoteContext(0)

    def __init__(self, pool, folder: str, special: SpecialTokens, dtype: str, split: Split = ONE_WORKER,
                 interrupt=None, weight_dtype: str = "bf16"):  # fmt: skip
        if split.workers > len(pool.spec.devices):
            raise ValueError(f"split: {split} needs {split.workers} workers; the pool has {len(pool.spec.devices)}.")
        check_pool_weight_dtype(pool, dtype, weight_dtype)
        check_folder(folder)
        self.pool, self.folder, self.special, self.dtype, self.split = pool, folder, special, dtype, split
        self.weight_dtype = weight_dtype
        self.params: BagelParams = read_folder_params(folder)
        self.interrupt = interrupt
        self.ids = 0
        self.dropped: deque[int] = deque()  # handles the host let go of since the last operation (appended by GC)

    def load(self) -> None:
        """Have the workers load the checkpoint unless they hold it already (a VAE job does not unload it)."""
        key = (self.folder, self.dtype, self.weight_dtype, self.split)
        if self.pool.is_running and self.pool.holding.get("bagel") == key:
            return
        special = self.special
        msg = {"op": "bagel_load", "folder": self.folder, "dtype": self.dtype, "weight_dtype": self.weight_dtype,
               "groups": self.split.groups, "tp": self.split.tp,
               "special": [special.bos, special.eos, special.start_of_image, special.end_of_image]}  # fmt: skip
        self.pool.holding.pop("bagel", None)
        self.pool.call(msg, "loading BAGEL", LOAD_TIMEOUT_S, self.interrupt)
        self.pool.holding["bagel"] = key

    def call(self, what: str, **fields) -> list[dict]:
        """One operation on the workers, loading the checkpoint first where the pool (re)started without it; every
        worker's reply (rank 0 answers for all but velocities)."""
        self.load()
        drop = [self.dropped.popleft() for _ in range(len(self.dropped))]
        return self.pool.call({"op": "bagel", "bagel_op": what, "drop": drop, **fields}, f"BAGEL {what}",
                              self.pool.spec.timeout_s, self.interrupt)  # fmt: skip

    def new_context(self) -> RemoteContext:
        self.ids += 1
        ctx = RemoteContext(self.ids)
        weakref.finalize(ctx, self.dropped.append, self.ids)
        return ctx

    def prefill_text(self, ctx: RemoteContext, ids: list[int]) -> RemoteContext:
        out = self.new_context()
        self.call("prefill_text", ctx=ctx.id, out=out.id, ids=list(ids))
        return out

    def add_image(self, ctx: RemoteContext, image: ImageInput) -> RemoteContext:
        out = self.new_context()
        self.call("add_image", ctx=ctx.id, out=out.id, vit_patches=array(image.vit_patches),
                  vit_position_ids=array(image.vit_position_ids), vae_tokens=array(image.vae_tokens),
                  vae_position_ids=array(image.vae_position_ids))  # fmt: skip
        return out

    def velocities(self, contexts: list[RemoteContext], x_t: Tensor, t: float, position_ids: Tensor) -> list[Tensor]:
        replies = self.call("velocities", ctxs=[c.id for c in contexts], x_t=array(x_t), t=t,
                            position_ids=array(position_ids))  # fmt: skip
        by_pass = {i: v for r in replies for i, v in r.get("velocities", {}).items()}  # each group's passes
        return [torch.from_numpy(by_pass[i]) for i in range(len(contexts))]

    def next_token_logits(self, ctx: RemoteContext, token: int) -> tuple[Tensor, RemoteContext]:
        out = self.new_context()
        reply = self.call("next_token", ctx=ctx.id, out=out.id, token=int(token))[0]
        return torch.from_numpy(reply["logits"]), out

    def peak_bytes(self) -> list[int | None]:
        """Each worker's peak device memory since the load (None on CPU), as its caching allocator held it."""
        return [r.get("peak_bytes") for r in self.pool.call({"op": "bagel", "bagel_op": "memory"}, "BAGEL memory", 60)]

    def release(self) -> None:
        """Free the generation's contexts in the workers (a no-op where the pool is gone)."""
        if self.pool.is_running and self.pool.holding.get("bagel") is not None:
            self.call("release")


def load_on_pool(
    pool,
    folder: str,
    dtype: str,
    released_vae_only: bool = False,
    interrupt=None,
    weight_dtype: str = "bf16",
    split: str = "auto",
) -> LoadedBagel:
    """BAGEL held by `pool`'s workers, split as `split` says ('auto' or 'GxT', bagel/split.py); this process keeps the
    tokenizer and the autoencoder (fp32, CPU: the edit's conditioning encode). Other arguments as load_bagel's."""
    check_pool_weight_dtype(pool, dtype, weight_dtype)
    check_folder(folder)
    chosen = parse_split(split, len(pool.spec.devices))
    if released_vae_only:
        check_released_vae_widths(find_vae_file(folder))
    tokenizer = BagelTokenizer.from_folder(folder)
    vae_sd = load_file(find_vae_file(folder))
    if chosen is None:
        chosen = auto_split(pool, folder, dtype, weight_dtype, interrupt)
    bagel = PoolBagel(pool, folder, tokenizer.special, dtype, chosen, interrupt, weight_dtype)
    bagel.load()
    return LoadedBagel(bagel, tokenizer, autoencoder_from_state_dict(vae_sd), vae_sd, folder)


def auto_split(pool, folder: str, dtype: str, weight_dtype: str, interrupt=None) -> Split:
    """choose_split on the workers' free memory once they hold no BAGEL (a held one of this folder, dtype and weight
    dtype is kept, with its split: a second loader node on the same pool costs nothing)."""
    held = pool.holding.get("bagel") if pool.is_running else None
    if held is not None and held[:3] == (folder, dtype, weight_dtype):
        return held[3]
    pool.holding.pop("bagel", None)
    replies = pool.call({"op": "bagel", "bagel_op": "unload"}, "BAGEL memory", 60, interrupt)
    params = read_folder_params(folder)
    work = pass_work_bytes(params, DTYPES[dtype])  # as the in-process loader's plan (stream.py): one estimate
    return choose_split(len(pool.spec.devices), lambda tp: shard_nbytes(params, 0, tp, DTYPES[dtype], weight_dtype)
                        + work, [r["free_bytes"] for r in replies])  # fmt: skip
