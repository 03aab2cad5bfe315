"""BAGEL text-to-image, image editing and image understanding as engine functions (inferencer.py semantics).

Each function builds the official three contexts (conditional `gen`, `cfg_text` = the context at the last
input boundary, `cfg_img` = all text and no images), optionally lets the model "think" first, then samples
a latent or decodes text. Randomness comes from one CPU `torch.Generator` seeded with `seed`, drawn in the
official order: VAE posterior noise (edit), thinking tokens when sampled, then the latent noise
`randn(h*w, 64)`. The official app leaves the global RNG unseeded for seed 0; here every seed is seeded.

Results: latents in ComfyUI's raw VAE space [1, z, H/8, W/8] float32 CPU, text as str.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .config import BOS_TOKEN, EOS_TOKEN, BagelParams
from .images import (
    latent_grid,
    pil_to_unit,
    raw_to_tokens,
    resize_pil,
    to_pil,
    tokens_to_raw,
    unit_to_signed,
    vae_resize_spec,
    vit_resize_spec,
)
from .model import EMPTY_CONTEXT, Bagel, Context
from .sampler import GuidanceOptions, StepCache, build_schedule, combine_cfg, euler_sample, is_guided
from .tokenizer import BagelTokenizer, SpecialTokens
from .vit import flat_position_ids, patchify

# System prompts of the official inferencer's "think" mode (text, trailing spaces included).
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here"
)

# Defaults of the BAGEL nodes and of `python -m bagel_vae_pp bagel` (the official app's), besides DEFAULT_GUIDANCE.
DEFAULT_IMAGE_SIDE = 1024  # text to image width and height: the released checkpoint's largest
DEFAULT_MAX_THINK_TOKENS = 1000
DEFAULT_MAX_NEW_TOKENS = 512  # understanding

Progress = Callable[[int, int], None] | None
Interrupt = Callable[[], None] | None
# (contexts, wrapped noisy block [N+2, D]) -> one velocity [N, 64] per context; swap in for CFG-parallel runs.
VelocityPasses = Callable[[list[Context], Tensor], list[Tensor]]


@dataclass(frozen=True)
class Contexts:
    gen: Context  # everything: the conditional pass
    cfg_text: Context  # the context before the last text input (empty for plain text-to-image)
    cfg_img: Context  # all text inputs, no images; the same object as `gen` when there are no images


@dataclass(frozen=True)
class ImageInput:
    vit_patches: Tensor  # [Nvit, p*p*3] in [-1, 1]
    vit_position_ids: Tensor  # [Nvit]
    vae_tokens: Tensor | None = None  # [Nvae, 64] BAGEL-space latent tokens; None for understanding
    vae_position_ids: Tensor | None = None  # [Nvae]


def sequential_passes(model: Bagel) -> VelocityPasses:
    """One velocity pass after the other: each reads every weight (and copies every streamed layer) once."""
    return lambda contexts, block: [model.velocity(ctx, block) for ctx in contexts]


def batched_passes(model: Bagel) -> VelocityPasses:
    """All passes of a step through each layer together (Bagel.velocities): each weight read, each streamed layer
    copied, once per step; the activations of every pass at once. The default."""
    return model.velocities


class InProcess:
    """The model operations the pipeline asks for, on a Bagel in this process. The pool's workers run the same
    class on their model; the host then talks to them through bagel_job.PoolBagel, which has these methods too.
    Every tensor that crosses is small: token ids, image patches, [N, 64] latents and velocities, logits."""

    empty_context = EMPTY_CONTEXT

    def __init__(self, model: Bagel, special: SpecialTokens, passes: VelocityPasses | None = None):
        self.model, self.special = model, special
        self.passes = passes or batched_passes(model)

    @property
    def params(self) -> BagelParams:
        return self.model.params

    def prefill_text(self, ctx: Context, ids: list[int]) -> Context:
        return self.model.prefill_text(ctx, ids)

    def add_image(self, ctx: Context, image: ImageInput) -> Context:
        """VAE block (generation expert, t=0) if present, then the ViT block (understanding expert)."""
        model = self.model
        if image.vae_tokens is not None:
            latent = model.latent_tokens(image.vae_tokens, 0.0, image.vae_position_ids)  # [Nvae, D]
            ctx = model.prefill_image_block(ctx, model.wrap_image(latent, self.special), is_latent=True)
        vit = model.vit_tokens(image.vit_patches, image.vit_position_ids)  # [Nvit, D]
        return model.prefill_image_block(ctx, model.wrap_image(vit, self.special), is_latent=False)

    def velocities(self, contexts: list[Context], x_t: Tensor, t: float, position_ids: Tensor) -> list[Tensor]:
        """The velocity [N, 64] (fp32, CPU) of noisy latent tokens x_t [N, 64] at time t against each context.

        The sampler keeps its latent on the CPU and mixes the passes there, in this process as on a pool's host
        (bagel_job.PoolBagel): one place for the guidance arithmetic, so where the model runs changes no bit of it
        (a GPU's fused multiply-adds and reduction orders did, 1e-2 after 50 bf16 steps). A few MB a step."""
        model = self.model
        block = model.wrap_image(model.latent_tokens(x_t, t, position_ids), self.special)  # [N+2, D]
        return [v.float().cpu() for v in self.passes(contexts, block)]

    def next_token_logits(self, ctx: Context, token: int) -> tuple[Tensor, Context]:
        return self.model.next_token_logits(ctx, token)


def model_ops(model, tokenizer: BagelTokenizer, passes: VelocityPasses | None = None):
    """`model` itself where it already is a set of model operations (bagel_job.PoolBagel), else InProcess."""
    return InProcess(model, tokenizer.special, passes) if isinstance(model, Bagel) else model


def build_contexts(
    ops, tokenizer: BagelTokenizer, inputs: list[str | ImageInput], system_prompt: str | None
) -> Contexts:
    """Prefill the three contexts from interleaved inputs, as InterleaveInferencer.interleave_inference.

    Contexts that are still equal share one object (one prefill), which `sample_latent` uses to skip a pass.
    """
    ops = model_ops(ops, tokenizer)
    gen = cfg_text = cfg_img = ops.empty_context
    if system_prompt:
        gen = cfg_img = ops.prefill_text(gen, tokenizer.text_block(system_prompt))
    for item in inputs:
        if isinstance(item, str):
            cfg_text = gen
            ids = tokenizer.text_block(item)
            shared = cfg_img is gen
            gen = ops.prefill_text(gen, ids)
            cfg_img = gen if shared else ops.prefill_text(cfg_img, ids)
        else:
            gen = ops.add_image(gen, item)
            cfg_text = gen
    return Contexts(gen, cfg_text, cfg_img)


def generate_text(
    ops,
    tokenizer: BagelTokenizer,
    ctx: Context,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    progress: Progress = None,
    interrupt: Interrupt = None,
) -> str:
    """Decode from `<|im_start|>` at ctx's position until `<|im_end|>` or max_new_tokens new tokens.

    Args:
        temperature: 0 = greedy; > 0 samples softmax(logits / temperature) with `generator`.
    """
    ops = model_ops(ops, tokenizer)
    special, token, new_ids = tokenizer.special, tokenizer.special.bos, []
    for step in range(max_new_tokens):
        if interrupt is not None:
            interrupt()
        logits, ctx = ops.next_token_logits(ctx, token)  # [V]
        if temperature > 0:
            probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(torch.argmax(logits))
        if progress is not None:
            progress(step + 1, max_new_tokens)
        if token == special.eos:
            break
        new_ids.append(token)
    text = tokenizer.decode([special.bos, *new_ids])
    return text.split(EOS_TOKEN)[0].split(BOS_TOKEN)[1]  # as the inferencer cuts its output


def guided_velocity(
    ops,
    contexts: Contexts,
    x_t: Tensor,
    t: float,
    position_ids: Tensor,
    text_scale: float,
    img_scale: float,
    options: GuidanceOptions,
) -> Tensor:
    """Run the passes CFG needs at these scales (1 to 3) on latent tokens x_t [N, 64] and combine them; fp32."""
    use_text = text_scale > 1.0
    use_img = use_text and img_scale > 1.0  # official: image guidance only inside text guidance
    reuse_gen = contexts.cfg_img is contexts.gen  # no images: the image-free pass equals the conditional one
    wanted = [contexts.gen] + [contexts.cfg_text] * use_text + [contexts.cfg_img] * (use_img and not reuse_gen)
    vs = ops.velocities(wanted, x_t, t, position_ids)  # each [N, 64], fp32, CPU
    v_text = vs[1] if use_text else None
    v_img = (vs[0] if reuse_gen else vs[2]) if use_img else None
    return combine_cfg(vs[0], v_text, v_img, text_scale, img_scale, options.cfg_renorm_type, options.cfg_renorm_min)


def sample_latent(
    ops,
    tokenizer: BagelTokenizer,
    contexts: Contexts,
    height: int,
    width: int,
    options: GuidanceOptions,
    generator: torch.Generator,
    progress: Progress = None,
    interrupt: Interrupt = None,
) -> Tensor:
    """Denoise a height x width image block against the contexts; returns raw latent [1, z, H/8, W/8]."""
    ops = model_ops(ops, tokenizer)
    params = ops.params
    h, w = latent_grid(height, width, params)
    position_ids = flat_position_ids(h, w, params.max_latent_size)  # [N]
    x = torch.randn(h * w, params.patch_latent_dim, generator=generator)  # [N, 64] fp32, CPU (see velocities)

    def velocity(x_t: Tensor, t: float) -> Tensor:
        guided = is_guided(t, options.cfg_interval)
        scales = (options.cfg_text_scale, options.cfg_img_scale) if guided else (1.0, 1.0)
        return guided_velocity(ops, contexts, x_t, t, position_ids, *scales, options)

    if options.step_cache > 0:
        velocity = StepCache(velocity, options.step_cache, lambda t: is_guided(t, options.cfg_interval))
    schedule = build_schedule(options.num_timesteps, options.timestep_shift)
    tokens = euler_sample(x, schedule, velocity, progress, interrupt)  # [N, 64]
    return tokens_to_raw(tokens, h, w, params)


def check_image_size(width: int, height: int, params: BagelParams) -> None:
    stride, limit = params.latent_downsample, params.max_image_size
    for name, value in (("width", width), ("height", height)):
        if value % stride or not stride <= value <= limit:
            raise ValueError(
                f"{name} is {value}; it must be a multiple of {stride} from {stride} to {limit} (this checkpoint's "
                f"latent_pos_embed covers {params.max_latent_size} tokens per side)."
            )


def think_then(ops, tokenizer, contexts, think, max_think_tokens, generator, progress, interrupt):
    """Thinking text (greedy) appended to the conditional context only, as the inferencer does for images."""
    if not think:
        return contexts, ""
    thinking = generate_text(ops, tokenizer, contexts.gen, max_think_tokens, 0.0, generator, progress, interrupt)
    return replace(contexts, gen=ops.prefill_text(contexts.gen, tokenizer.text_block(thinking))), thinking


@torch.inference_mode()
def text_to_image(
    model,
    tokenizer: BagelTokenizer,
    prompt: str,
    width: int,
    height: int,
    seed: int,
    options: GuidanceOptions,
    think: bool = False,
    max_think_tokens: int = DEFAULT_MAX_THINK_TOKENS,
    progress: Progress = None,
    interrupt: Interrupt = None,
    passes: VelocityPasses | None = None,
) -> tuple[Tensor, str]:
    """Generate an image latent from a prompt.

    Args:
        model: a Bagel in this process, or the model operations of a worker pool (bagel_job.PoolBagel).
        width, height: multiples of 16 up to max_latent_size * 16 (1024).
        seed: seeds the CPU generator for the initial noise.
        think: let the model plan in text first (GEN_THINK_SYSTEM_PROMPT); the plan is returned.
        progress: progress(done, total) per sampling step (and per thinking token).
        interrupt: called between steps; raises to cancel.
    Returns (raw VAE latent [1, z, H/8, W/8] float32 CPU, thinking text or "").
    """
    ops = model_ops(model, tokenizer, passes)
    check_image_size(width, height, ops.params)
    generator = torch.Generator().manual_seed(seed)
    contexts = build_contexts(ops, tokenizer, [prompt], GEN_THINK_SYSTEM_PROMPT if think else None)
    contexts, thinking = think_then(ops, tokenizer, contexts, think, max_think_tokens, generator, progress, interrupt)
    latent = sample_latent(ops, tokenizer, contexts, height, width, options, generator, progress, interrupt)
    return latent, thinking


def posterior_tokens(moments: Tensor, z: int, generator: torch.Generator, params: BagelParams) -> Tensor:
    """Raw posterior [1, 2z or z, h, w] -> BAGEL tokens; draws eps first either way (official RNG order).

    With mean and log-variance the posterior is sampled like the official DiagonalGaussian; with a mean
    only (e.g. a distributed encode) the mean is used and the noise that follows stays aligned.
    """
    mean = moments[:, :z].float().cpu()  # [1, z, h, w]
    eps = torch.randn(mean.shape, generator=generator)
    if moments.shape[1] == 2 * z:
        mean = mean + torch.exp(0.5 * moments[:, z:].float().cpu()) * eps
    return raw_to_tokens(mean[0], params)


def prepare_image(params: BagelParams, image: Tensor) -> tuple:
    """ComfyUI image [H, W, 3] -> (VAE-resized PIL image, ViT patches, ViT position ids)."""
    pil = resize_pil(to_pil(image), vae_resize_spec(params))
    vit_pixels = unit_to_signed(pil_to_unit(resize_pil(pil, vit_resize_spec(params))))  # [3, H', W']
    p = params.vit.patch_size
    ids = flat_position_ids(vit_pixels.shape[1] // p, vit_pixels.shape[2] // p, params.vit_max_patches_per_side)
    return pil, patchify(vit_pixels, p), ids


def autoencoder_moments(vae) -> Callable[[Tensor], Tensor]:
    """encode_image for `edit_image` from our AutoEncoder: pixels [B, H, W, 3] in [0, 1] -> [B, 2z, H/8, W/8].

    Returns mean and log-variance (the encoder's raw output) so that the edit can sample the posterior.
    """
    weight = vae.encoder.conv_in.weight

    def encode(pixels: Tensor) -> Tensor:
        x = torch.stack([unit_to_signed(p) for p in pixels]).to(weight.device, weight.dtype)  # [B, 3, H, W]
        moments = vae.encoder(x)
        return vae.quant_conv(moments) if vae.params.has_quant_conv else moments

    return encode


@torch.inference_mode()
def edit_image(
    model,
    tokenizer: BagelTokenizer,
    image: Tensor,
    prompt: str,
    encode_image: Callable[[Tensor], Tensor],
    seed: int,
    options: GuidanceOptions,
    think: bool = False,
    max_think_tokens: int = DEFAULT_MAX_THINK_TOKENS,
    progress: Progress = None,
    interrupt: Interrupt = None,
) -> tuple[Tensor, str]:
    """Edit one image following an instruction; the output has the input's VAE-resized size.

    Args:
        image: ComfyUI image [H, W, 3] in [0, 1]; resized to long side <= 1024, short >= 512, multiples of 16.
        encode_image: pixels [1, H, W, 3] in [0, 1] -> raw posterior [1, 2z, H/8, W/8] (mean, log-variance:
            sampled, as the official code does) or [1, z, H/8, W/8] (mean: deterministic).
        seed: seeds the CPU generator for the posterior noise, then the initial noise.
    Returns (raw VAE latent [1, z, H/8, W/8] float32 CPU, thinking text or "").
    """
    ops = model_ops(model, tokenizer)
    params = ops.params
    generator = torch.Generator().manual_seed(seed)
    pil, vit_patches, vit_ids = prepare_image(params, image)
    width, height = pil.size
    h, w = latent_grid(height, width, params)
    moments = encode_image(pil_to_unit(pil)[None])  # [1, 2z or z, 2h, 2w]
    vae_tokens = posterior_tokens(moments, params.vae_z_channels, generator, params)  # [h*w, 64]
    vae_ids = flat_position_ids(h, w, params.max_latent_size)
    item = ImageInput(vit_patches, vit_ids, vae_tokens, vae_ids)
    contexts = build_contexts(ops, tokenizer, [item, prompt], GEN_THINK_SYSTEM_PROMPT if think else None)
    contexts, thinking = think_then(ops, tokenizer, contexts, think, max_think_tokens, generator, progress, interrupt)
    latent = sample_latent(ops, tokenizer, contexts, height, width, options, generator, progress, interrupt)
    return latent, thinking


@torch.inference_mode()
def understand_image(
    model,
    tokenizer: BagelTokenizer,
    image: Tensor,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    think: bool = False,
    progress: Progress = None,
    interrupt: Interrupt = None,
) -> str:
    """Answer a question about an image.

    Args:
        image: ComfyUI image [H, W, 3] in [0, 1]; VAE-resized, then ViT-resized (as the official app).
        max_new_tokens: at most this many new tokens (the official limit N yields N - 1).
        temperature: 0 = greedy; > 0 samples with a generator seeded by `seed`.
        think: reason first inside <think> </think> (VLM_THINK_SYSTEM_PROMPT); the reasoning is in the answer.
    """
    ops = model_ops(model, tokenizer)
    _, vit_patches, vit_ids = prepare_image(ops.params, image)
    system = VLM_THINK_SYSTEM_PROMPT if think else None
    contexts = build_contexts(ops, tokenizer, [ImageInput(vit_patches, vit_ids), prompt], system)
    generator = torch.Generator().manual_seed(seed)
    return generate_text(ops, tokenizer, contexts.gen, max_new_tokens, temperature, generator, progress, interrupt)
