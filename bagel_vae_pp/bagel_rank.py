"""A worker's share of BAGEL jobs: the model (whole, or its tensor-parallel shard) and the contexts the host
refers to by id. The host's side is bagel_job.py; the operations are pipeline.InProcess's, so the pool computes
what the in-process path computes.

Tensors cross the socket as numpy arrays (pickled by value; a torch tensor would be pickled through shared
memory and a descriptor-passing listener). The workers form `groups` tensor-parallel groups of `tp` consecutive
ranks (bagel/split.py). Every group holds every context, so all ranks run every operation but `velocities`, where
group g computes the passes i with i mod groups == g and its first rank replies with them; rank 0 replies with
everything else. Ranks outside the groups sit the jobs out.
"""

from __future__ import annotations

import gc

import numpy as np
import torch

from .bagel.loader import DTYPES
from .bagel.model import EMPTY_CONTEXT, Context
from .bagel.pipeline import ImageInput, InProcess
from .bagel.split import Split
from .bagel.tokenizer import SpecialTokens
from .bagel.tp import load_bagel_shard


def tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a)


def array(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class BagelRank:
    def __init__(self, rank: int, groups: dict, device: torch.device):
        self.rank, self.groups, self.device = rank, groups, device
        self.ops: InProcess | None = None
        self.contexts: dict[int, Context] = {}
        self.split, self.group = Split(1, 1), 0

    def load(self, msg: dict) -> dict:
        """Load this rank's shard of the checkpoint in `msg["folder"]` for its group, or sit out."""
        self.unload()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.split = split = Split(msg["groups"], msg["tp"])
        self.group = split.group_of(self.rank)
        if self.group is None:
            return {}
        first = self.group * split.tp
        with torch.inference_mode():
            model = load_bagel_shard(msg["folder"], self.rank - first, split.tp, self.device, DTYPES[msg["dtype"]],
                                     self.groups[(first, split.tp)], msg["weight_dtype"])  # fmt: skip
        self.ops = InProcess(model, SpecialTokens(*msg["special"]))
        self.contexts = {0: EMPTY_CONTEXT}
        return {}

    def unload(self) -> None:
        self.ops, self.contexts = None, {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, msg: dict) -> dict:
        on_gpu = self.device.type == "cuda"
        if msg["bagel_op"] == "memory":  # every rank answers: its device's peak since load, as the allocator held it
            return {"peak_bytes": torch.cuda.max_memory_reserved(self.device) if on_gpu else None}
        if msg["bagel_op"] == "unload":  # every rank answers: what its device has free without BAGEL (None: CPU)
            self.unload()
            return {"free_bytes": torch.cuda.mem_get_info(self.device)[0] if on_gpu else None}
        if self.ops is None:
            return {}
        for handle in msg["drop"]:  # contexts the host no longer refers to
            self.contexts.pop(handle, None)
        missing = [i for i in (msg.get("ctx"), *msg.get("ctxs", ())) if i is not None and i not in self.contexts]
        if missing:
            raise ValueError(f"BAGEL context {missing[0]} is not held here: the pool restarted during the generation.")
        with torch.inference_mode():
            reply = OPERATIONS[msg["bagel_op"]](self, msg)
        if msg["bagel_op"] == "velocities":
            return reply if self.rank == self.group * self.split.tp else {}
        return {**reply, "held": len(self.contexts)} if self.rank == 0 else {}  # held: contexts kept, for tests

    def prefill_text(self, msg: dict) -> dict:
        self.contexts[msg["out"]] = self.ops.prefill_text(self.contexts[msg["ctx"]], msg["ids"])
        return {}

    def add_image(self, msg: dict) -> dict:
        image = ImageInput(*(tensor(msg[k]) for k in ("vit_patches", "vit_position_ids", "vae_tokens",
                                                      "vae_position_ids")))  # fmt: skip
        self.contexts[msg["out"]] = self.ops.add_image(self.contexts[msg["ctx"]], image)
        return {}

    def velocities(self, msg: dict) -> dict:
        """This group's share of the passes: {pass index: velocity}."""
        mine = [i for i in range(len(msg["ctxs"])) if i % self.split.groups == self.group]
        if not mine:
            return {"velocities": {}}
        contexts = [self.contexts[msg["ctxs"][i]] for i in mine]
        vs = self.ops.velocities(contexts, tensor(msg["x_t"]), msg["t"], tensor(msg["position_ids"]))
        return {"velocities": {i: array(v) for i, v in zip(mine, vs)}}

    def next_token(self, msg: dict) -> dict:
        logits, self.contexts[msg["out"]] = self.ops.next_token_logits(self.contexts[msg["ctx"]], msg["token"])
        return {"logits": array(logits)}

    def release(self, msg: dict) -> dict:
        """Drop every context but the empty one (a generation's KV caches: hundreds of MB at 1024²)."""
        self.contexts = {0: EMPTY_CONTEXT}
        return {}


OPERATIONS = {
    "prefill_text": BagelRank.prefill_text,
    "add_image": BagelRank.add_image,
    "velocities": BagelRank.velocities,
    "next_token": BagelRank.next_token,
    "release": BagelRank.release,
}
