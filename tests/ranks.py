"""Real processes as the ranks of a gloo group, for the tests that run collectives without the pool."""

from __future__ import annotations

import multiprocessing
import time
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist


def run_ranks(target, args_of_rank, world: int, timeout_s: float) -> None:
    """Run target(*args_of_rank(r)) in `world` spawned processes; a rank still running after `timeout_s` (waiting
    in a collective another rank left) fails the test instead of hanging it, and every rank must exit with 0."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has run torch's thread pools
    procs = [ctx.Process(target=target, args=args_of_rank(r)) for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=max(0.0, start + timeout_s - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {timeout_s} s: a rank waits in a collective"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@contextmanager
def gloo_group(rank: int, world: int, store_path: str, timeout_s: float = 60):
    """Inside a spawned rank: the default process group over gloo, met through a file store, torn down on exit."""
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, world),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
