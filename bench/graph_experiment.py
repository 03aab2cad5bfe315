"""Can one rank's band decode be captured in a CUDA graph with its NCCL collectives, and what does it save?

At 1024²–2048² each rank is bound by kernel launches (~2,000 per decode; see BENCHMARKS.md), so replaying a
captured graph per (band shape, dtype) is the main lever left. This runs N processes (one per GPU, NCCL,
no pool), times the eager band decode, captures it (cancel agreement off: no host reads inside a graph),
replays it, and checks the replay against the eager output bit for bit.

    python bench/graph_experiment.py --workers 4 --sizes 1024,2048
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.autoencoder import random_autoencoder  # noqa: E402
from bagel_vae_pp.bands import plan_bands  # noqa: E402
from bagel_vae_pp.collectives import Shard  # noqa: E402
from bagel_vae_pp.sharded import decode_band  # noqa: E402


def median_ms(fn, repeat=7):
    times = []
    for _ in range(repeat):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[1:])


def one_size(rank, world, size, ae, dev):
    h = size // 8
    bands = plan_bands(h, world)
    a, b = bands[rank]
    z = torch.randn(1, 16, h, h, generator=torch.Generator().manual_seed(size))[:, :, a:b].to(dev, torch.bfloat16)
    shard = Shard(rank, world, dist.group.WORLD if world > 1 else None, bands, agree_on_cancel=False)
    with torch.inference_mode():
        eager = decode_band(ae, z, shard)
        eager_ms = median_ms(lambda: decode_band(ae, z, shard))
        static_z = z.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on the capture stream's side, as torch.cuda.graph asks
            decode_band(ae, static_z, shard)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        dist.barrier()
        graph = torch.cuda.CUDAGraph()
        before = torch.cuda.memory_allocated(dev)
        with torch.cuda.graph(graph):
            static_out = decode_band(ae, static_z, shard)
        pool_gib = (torch.cuda.memory_allocated(dev) - before) / 2**30
        graph.replay()
        torch.cuda.synchronize()
        same = torch.equal(static_out, eager)
        max_diff = (static_out.float() - eager.float()).abs().max().item()
        graph_ms = median_ms(graph.replay)
    return eager_ms, graph_ms, same, max_diff, pool_gib


def run(rank, world, sizes, store):
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", store=dist.FileStore(store, world), rank=rank, world_size=world, device_id=dev)
    ae = copy.deepcopy(random_autoencoder("flux")).to(dev, torch.bfloat16)
    for size in sizes:
        try:
            eager_ms, graph_ms, same, diff, gib = one_size(rank, world, size, ae, dev)
            if rank == 0:
                print(f"{world} GPUs {size}²: eager {eager_ms:.1f} ms, graph replay {graph_ms:.1f} ms "
                      f"({eager_ms / graph_ms:.2f}x), replay == eager: {same} (max diff {diff:.2e}), "
                      f"graph memory {gib:.2f} GiB", flush=True)  # fmt: skip
        except Exception as e:  # report and stop: a failed capture leaves NCCL in an unknown state
            print(f"rank {rank} {size}²: capture failed: {type(e).__name__}: {e}", flush=True)
            raise
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--sizes", default="1024,2048")
    args = p.parse_args()
    store = f"/tmp/graph_experiment_store_{os.getpid()}"
    mp.spawn(run, args=(args.workers, [int(s) for s in args.sizes.split(",")], store), nprocs=args.workers)


if __name__ == "__main__":
    main()
