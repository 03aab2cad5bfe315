"""BAGEL through the pool on a real GPU (skipped without CUDA): the tiny checkpoint in bf16 and fp32.

The sampler's arithmetic runs on the host's CPU for the in-process path and the pool alike, and a CFG group
computes whole passes, so a 1-worker pool and CFG-parallel groups give the in-process latent bit for bit; tensor
parallelism changes the order of the sums (fp32: within 1e-5). In-process, a step's two passes run batched (their
rows in one GEMM, which cuBLAS may round otherwise than one pass's); two CFG groups run one pass each, so their
reference runs the passes one at a time. Two workers share GPU 0 through gloo, as the full-size check in
bench/bench_bagel_pool.py does (`--devices 0,0`).
"""

import pytest
import torch

from bagel_vae_pp.bagel.loader import load_bagel
from bagel_vae_pp.bagel.pipeline import sequential_passes, text_to_image
from bagel_vae_pp.bagel.sampler import GuidanceOptions
from bagel_vae_pp.bagel.split import Split
from bagel_vae_pp.bagel.tiny import TINY_TP_PARAMS, write_tiny_checkpoint
from bagel_vae_pp.bagel_job import PoolBagel
from bagel_vae_pp.pool import PoolSpec, WorkerPool

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.timeout(300),
]
T2I = GuidanceOptions(8, 3.0, 4.0, 2.0, (0.4, 1.0), "global", 0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bagel") / "tiny-tp")
    write_tiny_checkpoint(path, seed=5, params=TINY_TP_PARAMS)
    return path


def generate(model, tokenizer, passes=None):
    return text_to_image(model, tokenizer, "a red cube", 128, 96, 3, T2I, passes=passes)[0]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("split", ["1x1", "2x1", "1x2"])
def test_pool_on_gpu_0_against_in_process(folder, dtype, split):
    loaded = load_bagel(folder, "cuda:0", {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    split = Split(*map(int, split.split("x")))
    want = generate(loaded.model, loaded.tokenizer, sequential_passes(loaded.model) if split.groups > 1 else None)
    del loaded.model
    pool = WorkerPool(PoolSpec(("cuda:0",) * split.workers, dtype, 120.0))
    try:
        bagel = PoolBagel(pool, folder, loaded.tokenizer.special, dtype, split)
        got = generate(bagel, loaded.tokenizer)
    finally:
        pool.shutdown()
    if split.tp == 1:
        assert torch.equal(got, want)
    else:
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= (1e-5 if dtype == "fp32" else 5e-2), rel
