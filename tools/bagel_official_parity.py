"""Our BAGEL pipeline against ByteDance's official InterleaveInferencer on tiny random checkpoints (fp32, CPU).

Run with an interpreter that has transformers==4.49.0, einops, opencv-python-headless and torchvision (only its
Python transforms are used), from anywhere:
    python tools/bagel_official_parity.py OFFICIAL_DIR OUR_REPO [--seeds 0,1] [--steps 50]
OFFICIAL_DIR: a checkout of ByteDance-Seed/Bagel (056b5fd), used unmodified; two stand-ins only:
- flash_attn.flash_attn_varlen_func: per-sequence attention in float64, causal = bottom-right aligned (as
  flash-attn >= 2.1), GQA by repeating K/V heads; cast back to the query dtype;
- "fp32 redirect": the official modules see a `torch` whose bfloat16 is float32 (their hard-coded bf16 casts
  would otherwise make the official run bf16 whatever the weights).
The official VAE is built with the tiny checkpoint's widths (its load_ae hard-codes 128) from its own class.
Prints per (checkpoint seed, case): max |ours - official| in the sampler's token space and in raw LATENT space.
"""

import argparse
import importlib.machinery
import json
import os
import sys
import types

import torch
import torch.library


def install_stand_ins():
    original = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: lambda f: f  # torchvision's C ops do not load on torch+cpu
    import torchvision  # noqa: F401

    torch.library.register_fake = original
    import transformers.modeling_utils  # noqa: F401  (before the stand-in: it probes for a real flash_attn)

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=False, **unused
    ):
        out = torch.empty_like(q)
        for i in range(len(cu_seqlens_q) - 1):
            (q0, q1), (k0, k1) = cu_seqlens_q[i : i + 2].tolist(), cu_seqlens_k[i : i + 2].tolist()
            qs, ks, vs = q[q0:q1].double(), k[k0:k1].double(), v[k0:k1].double()  # [L, H, D]
            rep = qs.shape[1] // ks.shape[1]
            ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
            scores = torch.einsum("qhd,khd->hqk", qs, ks) / qs.shape[-1] ** 0.5
            if causal:
                lq, lk = qs.shape[0], ks.shape[0]
                allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
                scores = scores.masked_fill(~allowed, float("-inf"))
            out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs).to(q.dtype)
        return out

    flash_attn = types.ModuleType("flash_attn")
    flash_attn.flash_attn_varlen_func = flash_attn_varlen_func
    flash_attn.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)  # transformers probes find_spec
    sys.modules["flash_attn"] = flash_attn


def redirect_bf16_to_fp32(modules):
    proxy = types.ModuleType("torch_fp32")
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.bfloat16 = torch.float32
    for m in modules:
        if getattr(m, "torch", None) is torch:
            m.torch = proxy


