"""The few collectives of the band-parallel forward: halo rows, GroupNorm statistics, K/V rows.

Each function is called by every rank of a `Shard` at the same point with tensors of the same shape,
and is a local no-op when the shard has one rank. Ranks are bands ordered top to bottom.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels


class JobCancelled(RuntimeError):
    """Every rank raises this at the same layer once any rank saw the pool's cancel flag."""


# A cancel flag gathered at GroupNorm i is acted on at GroupNorm i + CANCEL_LAG, when its copy to the host has
# long finished: no rank ever waits for the GPU just to look at it, and all ranks stop at the same layer.
CANCEL_LAG = 2


@dataclass
class Shard:
    rank: int  # this worker's band index, 0 = top
    world: int  # number of bands taking part
    group: dist.ProcessGroup | None  # None when world == 1
    latent_bands: list[tuple[int, int]]  # every rank's band at latent (mid-block) resolution
    is_cancelled: Callable[[], bool] = field(default=lambda: False)
    on_layer: Callable[..., None] = field(default=lambda n=1: None)  # n layers done
    flags: deque = field(default_factory=deque)  # (event or None, host tensor) per GroupNorm, oldest first
    shares: Tensor | None = None  # cache of row_shares
    # False inside a CUDA-graph capture, where no host read may happen; the caller checks between replays.
    agree_on_cancel: bool = True

    def __post_init__(self):
        assert len(self.latent_bands) == self.world, (self.latent_bands, self.world)
        assert (self.group is None) == (self.world == 1)

    @property
    def heights(self) -> list[int]:
        return [stop - start for start, stop in self.latent_bands]

    def row_shares(self, device: torch.device) -> Tensor:
        """Each rank's fraction of the rows, [world] fp32 on `device` (copied there once per job)."""
        if self.shares is None or self.shares.device != device:
            heights = torch.tensor(self.heights, dtype=torch.float32)
            self.shares = (heights / heights.sum()).to(device)
        return self.shares

    def push_cancel_flag(self, flag: Tensor) -> None:
        """Queue the gathered flag (device scalar); raise JobCancelled for one queued CANCEL_LAG layers ago."""
        host = torch.empty((), dtype=flag.dtype, pin_memory=flag.is_cuda)
        host.copy_(flag, non_blocking=flag.is_cuda)
        event = torch.cuda.Event() if flag.is_cuda else None
        if event is not None:
            event.record()
        self.flags.append((event, host))
        if len(self.flags) > CANCEL_LAG:
            event, host = self.flags.popleft()
            if event is not None:
                event.synchronize()
            if host.item():
                raise JobCancelled("cancelled")


def agree_cancel(shard: Shard, device: torch.device) -> None:
    """Raise JobCancelled on every rank if any rank sees the cancel flag now (a host sync: between graphs)."""
    if shard.world == 1:  # nobody to agree with: no device round trip
        cancelled = shard.is_cancelled()
    else:
        flag = torch.tensor([float(shard.is_cancelled())], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=shard.group)
        cancelled = bool(flag.item())
    if cancelled:
        raise JobCancelled("cancelled")


# torch 2.13 renamed all_gather_into_tensor; the GPU machines run 2.11, which has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_stacked(x: Tensor, shard: Shard, async_op: bool = False):
    """[world, *x.shape]: every rank's `x`, gathered into one buffer (one launch, no per-rank copies)."""
    x = x.contiguous()
    out = x.new_empty((shard.world, *x.shape))
    work = _all_gather_single(out.view(-1), x.view(-1), group=shard.group, async_op=async_op)
    return out, work


