"""Qwen2 MoT decoder: bottom-right causal masking, KV-cache continuation, expert routing, GQA."""

import pytest
import torch

from bagel_vae_pp.bagel.config import CONFIGS
from bagel_vae_pp.bagel.llm import attention_mask
from bagel_vae_pp.bagel.tiny import random_bagel


@pytest.fixture(scope="module")
def lm():
    return random_bagel(CONFIGS["tiny"], seed=1).language_model.model


class TestMask:
    def test_new_tokens_see_the_whole_cache_and_earlier_new_tokens(self):
        mask = attention_mask(2, 5, causal=True, device="cpu")
        assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]

    def test_full_attention_needs_no_mask(self):
        assert attention_mask(3, 7, causal=False, device="cpu") is None


class TestDecoder:
    def test_cached_continuation_equals_one_pass(self, lm):
        x = torch.randn(7, 64)
        pos = torch.arange(7)
        full, full_kv = lm(x, pos, None, causal=True)
        head, kv = lm(x[:4], pos[:4], None, causal=True)
        tail, kv = lm(x[4:], pos[4:], kv, causal=True)
        torch.testing.assert_close(torch.cat([head, tail]), full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kv[0][0], full_kv[0][0])
        assert kv[0][0].shape == (7, 2, 16)  # [L, Hkv, Dh]

    def test_gen_tokens_use_the_generation_expert_and_markers_do_not(self, lm):
        x = torch.randn(6, 64)
        pos = torch.zeros(6, dtype=torch.long)
        und, _ = lm(x, pos, None, gen=None)
        mixed, _ = lm(x, pos, None, gen=slice(1, 5))
        assert not torch.allclose(mixed[1:5], und[1:5])
        # markers keep understanding weights, but attend to gen-projected keys: they change too
        swapped = random_bagel(CONFIGS["tiny"], seed=1).language_model.model
        with torch.no_grad():
            for name, p in swapped.named_parameters():
                if "_moe_gen" in name:
                    p.copy_(dict(swapped.named_parameters())[name.replace("_moe_gen", "")])
        same, _ = swapped(x, pos, None, gen=slice(1, 5))
        torch.testing.assert_close(same, und, rtol=1e-5, atol=1e-5)

    def test_gen_block_anywhere_in_the_sequence(self, lm):
        # one RoPE position, full attention: reordering the tokens (and their expert) reorders the outputs
        x = torch.randn(6, 64)
        pos = torch.zeros(6, dtype=torch.long)
        ctx, past = lm(torch.randn(3, 64), torch.arange(3), None, causal=True)
        ref, ref_kv = lm(x, pos, past, gen=slice(1, 5))
        for order, gen in (([1, 2, 3, 4, 0, 5], slice(0, 4)), ([0, 5, 1, 2, 3, 4], slice(2, 6))):
            out, kv = lm(x[order], pos, past, gen=gen)
            torch.testing.assert_close(out, ref[order], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(kv[-1][0][3:], ref_kv[-1][0][3:][order], rtol=1e-5, atol=1e-5)

    def test_rope_depends_on_relative_positions_only(self, lm):
        x = torch.randn(5, 64)
        a, _ = lm(x, torch.arange(5), None, causal=True)
        b, _ = lm(x, torch.arange(5) + 100, None, causal=True)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
