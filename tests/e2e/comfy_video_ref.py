"""Run by the ComfyUI interpreter (cwd: the ComfyUI checkout) for test_wan_reference.py and
test_hunyuan_video_reference.py: ComfyUI's own video VAE on the inputs in IN, outputs to OUT (both safetensors).

IN holds `sd.<key>` (the state dict), `z` (a latent) and `x` (a video for the raw model, or IMAGE frames for the
core path); MODE is "model" (the raw model of the JSON config's "kind", built with the rest of the config and loaded
strictly: raw decode/encode), "core" (comfy.sd.VAE from the state dict, as the VAE Loader builds it:
VAE.decode/encode) or "tiled" (the same, VAE.decode_tiled/encode_tiled with the JSON config's "decode" / "encode"
keyword arguments). Kinds: "wan2.1" / "wan2.2" (WanVAE of comfy.ldm.wan.vae / vae2_2) and "hunyuan-video"
(comfy's AutoencoderKL with the LDM Encoder/Decoder in 3-D, `conv3d=True, time_compress=4`).
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


def raw_model(config: dict):
    kind = config.pop("kind")
    if kind == "hunyuan-video":
        from comfy.ldm.models.autoencoder import AutoencoderKL

        ddconfig = {"double_z": True, "resolution": 256, "in_channels": 3, "out_ch": 3, "attn_resolutions": [],
                    "dropout": 0.0, "conv3d": True, "time_compress": 4, **config}  # fmt: skip
        return AutoencoderKL(ddconfig=ddconfig, embed_dim=ddconfig["z_channels"])
    import comfy.ldm.wan.vae
    import comfy.ldm.wan.vae2_2

    return {"wan2.1": comfy.ldm.wan.vae, "wan2.2": comfy.ldm.wan.vae2_2}[kind].WanVAE(**config)


def main(mode: str, inp: str, out: str, config: str) -> None:
    tensors = load_file(inp)
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    with torch.inference_mode():
        if mode == "model":
            model = raw_model(json.loads(config)).eval()
            model.load_state_dict(sd, strict=True)
            decoded, encoded = model.decode(tensors["z"]), model.encode(tensors["x"])
        else:
            import comfy.sd

            vae = comfy.sd.VAE(sd=sd)
            assert vae.vae_dtype == torch.float32, vae.vae_dtype
            if mode == "tiled":
                tiles = json.loads(config)
                decoded = vae.decode_tiled(tensors["z"], **tiles["decode"])
                encoded = vae.encode_tiled(tensors["x"], **tiles["encode"])
            else:
                decoded, encoded = vae.decode(tensors["z"]), vae.encode(tensors["x"])
    save_file({"decoded": decoded.contiguous(), "encoded": encoded.contiguous()}, out)


if __name__ == "__main__":
    main(*ARGS)
