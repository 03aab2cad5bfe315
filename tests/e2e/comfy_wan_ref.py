"""Run by the ComfyUI interpreter (cwd: the ComfyUI checkout) for test_wan_reference.py: ComfyUI's own Wan 2.1 VAE
on the inputs in IN, outputs to OUT (both safetensors).

IN holds `sd.<key>` (the state dict), `z` (a latent) and `x` (a video for the raw model, or IMAGE frames for the
core path); MODE is "model" (WanVAE of comfy.ldm.wan.vae, or of vae2_2 for version "2.2", built with the JSON
config and loaded strictly: raw decode/encode) or "core" (comfy.sd.VAE from the state dict, as the VAE Loader
builds it: VAE.decode/encode).
"""

import json
import os
import sys

sys.path.insert(0, os.getcwd())  # the ComfyUI checkout
ARGS, sys.argv = sys.argv[1:], [sys.argv[0], "--cpu"]  # ComfyUI parses sys.argv as its own options
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main(mode: str, inp: str, out: str, config: str) -> None:
    tensors = load_file(inp)
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    with torch.inference_mode():
        if mode == "model":
            import comfy.ldm.wan.vae
            import comfy.ldm.wan.vae2_2

            config = json.loads(config)
            module = comfy.ldm.wan.vae2_2 if config.pop("version") == "2.2" else comfy.ldm.wan.vae
            model = module.WanVAE(**config).eval()
            model.load_state_dict(sd, strict=True)
            decoded, encoded = model.decode(tensors["z"]), model.encode(tensors["x"])
        else:
            import comfy.sd

            vae = comfy.sd.VAE(sd=sd)
            assert vae.vae_dtype == torch.float32, vae.vae_dtype
            decoded, encoded = vae.decode(tensors["z"]), vae.encode(tensors["x"])
    save_file({"decoded": decoded.contiguous(), "encoded": encoded.contiguous()}, out)


if __name__ == "__main__":
    main(*ARGS)
