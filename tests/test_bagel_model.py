"""Bagel module: embeddings' orderings and how blocks advance a context."""

import math

import torch

from bagel_vae_pp.bagel.config import CONFIGS
from bagel_vae_pp.bagel.model import EMPTY_CONTEXT, sincos_2d_table, timestep_embedding
from bagel_vae_pp.bagel.tiny import random_bagel
from bagel_vae_pp.bagel.tokenizer import SpecialTokens

SPECIAL = SpecialTokens(151644, 151645, 151652, 151653)


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
