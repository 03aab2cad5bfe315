"""Text-to-image, edit and understanding end to end on the tiny checkpoint (CPU, fp32)."""

import dataclasses

import pytest
import torch

from bagel_vae_pp.bagel.loader import load_bagel
from bagel_vae_pp.bagel.pipeline import (
    InProcess,
    autoencoder_moments,
    build_contexts,
    edit_image,
    guided_velocity,
    sequential_passes,
    text_to_image,
    understand_image,
)
from bagel_vae_pp.bagel.sampler import GuidanceOptions
from bagel_vae_pp.bagel.tiny import write_tiny_checkpoint

T2I = GuidanceOptions(6, 3.0, 4.0, 1.5, (0.4, 1.0), "global", 0.0)
EDIT = GuidanceOptions(6, 3.0, 4.0, 2.0, (0.0, 1.0), "text_channel", 0.0)


@pytest.fixture(scope="module")
def bagel(tmp_path_factory):
    folder = write_tiny_checkpoint(str(tmp_path_factory.mktemp("bagel") / "tiny"))
    return load_bagel(folder, "cpu", torch.float32)


@pytest.fixture(scope="module")
def photo():
    return torch.rand(100, 70, 3, generator=torch.Generator().manual_seed(5))


class TestTextToImage:
    def test_same_seed_same_latent_other_seed_other_latent(self, bagel):
        a, _ = text_to_image(bagel.model, bagel.tokenizer, "the cat", 64, 48, 7, T2I)
        b, _ = text_to_image(bagel.model, bagel.tokenizer, "the cat", 64, 48, 7, T2I)
        c, _ = text_to_image(bagel.model, bagel.tokenizer, "the cat", 64, 48, 8, T2I)
        assert a.shape == (1, 16, 6, 8) and a.dtype == torch.float32
        assert torch.equal(a, b) and not torch.allclose(a, c)

    def test_prompt_changes_the_latent(self, bagel):
        a, _ = text_to_image(bagel.model, bagel.tokenizer, "the cat", 32, 32, 7, T2I)
        b, _ = text_to_image(bagel.model, bagel.tokenizer, "a hat", 32, 32, 7, T2I)
        assert not torch.allclose(a, b)

    def test_progress_once_per_step_and_interrupt_between_steps(self, bagel):
        calls = []
        text_to_image(bagel.model, bagel.tokenizer, "x", 32, 32, 0, T2I, progress=lambda d, t: calls.append((d, t)))
        assert calls == [(i, 5) for i in range(1, 6)]

        def interrupt():
            if len(calls) == 7:
                raise InterruptedError

        with pytest.raises(InterruptedError):
            text_to_image(bagel.model, bagel.tokenizer, "x", 32, 32, 0, T2I, progress=lambda d, t: calls.append(d),
                          interrupt=interrupt)  # fmt: skip
        assert len(calls) == 7

    def test_size_must_fit_the_latent_table(self, bagel):
        with pytest.raises(ValueError, match=r"width is 40; it must be a multiple of 16 from 16 to 128"):
            text_to_image(bagel.model, bagel.tokenizer, "x", 40, 32, 0, T2I)

    def test_reusing_the_conditional_pass_for_image_guidance_is_exact(self, bagel):
        model, tok = bagel.model, bagel.tokenizer
        ctxs = build_contexts(model, tok, ["the cat"], None)
        assert ctxs.cfg_img is ctxs.gen
        copied = dataclasses.replace(ctxs, cfg_img=dataclasses.replace(ctxs.gen))  # equal, not identical
        # one pass at a time: batched fp32 passes round with their number (CPU sgemm of the markers' 4 vs 6 rows)
        ops = InProcess(model, tok.special, sequential_passes(model))
        x_t = torch.randn(4, 64)
        shared = guided_velocity(ops, ctxs, x_t, 0.9, torch.arange(4), 4.0, 1.5, T2I)
        separate = guided_velocity(ops, copied, x_t, 0.9, torch.arange(4), 4.0, 1.5, T2I)
        assert torch.equal(shared, separate)

    def test_thinking_text_is_returned_and_conditions_the_image(self, bagel):
        plain, none = text_to_image(bagel.model, bagel.tokenizer, "the cat", 32, 32, 3, T2I)
        thought, text = text_to_image(bagel.model, bagel.tokenizer, "the cat", 32, 32, 3, T2I, think=True,
                                      max_think_tokens=4)  # fmt: skip
        assert none == "" and isinstance(text, str) and text
        assert not torch.allclose(plain, thought)


class TestEdit:
    def test_output_has_the_vae_resized_input_size(self, bagel, photo):
        latent, _ = edit_image(bagel.model, bagel.tokenizer, photo, "red", autoencoder_moments(bagel.vae), 1, EDIT)
        assert latent.shape == (1, 16, 96 // 8, 64 // 8)  # 70x100 -> 64x96 (stride 16, long side <= 128)

    def test_same_seed_same_latent(self, bagel, photo):
        encode = autoencoder_moments(bagel.vae)
        a, _ = edit_image(bagel.model, bagel.tokenizer, photo, "red", encode, 1, EDIT)
        b, _ = edit_image(bagel.model, bagel.tokenizer, photo, "red", encode, 1, EDIT)
        assert torch.equal(a, b)

    def test_mean_only_encode_keeps_the_noise_aligned(self, bagel, photo):
        moments = autoencoder_moments(bagel.vae)
        mean_only = lambda px: moments(px)[:, :16]  # what a distributed encode returns
        zero_var = lambda px: torch.cat([moments(px)[:, :16], torch.full_like(moments(px)[:, 16:], -1e4)], 1)
        a, _ = edit_image(bagel.model, bagel.tokenizer, photo, "red", mean_only, 1, EDIT)
        b, _ = edit_image(bagel.model, bagel.tokenizer, photo, "red", zero_var, 1, EDIT)
        torch.testing.assert_close(a, b)


class TestBatchedPasses:
    """The default in-process passes (a step's passes through each layer together) against one pass at a time."""

    def test_text_to_image_two_passes_a_step(self, bagel):
        sequential = InProcess(bagel.model, bagel.tokenizer.special, sequential_passes(bagel.model))
        want, _ = text_to_image(sequential, bagel.tokenizer, "the cat", 64, 48, 7, T2I)
        got, _ = text_to_image(bagel.model, bagel.tokenizer, "the cat", 64, 48, 7, T2I)
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5

    def test_edit_three_passes_a_step(self, bagel, photo):
        encode = autoencoder_moments(bagel.vae)
        sequential = InProcess(bagel.model, bagel.tokenizer.special, sequential_passes(bagel.model))
        want, _ = edit_image(sequential, bagel.tokenizer, photo, "red", encode, 1, EDIT)
        got, _ = edit_image(bagel.model, bagel.tokenizer, photo, "red", encode, 1, EDIT)
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


class TestUnderstanding:
    def test_greedy_answer_is_deterministic_and_bounded(self, bagel, photo):
        steps = []
        a = understand_image(
            bagel.model, bagel.tokenizer, photo, "what is this?", 6, progress=lambda d, t: steps.append(d)
        )
        b = understand_image(bagel.model, bagel.tokenizer, photo, "what is this?", 6)
        assert a == b and a and steps == [1, 2, 3, 4, 5, 6]  # random weights never stop early

    def test_sampling_follows_the_seed(self, bagel, photo):
        run = lambda seed: understand_image(bagel.model, bagel.tokenizer, photo, "hi", 6, 1.0, seed)
        assert run(1) == run(1)
        assert len({run(s) for s in range(4)}) > 1
