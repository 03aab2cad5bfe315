"""The CUDA-only paths of the pool, on real GPUs (skipped without two): NCCL collectives and CUDA graphs.

Small bands are replayed from CUDA graphs (graphs.py). A replay must give exactly what the eager band
forward gives, on the capturing job and on later ones, and a cancelled job must leave the pool usable.
"""

import threading

import pytest
import torch

from bagel_vae_pp import graphs
from bagel_vae_pp.autoencoder import random_autoencoder
from bagel_vae_pp.collectives import JobCancelled
from bagel_vae_pp.pool import PoolSpec, WorkerPool

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL, CUDA graphs)"
)


@pytest.fixture(scope="module")
def ae():
    return random_autoencoder("flux", seed=0)


def run_pool(ae, monkeypatch, graphs_on: bool, jobs):
    monkeypatch.setenv(graphs.ENV_SWITCH, "1" if graphs_on else "0")
    pool = WorkerPool(PoolSpec.parse("0,1", "bf16", timeout_s=120))
    try:
        return [(pool.decode if op == "decode" else pool.encode)(ae, data, **kw).clone() for op, data, kw in jobs]
    finally:
        pool.shutdown()


def test_graph_replays_equal_eager(ae, monkeypatch):
    latent = torch.randn(2, 16, 64, 72, generator=torch.Generator().manual_seed(1))  # batch 2: two replays
    image = torch.rand(1, 512, 576, 3, generator=torch.Generator().manual_seed(2))
    tiles = {"mode": "tiled", "tile_px": 256, "overlap_px": 64}  # 9 equal tiles a job: one graph, 18 replays
    jobs = [(op, data, kw) for op, data in (("decode", latent), ("encode", image)) for kw in ({}, {}, tiles, tiles)]
    eager = run_pool(ae, monkeypatch, False, jobs)
    graphed = run_pool(ae, monkeypatch, True, jobs)
    for (op, _, _), e, g in zip(jobs, eager, graphed):
        assert torch.isfinite(g).all()
        assert torch.equal(e, g), f"{op}: max diff {(e - g).abs().max().item():.3e}"


def test_cancel_between_replays_keeps_pool(ae, monkeypatch):
    monkeypatch.setenv(graphs.ENV_SWITCH, "1")
    pool = WorkerPool(PoolSpec.parse("0,1", "bf16", timeout_s=120))
    latent = torch.randn(64, 16, 64, 64)  # 64 replays: long enough to interrupt
    try:
        first = pool.decode(ae, latent[:1]).clone()
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()

        def interrupt():
            if stop.is_set():
                raise JobCancelled("interrupted by the test")

        with pytest.raises(JobCancelled):
            pool.decode(ae, latent, interrupt=interrupt)
        pids = [p.pid for p in pool.procs]
        assert torch.equal(pool.decode(ae, latent[:1]), first)
        assert [p.pid for p in pool.procs] == pids, "the cancelled job restarted the workers"
    finally:
        pool.shutdown()