def exchange_halo(x: Tensor, shard: Shard, async_op: bool = False):
    """(row above this band, row below it) from the neighbouring ranks; None at the image edge.

    With `async_op`, returns a function that waits for the exchange and then gives the pair.
    """
    if shard.world == 1:
        return (lambda: (None, None)) if async_op else (None, None)
    # Rows travel pixel-major ([B, 2, W, C]): a copy-free view of a channels_last band, whose rows are
    # contiguous, and they come back as channels_last views again. (An NCHW band pays a 2-row copy.)
    edges = torch.cat([x[:, :, :1], x[:, :, -1:]], dim=2).permute(0, 2, 3, 1)  # [B, 2, W, C]
    gathered, work = all_gather_stacked(edges, shard, async_op)  # [world, B, 2, W, C]

    def rows():
        if work is not None:
            work.wait()
        top = gathered[shard.rank - 1][:, 1:2].permute(0, 3, 1, 2) if shard.rank > 0 else None
        bottom = gathered[shard.rank + 1][:, 0:1].permute(0, 3, 1, 2) if shard.rank < shard.world - 1 else None
        return top, bottom

    return rows if async_op else rows()


def exchange_rows(x: Tensor, shard: Shard) -> tuple[Tensor | None, Tensor | None]:
    """(row above this band, row below it) [..., 1, W] from the neighbouring ranks, None at the image edge, for a
    band whose rows are its second-last dim ([B, C, T, rows, W] video bands: all frames travel in one gather)."""
    edges = torch.stack([x[..., 0, :], x[..., -1, :]])  # [2, ..., W]
    gathered, _ = all_gather_stacked(edges, shard)  # [world, 2, ..., W]
    top = gathered[shard.rank - 1][1].unsqueeze(-2) if shard.rank > 0 else None
    bottom = gathered[shard.rank + 1][0].unsqueeze(-2) if shard.rank < shard.world - 1 else None
    return top, bottom


def group_stats(x: Tensor, groups: int, shard: Shard, x_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) mean and biased variance of x (+ x_bias [C]) over all ranks' rows, in fp32. [B, G] each.

    Each rank reduces its band to (mean, variance) in fp32; one all_gather of that small vector lets every rank
    merge them with Chan's formula, var = sum_r w_r (var_r + (mean_r - mean)^2), which stays exact when bands
    have very different means (a plain sum-of-squares would cancel catastrophically). The weights w_r are
    the ranks' shares of the rows, the same at every resolution, so nothing here waits for the GPU. The
    cancel flag rides along.
    """
    B = x.shape[0]
    mean, var = kernels.group_stats(x, groups, x_bias=x_bias)  # [B, G] fp32
    if shard.world == 1:
        if shard.is_cancelled():
            raise JobCancelled("cancelled")
        return mean, var
    flag = torch.full((1,), float(shard.is_cancelled()), dtype=torch.float32, device=x.device)
    local = torch.cat([flag, mean.flatten(), var.flatten()])
    stats, _ = all_gather_stacked(local, shard)  # [world, 1 + 2*B*G]
    if shard.agree_on_cancel:
        shard.push_cancel_flag(stats[:, 0].max())
    w = shard.row_shares(x.device)[:, None]  # [world, 1]
    means, variances = stats[:, 1 : 1 + B * groups], stats[:, 1 + B * groups :]
    mean_all = (w * means).sum(0)
    var_all = (w * (variances + (means - mean_all) ** 2)).sum(0)
    return mean_all.view(B, groups), var_all.view(B, groups)


def gather_tokens(t: Tensor, shard: Shard) -> Tensor:
    """Concatenate every rank's latent-resolution tokens [B, rows*W, C] in row order: [B, L, C]."""
    if shard.world == 1:
        return t
    B, n, C = t.shape
    per_row = n // shard.heights[shard.rank]
    lengths = [h * per_row for h in shard.heights]
    longest = max(lengths)
    padded = torch.nn.functional.pad(t, (0, 0, 0, longest - n)) if n < longest else t
    gathered, _ = all_gather_stacked(padded, shard)  # [world, B, longest, C]
    if min(lengths) == longest:
        return gathered.transpose(0, 1).reshape(B, shard.world * longest, C)  # a view when B == 1
    return torch.cat([g[:, :n] for g, n in zip(gathered, lengths)], dim=1)
