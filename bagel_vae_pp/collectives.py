"""The few collectives of the band-parallel forward: halo rows, GroupNorm statistics, K/V rows.

Each function is called by every rank of a `Shard` at the same point with tensors of the same shape,
and is a local no-op when the shard has one rank. Ranks are bands ordered top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


class JobCancelled(RuntimeError):
    """Every rank raises this at the same layer once any rank saw the pool's cancel flag."""


@dataclass
class Shard:
    rank: int  # this worker's band index, 0 = top
    world: int  # number of bands taking part
    group: dist.ProcessGroup | None  # None when world == 1
    latent_bands: list[tuple[int, int]]  # every rank's band at latent (mid-block) resolution
    is_cancelled: Callable[[], bool] = field(default=lambda: False)
    on_layer: Callable[[], None] = field(default=lambda: None)

    def __post_init__(self):
        assert len(self.latent_bands) == self.world, (self.latent_bands, self.world)
        assert (self.group is None) == (self.world == 1)


def exchange_halo(x: Tensor, shard: Shard) -> tuple[Tensor | None, Tensor | None]:
    """Return (row above this band, row below it) from the neighbouring ranks; None at the image edge."""
    if shard.world == 1:
        return None, None
    edges = torch.cat([x[:, :, :1], x[:, :, -1:]], dim=2).contiguous()  # [B, C, 2, W]
    gathered = [torch.empty_like(edges) for _ in range(shard.world)]
    dist.all_gather(gathered, edges, group=shard.group)
    top = gathered[shard.rank - 1][:, :, 1:2] if shard.rank > 0 else None
    bottom = gathered[shard.rank + 1][:, :, 0:1] if shard.rank < shard.world - 1 else None
    return top, bottom


def group_stats(x: Tensor, groups: int, shard: Shard) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and biased variance over all ranks' rows, in fp32. [B, G] each.

    Each rank reduces its band to (count, mean, M2) in fp32; one all_gather of a small fp64 vector lets every
    rank merge them with Chan's formula, which stays exact when bands have very different means
    (a plain sum-of-squares would cancel catastrophically). The cancel flag rides along, so all ranks
    agree on it at the same layer.
    """
    B, C = x.shape[:2]
    var, mean = torch.var_mean(x.reshape(B, groups, -1).float(), dim=-1, correction=0)  # [B, G]
    if shard.world == 1:
        if shard.is_cancelled():
            raise JobCancelled("cancelled")
        return mean, var
    count = x[0, : C // groups].numel()
    local = torch.cat(
        [
            x.new_tensor([count, float(shard.is_cancelled())], dtype=torch.float64),
            mean.double().flatten(),
            (var.double() * count).flatten(),
        ]
    )
    gathered = [torch.empty_like(local) for _ in range(shard.world)]
    dist.all_gather(gathered, local, group=shard.group)
    stats = torch.stack(gathered).cpu()  # [world, 2 + 2*B*G]
    if stats[:, 1].any():
        raise JobCancelled("cancelled")
    n = stats[:, :1]  # [world, 1]
    means, m2s = stats[:, 2 : 2 + B * groups], stats[:, 2 + B * groups :]
    total = n.sum()
    mean_all = (n * means).sum(0) / total
    m2_all = (m2s + n * (means - mean_all) ** 2).sum(0)
    shape = (B, groups)
    return mean_all.view(shape).float().to(x.device), (m2_all / total).view(shape).float().to(x.device)


def gather_rows(x: Tensor, shard: Shard) -> Tensor:
    """Concatenate every rank's band of a latent-resolution map along H: [B, C, sum(rows), W]."""
    if shard.world == 1:
        return x
    heights = [stop - start for start, stop in shard.latent_bands]
    assert x.shape[2] == heights[shard.rank], (x.shape, heights)
    tallest = max(heights)
    padded = torch.nn.functional.pad(x, (0, 0, 0, tallest - x.shape[2])).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(shard.world)]
    dist.all_gather(gathered, padded, group=shard.group)
    return torch.cat([g[:, :, :h] for g, h in zip(gathered, heights)], dim=2)
