"""Bagel module: embeddings' orderings, how blocks advance a context, batched velocity passes against float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from bagel_vae_pp.bagel.config import CONFIGS
from bagel_vae_pp.bagel.model import EMPTY_CONTEXT, sincos_2d_table, timestep_embedding
from bagel_vae_pp.bagel.quantize import quantize_llm_
from bagel_vae_pp.bagel.tiny import random_bagel
from bagel_vae_pp.bagel.tokenizer import SpecialTokens

SPECIAL = SpecialTokens(151644, 151645, 151652, 151653)
# storage name -> (model dtype, weight dtype)
STORAGE = {"fp32": (torch.float32, "bf16"), "bf16": (torch.bfloat16, "bf16"),
           "fp8_e4m3fn": (torch.bfloat16, "fp8_e4m3fn")}  # fmt: skip
# Relative L2 against float64: fp32 rounding (2.7e-7 measured), bf16's (5.5e-3; FP8 storage on its dequantized
# weights, computed in bf16: the same).
REFERENCE_TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}
# The contexts of batched passes: a text-only one, one with an image block and more text after it, the empty one
# (plain text to image's cfg_text); each has its own length and RoPE position.
PASSES = {1: ["image"], 2: ["text", "empty"], 3: ["image", "empty", "text"]}


class TestEmbeddings:
    def test_timestep_embedding_is_cos_then_sin_of_raw_t(self):
        emb = timestep_embedding(torch.tensor([0.5]), dim=4)
        freqs = [1.0, math.exp(-math.log(10000) / 2)]
        expected = [math.cos(0.5 * f) for f in freqs] + [math.sin(0.5 * f) for f in freqs]
        torch.testing.assert_close(emb[0], torch.tensor(expected))

    def test_sincos_table_codes_column_first_sin_then_cos(self):
        table = sincos_2d_table(3, 8)  # [9, 8]
        row, col = 1, 2
        entry = table[row * 3 + col]
        assert entry[0] == math.sin(col) and entry[2] == math.cos(col)  # column half, lowest frequency 1
        torch.testing.assert_close(entry[4], torch.tensor(math.sin(row)))


class TestContexts:
    def test_text_advances_rope_per_token_and_images_by_one(self):
        model = random_bagel(CONFIGS["tiny"])
        ctx = model.prefill_text(EMPTY_CONTEXT, [151644, 10, 11, 151645])
        assert (ctx.length, ctx.rope) == (4, 4)
        block = model.wrap_image(model.latent_tokens(torch.randn(6, 64), 0.0, torch.arange(6)), SPECIAL)
        ctx = model.prefill_image_block(ctx, block, is_latent=True)
        assert (ctx.length, ctx.rope) == (12, 5)
        assert ctx.kv[0][0].shape[0] == 12

    def test_velocity_leaves_the_context_unchanged(self):
        model = random_bagel(CONFIGS["tiny"])
        ctx = model.prefill_text(EMPTY_CONTEXT, [151644, 10, 151645])
        block = model.wrap_image(model.latent_tokens(torch.randn(4, 64), 0.7, torch.arange(4)), SPECIAL)
        v1 = model.velocity(ctx, block)
        v2 = model.velocity(ctx, block)
        assert v1.shape == (4, 64) and torch.equal(v1, v2) and ctx.length == 3


def reference_velocity(model, ctx, block):
    """One velocity pass written out in float64 from the model's weights (a quantized Linear's `weight` is its
    dequantized one) and ctx's cache: routing by a token mask, GQA by repeated K/V heads, softmax attention."""
    cfg, lm = model.params.llm, model.language_model.model
    L, H, Hkv, Dh = block.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    is_gen = torch.zeros(L, dtype=torch.bool)
    is_gen[1:-1] = True

    def routed(und, gen, f, t):
        u, g = f(und, t[~is_gen]), f(gen, t[is_gen])
        out = u.new_empty(t.shape[:1] + u.shape[1:])
        out[~is_gen], out[is_gen] = u, g
        return out

    def linear(lin, t):
        return t @ lin.weight.double().T + (0 if lin.bias is None else lin.bias.double())

    def rms(norm, t):
        return norm.weight.double() * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps)

    def mlp(m, t):
        return linear(m.down_proj, F.silu(linear(m.gate_proj, t)) * linear(m.up_proj, t))

    freqs = ctx.rope / cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)  # every token at ctx.rope
    angle = torch.cat([freqs, freqs])
    rope = lambda t: t * angle.cos() + torch.cat([-t[..., Dh // 2 :], t[..., : Dh // 2]], -1) * angle.sin()
    x = block.double()
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        h = routed(layer.input_layernorm, layer.input_layernorm_moe_gen, rms, x)
        q = routed(a.q_proj, a.q_proj_moe_gen, linear, h).view(L, H, Dh)
        k = routed(a.k_proj, a.k_proj_moe_gen, linear, h).view(L, Hkv, Dh)
        v = routed(a.v_proj, a.v_proj_moe_gen, linear, h).view(L, Hkv, Dh)
        q, k = rope(routed(a.q_norm, a.q_norm_moe_gen, rms, q)), rope(routed(a.k_norm, a.k_norm_moe_gen, rms, k))
        if ctx.kv is not None:
            k, v = torch.cat([ctx.kv[i][0].double(), k]), torch.cat([ctx.kv[i][1].double(), v])
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # [Lk, H, Dh]
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / Dh**0.5, dim=-1)
        x = x + routed(a.o_proj, a.o_proj_moe_gen, linear, torch.einsum("hqk,khd->qhd", p, v).reshape(L, H * Dh))
        h = routed(layer.post_attention_layernorm, layer.post_attention_layernorm_moe_gen, rms, x)
        x = x + routed(layer.mlp, layer.mlp_moe_gen, mlp, h)
    return linear(model.llm2vae, routed(lm.norm, lm.norm_moe_gen, rms, x)[is_gen])


@pytest.fixture(scope="module", params=list(STORAGE))
def step(request):
    """(model, contexts by name, a wrapped noisy block) in one storage."""
    dtype, weight_dtype = STORAGE[request.param]
    model = quantize_llm_(random_bagel(CONFIGS["tiny"], seed=1, dtype=dtype), weight_dtype)
    rng = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        text = model.prefill_text(EMPTY_CONTEXT, [151644, 10, 11, 12, 151645])
        clean = model.wrap_image(model.latent_tokens(torch.randn(6, 64, generator=rng), 0.0, torch.arange(6)), SPECIAL)
        image = model.prefill_text(model.prefill_image_block(text, clean, is_latent=True), [151644, 20, 21, 151645])
        block = model.wrap_image(
            model.latent_tokens(torch.randn(16, 64, generator=rng), 0.7, torch.arange(16)), SPECIAL
        )
    assert (text.length, text.rope, image.length, image.rope) == (5, 5, 17, 10)
    return model, {"text": text, "image": image, "empty": EMPTY_CONTEXT}, block


def rel_l2(got, want) -> float:
    return float((got.double() - want).norm() / want.norm())


class TestBatchedPasses:
    @pytest.mark.parametrize("P", [1, 2, 3])
    def test_each_pass_is_its_pass_alone(self, step, P):
        """fp32: CPU sgemm rounds the markers' rows of 2 passes alone (2 rows) otherwise than batched (4 or 6 rows:
        another kernel), 3e-7 measured; one pass and bf16 GEMMs (FP8 storage computes in bf16) are exact."""
        model, contexts, block = step
        ctxs = [contexts[name] for name in PASSES[P]]
        with torch.inference_mode():
            want = [model.velocity(ctx, block) for ctx in ctxs]
            got = model.velocities(ctxs, block)
        assert len(got) == P
        for g, w in zip(got, want):
            if model.dtype == torch.float32 and P > 1:
                assert float((g - w).abs().max() / w.abs().max()) <= 1e-6
            else:
                assert torch.equal(g, w)

    def test_each_pass_matches_a_float64_reference(self, step):
        model, contexts, block = step
        ctxs = [contexts[name] for name in PASSES[3]]
        with torch.inference_mode():
            got = model.velocities(ctxs, block)
        for g, ctx in zip(got, ctxs):
            assert rel_l2(g, reference_velocity(model, ctx, block)) <= REFERENCE_TOL[model.dtype]
