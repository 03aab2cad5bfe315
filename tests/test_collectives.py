"""Cancel across ranks: ranks that see the pool's cancel flag at different moments still stop at the same layer.

A worker reads the pool's flag on its own, so one rank may see it a layer or more before another, or never. Every
GroupNorm gathers all ranks' flags with its statistics and every rank acts on the agreed value CANCEL_LAG layers
later; between CUDA-graph replays `agree_cancel` reduces the flags. A rank that acted on its own view would leave
the others in a collective it never joins: a hang on GPUs; here a gloo error, a mismatch, or the parent's timeout.
Real gloo processes run the band-parallel decode of the tiny VAE.
"""

import json

import pytest
import torch
import torch.distributed as dist
from ranks import gloo_group, run_ranks

from bagel_vae_pp.autoencoder import random_autoencoder
from bagel_vae_pp.bands import plan_bands
from bagel_vae_pp.collectives import CANCEL_LAG, JobCancelled, Shard, agree_cancel
from bagel_vae_pp.sharded import count_layers, decode_band

LATENT_HW = (6, 4)
REPLAYS = 6  # agree_cancel calls per scenario, one per (pretend) graph replay
TIMEOUT_S = 60  # the whole run, spawn included (a few seconds when the ranks agree)

# Per scenario, per rank: the call of its is_cancelled (1 = the first) from which that rank sees the flag, or None
# for a rank that never sees it. The decode reads it once per GroupNorm, `agree_cancel` once per call.
SCENARIOS = {
    2: [(3, None), (None, 8), (12, 5), (5, 5), (21, None), (None, None)],
    3: [(None, 4, 9), (7, None, 7), (None, None, 1), (2, 6, 3), (None, 20, None)],
}


def run_until_cancelled(rank, world, seen_from, job) -> list:
    """Run `job(shard)` with a flag this rank sees from its `seen_from`-th look on; [how it ended, layers done]."""
    looks, layers = [0], [0]

    def is_cancelled():
        looks[0] += 1
        return seen_from is not None and looks[0] >= seen_from

    def on_layer(n=1):
        layers[0] += n

    bands = plan_bands(LATENT_HW[0], world)
    shard = Shard(rank, world, dist.group.WORLD, bands, is_cancelled, on_layer)
    try:
        job(shard)
    except JobCancelled:
        return ["cancelled", layers[0]]
    return ["finished", layers[0]]


def rank_main(rank, world, store_path, out_path):
    """One gloo rank: every scenario through the decode, then through `agree_cancel`; the outcomes as JSON."""
    torch.set_num_threads(1)  # up to three ranks share the test machine's cores
    with gloo_group(rank, world, store_path, 30):
        ae = random_autoencoder("tiny", seed=1)
        latent = torch.randn(1, 16, *LATENT_HW, generator=torch.Generator().manual_seed(0))
        a, b = plan_bands(LATENT_HW[0], world)[rank]

        def decode(shard):
            with torch.inference_mode():
                decode_band(ae, latent[:, :, a:b], shard)

        def replays(shard):
            for _ in range(REPLAYS):
                agree_cancel(shard, torch.device("cpu"))
                shard.on_layer()

        outcomes = []
        try:
            for seen in SCENARIOS[world]:
                outcomes.append(
                    {job.__name__: run_until_cancelled(rank, world, seen[rank], job) for job in (decode, replays)}
                )
        except Exception as e:  # a peer left a collective this rank is in: the parent shows it beside the others
            outcomes.append({"error": f"{type(e).__name__}: {e}"[:300]})
        with open(out_path, "w") as f:
            json.dump(outcomes, f)


def expected(seen, looks_per_job, lag):
    """The outcome every rank must report: the first look on any rank that saw the flag, acted on `lag` looks
    later; a job that ends before then finishes."""
    first = min((k for k in seen if k is not None), default=None)
    if first is None or first - 1 + lag >= looks_per_job:
        return ["finished", looks_per_job]
    return ["cancelled", first - 1 + lag]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_seeing_the_flag_at_different_times_stop_at_the_same_layer(tmp_path, world):
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    store = str(tmp_path / "store")
    run_ranks(rank_main, lambda r: (r, world, store, str(outs[r])), world, TIMEOUT_S)
    got = [json.loads(path.read_text()) for path in outs]
    layers = count_layers(random_autoencoder("tiny", seed=1), "decode")
    for n, seen in enumerate(SCENARIOS[world]):
        want = {"decode": expected(seen, layers, CANCEL_LAG), "replays": expected(seen, REPLAYS, 0)}
        ranks = [g[n] if n < len(g) else g[-1] for g in got]  # a rank that failed earlier shows its error
        assert ranks == [want] * world, f"flag seen from looks {seen}"