def build_official(folder, our_vae_params):
    from data.data_utils import add_special_tokens
    from data.transforms import ImageTransform
    from inferencer import InterleaveInferencer
    from modeling import autoencoder as official_ae
    from modeling.bagel import Bagel, BagelConfig, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from modeling.qwen2 import Qwen2Tokenizer
    from safetensors.torch import load_file

    llm_config = Qwen2Config.from_json_file(os.path.join(folder, "llm_config.json"))
    llm_config.qk_norm, llm_config.tie_word_embeddings, llm_config.layer_module = True, False, "Qwen2MoTDecoderLayer"
    vit_config = SiglipVisionConfig.from_json_file(os.path.join(folder, "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1
    p = our_vae_params
    vae_params = official_ae.AutoEncoderParams(
        resolution=256,
        in_channels=3,
        downsample=8,
        ch=p.ch,
        out_ch=3,
        ch_mult=list(p.ch_mult),
        num_res_blocks=p.num_res_blocks,
        z_channels=p.z_channels,
        scale_factor=0.3611,
        shift_factor=0.1159,
    )
    vae = official_ae.AutoEncoder(vae_params)
    vae.load_state_dict(load_file(os.path.join(folder, "ae.safetensors")), strict=True)
    ema = {k: v.float() for k, v in load_file(os.path.join(folder, "ema.safetensors")).items()}
    max_latent = int(ema["latent_pos_embed.pos_embed"].shape[0] ** 0.5)
    vit_side = int(ema["vit_pos_embed.pos_embed"].shape[0] ** 0.5)
    config = BagelConfig(
        visual_gen=True,
        visual_und=True,
        llm_config=llm_config,
        vit_config=vit_config,
        vae_config=vae_params,
        vit_max_num_patch_per_side=vit_side,
        connector_act="gelu_pytorch_tanh",
        latent_patch_size=2,
        max_latent_size=max_latent,
    )
    model = Bagel(Qwen2ForCausalLM(llm_config), SiglipVisionModel(vit_config), config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    missing, unexpected = model.load_state_dict(ema, strict=False)
    assert not unexpected and all("pos_embed" not in k for k in missing), (missing, unexpected)
    assert not missing, missing
    model = model.float().eval()
    tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    tokenizer, new_token_ids, _ = add_special_tokens(tokenizer)
    side = max_latent * 16
    vae_transform = ImageTransform(side, side // 2, 16)
    vit_transform = ImageTransform(vit_side * 14, min(224, vit_side * 14), 14)
    return InterleaveInferencer(model, vae.float().eval(), tokenizer, vae_transform, vit_transform, new_token_ids)


def official_latent(inferencer, inputs, **kwargs):
    """The final sampler tokens [N, 64] and the image shape; captured where decode_image receives them."""
    captured = {}

    def capture(latent, image_shape):
        captured["tokens"], captured["shape"] = latent.detach().clone(), image_shape

    inferencer.decode_image = capture
    inferencer.interleave_inference(inputs, **kwargs)
    return captured["tokens"], captured["shape"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("official")
    parser.add_argument("repo")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="checkpoint weight seeds (the sampling seed too)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workdir", default="/tmp/parity/ckpts")
    args = parser.parse_args()
    install_stand_ins()
    sys.path[:0] = [args.official, args.repo]
    import inferencer as official_inferencer
    import modeling.autoencoder
    import modeling.bagel.bagel
    import modeling.bagel.modeling_utils
    import modeling.bagel.qwen2_navit
    import modeling.bagel.siglip_navit
    import modeling.qwen2.modeling_qwen2
    import modeling.siglip.modeling_siglip
    from PIL import Image

    from bagel_vae_pp.bagel.images import pil_to_unit, raw_to_tokens
    from bagel_vae_pp.bagel.loader import load_bagel
    from bagel_vae_pp.bagel.pipeline import autoencoder_moments, edit_image, text_to_image, understand_image
    from bagel_vae_pp.bagel.sampler import GuidanceOptions
    from bagel_vae_pp.bagel.tiny import write_tiny_checkpoint

    redirect_bf16_to_fp32(
        [
            official_inferencer,
            modeling.autoencoder,
            modeling.bagel.bagel,
            modeling.bagel.modeling_utils,
            modeling.bagel.qwen2_navit,
            modeling.bagel.siglip_navit,
            modeling.qwen2.modeling_qwen2,
            modeling.siglip.modeling_siglip,
        ]
    )
    torch.set_grad_enabled(False)
    prompt = "a cat on the hat"
    t2i = dict(
        cfg_text_scale=4.0,
        cfg_img_scale=1.5,
        cfg_interval=[0.4, 1.0],
        timestep_shift=3.0,
        num_timesteps=args.steps,
        cfg_renorm_min=0.0,
        cfg_renorm_type="global",
    )
    edit = dict(t2i, cfg_img_scale=2.0, cfg_interval=[0.0, 1.0], cfg_renorm_type="text_channel")

    def options(kw):
        return GuidanceOptions(
            kw["num_timesteps"],
            kw["timestep_shift"],
            kw["cfg_text_scale"],
            kw["cfg_img_scale"],
            tuple(kw["cfg_interval"]),
            kw["cfg_renorm_type"],
            kw["cfg_renorm_min"],
        )

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        folder = write_tiny_checkpoint(os.path.join(args.workdir, f"seed{seed}"), seed=seed)
        ours = load_bagel(folder, "cpu", torch.float32)
        official = build_official(folder, ours.vae.params)
        photos = [Image.fromarray((torch.rand(hw[0], hw[1], 3, generator=torch.Generator().manual_seed(seed)) * 255)
                                  .to(torch.uint8).numpy()) for hw in ((100, 70), (130, 130))]  # fmt: skip
        cases = [("t2i", t2i, [prompt], (128, 96)), ("t2i", t2i, [prompt], (64, 128))]
        cases += [("edit", edit, [photo, prompt], None) for photo in photos]
        limit = 12  # greedy understanding; the official limit N gives N - 1 new tokens
        off = official.interleave_inference(
            [photos[0], "what is it?"], understanding_output=True, do_sample=False, max_think_token_n=limit
        )[0]
        mine = understand_image(ours.model, ours.tokenizer, pil_to_unit(photos[0]), "what is it?", limit - 1)
        print(json.dumps(dict(seed=seed, case="und", same_text=off == mine, official=off, ours=mine)), flush=True)
        for case, kw, inputs, shape in cases:
            torch.manual_seed(seed)
            tokens_off, shape = official_latent(official, inputs, image_shapes=shape, **kw)
            if case == "t2i":
                raw, _ = text_to_image(ours.model, ours.tokenizer, prompt, shape[1], shape[0], seed, options(kw))
            else:
                raw, _ = edit_image(
                    ours.model,
                    ours.tokenizer,
                    pil_to_unit(inputs[0]),
                    prompt,
                    autoencoder_moments(ours.vae),
                    seed,
                    options(kw),
                )
            h, w = shape[0] // 16, shape[1] // 16
            x = tokens_off.float().reshape(1, h, w, 2, 2, 16)
            raw_off = torch.einsum("nhwpqc->nchpwq", x).reshape(1, 16, 2 * h, 2 * w) / 0.3611 + 0.1159
            row = dict(
                seed=seed,
                case=case,
                shape=list(shape),
                steps=args.steps,
                token_err=float((raw_to_tokens(raw[0], ours.model.params) - tokens_off.float()).abs().max()),
                raw_err=float((raw - raw_off).abs().max()),
                token_max=float(tokens_off.abs().max()),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    for case in ("t2i", "edit"):
        sel = [r for r in rows if r["case"] == case]
        print(case, "max token err", max(r["token_err"] for r in sel), "max raw err", max(r["raw_err"] for r in sel))


if __name__ == "__main__":
    main()
