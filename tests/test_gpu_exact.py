"""Exactness through the pool on one GPU, against float64 (skipped without a GPU).

A user who picks fp32 asks for fp32: the workers then run with TF32 off and every kernel in fp32, so a 1-worker
pool stays within 1e-4 of a float64 forward (torch's default TF32 convolutions were 4e-3 off at 1024² on an H100).
In bf16 the pool may not be worse than the in-process module's own rounding by more than the README's bound.
"""

import copy

import pytest
import torch

from bagel_vae_pp import cli
from bagel_vae_pp.autoencoder import random_autoencoder
from bagel_vae_pp.pool import PoolSpec, WorkerPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
SIZE = 1024


def to_image(x: torch.Tensor) -> torch.Tensor:
    return ((x.double() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


@pytest.fixture(scope="module")
def case():
    """The full FLUX architecture (random weights), a test picture, its latent, and float64 references."""
    ae = random_autoencoder("flux", seed=0)
    pixels = cli.test_image(SIZE)
    ref = copy.deepcopy(ae).to("cuda", torch.float64)
    with torch.inference_mode():
        latent = ref.encode(pixels.permute(0, 3, 1, 2).to("cuda", torch.float64) * 2 - 1)
        image64 = to_image(ref.decode(latent))
    latent64, latent = latent.cpu(), latent.float().cpu()
    del ref
    torch.cuda.empty_cache()
    return ae, pixels, latent, {"decode": image64, "encode": latent64}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def module_err(ae, op, data, ref, dtype) -> float:
    """The in-process module in `dtype` with torch's default settings, against float64."""
    model = copy.deepcopy(ae).to("cuda", dtype)
    with torch.inference_mode():
        if op == "decode":
            out = to_image(model.decode(data.to("cuda", dtype)))
        else:
            out = model.encode((data.permute(0, 3, 1, 2).to("cuda") * 2 - 1).to(dtype)).cpu()
    return rel_err(out, ref)


def pool_err(ae, op, data, ref, dtype: str) -> float:
    pool = WorkerPool(PoolSpec.parse("0", dtype, 300))
    try:
        out = (pool.decode if op == "decode" else pool.encode)(ae, data)
        out = (pool.decode if op == "decode" else pool.encode)(ae, data).clone()  # the second runs any graph
        return rel_err(out, ref)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_fp32_through_the_pool_is_fp32(case, op):
    ae, pixels, latent, refs = case
    err = pool_err(ae, op, latent if op == "decode" else pixels, refs[op], "fp32")
    print(f"\n[gpu] {op} {SIZE}² fp32, 1-worker pool vs float64: {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_bf16_through_the_pool_within_the_bound_of_the_module(case, op):
    ae, pixels, latent, refs = case
    data = latent if op == "decode" else pixels
    module, pool = module_err(ae, op, data, refs[op], torch.bfloat16), pool_err(ae, op, data, refs[op], "bf16")
    print(f"\n[gpu] {op} {SIZE}² bf16 vs float64: pool {pool:.2e}, in-process module {module:.2e}")
    assert pool <= max(1e-4, 1.25 * module)


def test_a_cancel_from_the_progress_bar_leaves_later_jobs_right(case):
    """On a GPU worker (CUDA graphs replayed per batch item, cancel agreed between replays)."""
    ae, _, latent, _ = case
    pool = WorkerPool(PoolSpec.parse("0", "bf16", 300))
    try:
        first = pool.decode(ae, latent).clone()
        calls = []

        def cancel_on_second_call(done, total):
            calls.append(done)
            if len(calls) == 2:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            pool.decode(ae, latent.repeat(16, 1, 1, 1), progress=cancel_on_second_call)
        assert torch.equal(pool.decode(ae, latent).clone(), first)
    finally:
        pool.shutdown()
