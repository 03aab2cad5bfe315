"""Band-parallel forward of the LTX-Video VAE: each rank runs the same walk (ltx_video.py) on its own rows of every
frame, all frames in one forward as ComfyUI runs them.

Only the `band` the walk is given differs from the single-process module's (ltx_video.Whole). Every 3x3x3 conv takes
one halo row from each neighbour, all frames in one exchange; only the true image edge pads itself, with a zero row
(encoder) or the mirror of its second row (decoder's reflect; from the halo when the band has a single row). The
encoder's stride-2 convs need no special case: bands start on even rows at every level (encode bands are multiples
of 32 pixels), so with one halo row above, the band's windows are the whole conv's; nor do space-to-depth and
depth-to-space, which regroup 2-row pairs inside the band, nor pixel and layer norm, which work per position. A
config's GroupNorm merges its statistics across ranks in fp32 (`sharded.group_norm`). The noise: every rank mixes
the same whole-latent noise into the latent before taking its rows (`LTXVideoVAE.noised`), and draws each spatial
map at its full size from the map's own seed, keeping the rows of its band. With one rank this is the plain forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .collectives import Shard, agree_cancel, exchange_rows
from .ltx_layers import pad_rows
from .ltx_video import LTXVideoVAE, Whole, spatial_noise
from .sharded import group_norm


class Band(Whole):
    """A rank's rows: halo rows from the neighbours, statistics over all ranks, its rows of each noise map."""

    def __init__(self, shard: Shard, device: torch.device, seed: int = 0):
        super().__init__(seed)
        self.shard, self.device = shard, device

    def pad_rows(self, x: Tensor, padding: str) -> Tensor:
        if self.shard.world == 1:
            return pad_rows(x, padding)
        return pad_rows(x, padding, *exchange_rows(x, self.shard))

    def group_norm(self, layer: nn.GroupNorm, x: Tensor) -> Tensor:
        return group_norm(layer, x, self.shard)

    def noise_rows(self, index: int, x: Tensor) -> Tensor:
        """Rows [a*f, b*f) of the whole map, for a latent band [a, b) that is f rows a latent row here."""
        a, b = self.shard.latent_bands[self.shard.rank]
        f = x.shape[-2] // (b - a)
        return spatial_noise(self.seed, index, self.shard.latent_bands[-1][1] * f, x.shape[-1])[a * f : b * f]

    def block_done(self) -> None:
        """After each block: the ranks agree on cancelling (there may be no GroupNorm to carry the flag)."""
        agree_cancel(self.shard, self.device)
        self.shard.on_layer()


def decode_band(vae: LTXVideoVAE, z: Tensor, shard: Shard, seed: int = 0) -> Tensor:
    """This rank's rows of every frame: a band [B, z, T, rows, w] of the noised LATENT (`vae.noised`) ->
    [B, 3, 1 + 8(T-1), 32*rows, 32*w]."""
    return vae.decode_forward(z, Band(shard, z.device, seed))


def encode_band(vae: LTXVideoVAE, x: Tensor, shard: Shard) -> Tensor:
    """This rank's rows of the LATENT: [B, 3, 1 + 8k, rows, W] in [-1, 1] (rows: a multiple of 32) ->
    [B, z, 1 + k, rows/32, W/32]."""
    return vae.encode_forward(x, Band(shard, x.device))


def count_layers(vae: LTXVideoVAE, op: str) -> int:
    """How many times `Shard.on_layer` fires in one band forward: once per block, once per GroupNorm."""
    part = vae.encoder if op == "encode" else vae.decoder
    blocks = part.down_blocks if op == "encode" else part.up_blocks
    return len(blocks) + sum(isinstance(m, nn.GroupNorm) for m in part.modules())
