"""Run by the ComfyUI interpreter (cwd: the ComfyUI checkout) for test_ltx_reference.py: ComfyUI's own LTX-Video VAE
through comfy.sd.VAE, as the VAE Loader builds it, on the inputs in IN; outputs to OUT (both safetensors).

IN holds `sd.<key>` (the state dict), `z` (a LATENT), `x` (IMAGE frames), `latent_noise` and `map.<i>` (the noise
our decode draws). MODE "core" builds the VAE from the weights alone (ComfyUI guesses the version), "metadata" with
the JSON CONFIG as the file's metadata `config` ({"vae": ...}), and "guess" writes ComfyUI's guessed config and its
state dict's key shapes for each version (built on meta), JSON in OUT's uint8 tensor `json`. core's decode draws
its noise with torch.randn_like / torch.randn, unseeded: both are replaced, after the model is built, by functions
that hand out ours in order and check each shape.
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


def guesses(out: str) -> None:
    from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE

    found = {}
    for version in range(3):
        with torch.device("meta"):
            model = VideoVAE(version=version)
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        found[version] = {"config": model.guess_config(version), "shapes": shapes}
    save_file({"json": torch.frombuffer(bytearray(json.dumps(found).encode()), dtype=torch.uint8)}, out)


def queue(tensors: list, what: str):
    def draw(*args, **kwargs):
        shape = tuple(args[0].shape) if what == "randn_like" else tuple(args[0])
        assert tensors, f"core drew more {what} than we gave"
        t = tensors.pop(0)
        assert tuple(t.shape) == shape, (what, tuple(t.shape), shape)
        return t.clone()

    return draw


def main(mode: str, inp: str, out: str, config: str) -> None:
    if mode == "guess":
        return guesses(out)
    import comfy.sd

    tensors = load_file(inp)
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    metadata = {"config": json.dumps({"vae": json.loads(config)})} if mode == "metadata" else None
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    assert vae.vae_dtype == torch.float32, vae.vae_dtype
    vae.first_stage_model.load_state_dict(sd, strict=True)  # the fixture has every key ComfyUI's model has
    maps = [tensors[f"map.{i}"] for i in range(sum(k.startswith("map.") for k in tensors))]
    noise = [tensors["latent_noise"]] if "latent_noise" in tensors else []
    torch.randn, torch.randn_like = queue(maps, "randn"), queue(noise, "randn_like")
    with torch.inference_mode():
        decoded = vae.decode(tensors["z"])
        assert not maps and not noise, f"core left {len(maps)} spatial and {len(noise)} latent noise draws unused"
        encoded = vae.encode(tensors["x"])
    save_file({"decoded": decoded.contiguous(), "encoded": encoded.contiguous()}, out)


if __name__ == "__main__":
    main(*ARGS)
