"""The Wan VAEs through a 1-worker pool on one GPU (NDHWC, the fused RMS norm), against float64 (skipped without a
GPU). fp32 stays within 1e-4 of a float64 forward of the module; bf16 is no worse than the in-process module's own
bf16 rounding (NCDHW, torch's ops) by more than the README's bound."""

import copy

import pytest
import torch

from bagel_vae_pp.pool import PoolSpec, WorkerPool
from bagel_vae_pp.wan import random_wan
from bagel_vae_pp.wan22 import random_wan22

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
MODELS = {"wan2.1": lambda: random_wan("wan2.1", seed=1), "wan2.2": lambda: random_wan22("wan2.2", seed=1)}
H, W, LATENT_FRAMES = 192, 256, 3  # 9 frames


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, T, H, W] in [-1, 1] -> IMAGE frames [T, H, W, 3] in [0, 1], float64 on the CPU."""
    return ((video[0].double() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).cpu()


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    vae = MODELS[request.param]()
    s = vae.params.downscale
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, vae.params.z_channels, LATENT_FRAMES, H // s, W // s, generator=gen)
    ref = copy.deepcopy(vae).to("cuda", torch.float64)
    with torch.inference_mode():
        decoded = frames_of(ref.decode(latent.to("cuda", torch.float64)))
        pixels = decoded.float()
        encoded = ref.encode(pixels.permute(3, 0, 1, 2)[None].to("cuda", torch.float64) * 2 - 1).cpu()
    del ref
    torch.cuda.empty_cache()
    return vae, {"decode": (latent, decoded), "encode": (pixels, encoded)}


def rel_err(out, ref) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def module_err(vae, op, data, ref) -> float:
    model = copy.deepcopy(vae).to("cuda", torch.bfloat16)
    with torch.inference_mode():
        if op == "decode":
            return rel_err(frames_of(model.decode(data.to("cuda", torch.bfloat16))), ref)
        x = data.permute(3, 0, 1, 2)[None].to("cuda") * 2 - 1
        return rel_err(model.encode(x.to(torch.bfloat16)).cpu(), ref)


def pool_err(vae, op, data, ref, dtype) -> float:
    pool = WorkerPool(PoolSpec.parse("0", dtype, 300))
    try:
        return rel_err((pool.decode if op == "decode" else pool.encode)(vae, data), ref)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_fp32_through_the_pool_is_fp32(case, op):
    vae, cases = case
    err = pool_err(vae, op, *cases[op], "fp32")
    print(f"\n[gpu] {type(vae).__name__} {op} fp32, 1-worker pool vs float64: {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_bf16_through_the_pool_within_the_bound_of_the_module(case, op):
    vae, cases = case
    pool, module = pool_err(vae, op, *cases[op], "bf16"), module_err(vae, op, *cases[op])
    print(f"\n[gpu] {type(vae).__name__} {op} bf16 vs float64: pool {pool:.2e}, in-process module {module:.2e}")
    assert pool <= max(1e-4, 1.25 * module)
