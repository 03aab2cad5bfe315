"""FP8 weights against bf16 at full size: one velocity pass (a prompt prefilled, then a 1024² noisy latent block),
relative L2 error of the velocity, for each FP8 weight dtype. Random weights, seeded, so every model is the same
before quantization. One GPU; the bf16 model and one quantized model are held at a time.

    python bench/bagel_fp8_fidelity.py --size 1024
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bagel_vae_pp.bagel.images import latent_grid  # noqa: E402
from bagel_vae_pp.bagel.model import EMPTY_CONTEXT  # noqa: E402
from bagel_vae_pp.bagel.quantize import WEIGHT_DTYPES, quantize_llm_  # noqa: E402
from bagel_vae_pp.bagel.tiny import CONFIGS, random_bagel  # noqa: E402
from bagel_vae_pp.bagel.tokenizer import SpecialTokens  # noqa: E402
from bagel_vae_pp.bagel.vit import flat_position_ids  # noqa: E402

SPECIAL = SpecialTokens(151644, 151645, 151652, 151653)


@torch.inference_mode()
def velocity(model, size: int) -> torch.Tensor:
    """Prefill 32 prompt tokens, then the velocity [N, 64] of a seeded noisy latent at t = 0.7."""
    params = model.params
    ctx = model.prefill_text(EMPTY_CONTEXT, [SPECIAL.bos, *range(1000, 1032), SPECIAL.eos])
    h, w = latent_grid(size, size, params)
    x = torch.randn(h * w, params.patch_latent_dim, generator=torch.Generator().manual_seed(1))
    block = model.wrap_image(model.latent_tokens(x, 0.7, flat_position_ids(h, w, params.max_latent_size)), SPECIAL)
    return model.velocity(ctx, block).float()


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="7b-mot")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--weight-dtypes", default="fp8_e4m3fn,fp8_e4m3fn_fast")
    args = parser.parse_args(argv)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run on a small config
    reference = velocity(random_bagel(CONFIGS[args.config], 0, device=device, dtype=torch.bfloat16), args.size)
    empty_cache()
    result = {
        "config": args.config,
        "size": args.size,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    for name in args.weight_dtypes.split(","):
        assert name in WEIGHT_DTYPES, name
        model = quantize_llm_(random_bagel(CONFIGS[args.config], 0, device=device, dtype=torch.bfloat16), name)
        empty_cache()
        v = velocity(model, args.size)
        result[f"{name}_velocity_rel_l2"] = round(float((v - reference).norm() / reference.norm()), 5)
        del model
        empty_cache()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
