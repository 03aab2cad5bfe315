"""CUDA graphs of one rank's band forward, captured once per job shape and replayed.

At 1024² on 4 GPUs a rank's band decode is ~2,000 small kernel launches: eager it took 43 ms on an H100,
replayed from a graph 15 ms (bench/graph_experiment.py; bit-identical output). Graphs pay where bands are
small, so only bands up to GRAPH_MAX_PX pixels are captured; bigger ones are compute-bound and run eagerly.

Every rank of a job takes the same decision from the job's shape alone, so all of them capture (and replay)
together: the band forward's NCCL collectives are captured into the graphs. Inside a graph no host read may
happen, so the per-layer cancel agreement is off there; instead the ranks agree on the cancel flag before
each replay (one tiny all_reduce per batch item).

All graphs of a worker share one memory pool, so they hold the largest graph's activations, not the sum.
That is safe because replays never overlap and each replay's output is copied out before the next replay.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .collectives import Shard

# Bands of up to this many output pixels (decode) or input pixels (encode) are graphed: 2048² on 4 GPUs
# (1 Mpx per rank) still gained 8%, and its graph holds ~2.4 GiB; 4096² bands are compute-bound.
GRAPH_MAX_PX = 2**20
MAX_GRAPHS = 4  # job shapes kept per worker (least recently used dropped)
ENV_SWITCH = "BAGEL_VAE_PP_CUDA_GRAPHS"  # "0" runs every band eagerly


def wanted(device: torch.device, band_px: int) -> bool:
    return device.type == "cuda" and band_px <= GRAPH_MAX_PX and os.environ.get(ENV_SWITCH, "1") != "0"


@dataclass
class BandGraph:
    graph: torch.cuda.CUDAGraph
    static_in: Tensor
    static_out: Tensor
    shard: Shard  # its cached device tensors (row shares) are baked into the graph


class GraphCache:
    """One worker's captured band forwards, keyed by everything that shapes the captured work."""

    def __init__(self, max_graphs: int = MAX_GRAPHS):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, BandGraph] = OrderedDict()
        self.pool = None

    def clear(self) -> None:
        """Drop every graph and its memory (a new model makes them all stale)."""
        self.graphs.clear()
        self.pool = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def run(self, key: tuple, forward: Callable[[Tensor], Tensor], x: Tensor, shard: Shard) -> Tensor:
        """forward(x), from the graph for `key` (captured now if new). The result is valid until the next run."""
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.capture(forward, x, shard)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        entry.static_in.copy_(x)
        entry.graph.replay()
        return entry.static_out

    def capture(self, forward: Callable[[Tensor], Tensor], x: Tensor, shard: Shard) -> BandGraph:
        static_in = x.clone()
        # The warm-up and the capture are not the job's progress (the replay is); nothing may read the host.
        shard.agree_on_cancel, on_layer, shard.on_layer = False, shard.on_layer, lambda n=1: None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream: compiles kernels, picks algorithms
                forward(static_in)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = forward(static_in)
        finally:
            shard.on_layer = on_layer
        return BandGraph(graph, static_in, static_out, shard)
