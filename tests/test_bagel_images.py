"""Image resizing (official ImageTransform rules) and latent <-> token layouts."""

import torch

from bagel_vae_pp.bagel.config import CONFIGS, VAE_SCALE, VAE_SHIFT
from bagel_vae_pp.bagel.images import (
    ResizeSpec,
    pil_to_unit,
    raw_to_tokens,
    resized_size,
    to_pil,
    tokens_to_raw,
    vae_resize_spec,
    vit_resize_spec,
)

REAL = CONFIGS["7b-mot"]


class TestResize:
    def test_real_specs_match_the_official_transforms(self):
        assert vae_resize_spec(REAL) == ResizeSpec(1024, 512, 16)
        assert vit_resize_spec(REAL) == ResizeSpec(980, 224, 14)

    def test_vae_then_vit_resize_of_a_photo(self):
        assert resized_size(640, 480, vae_resize_spec(REAL)) == (688, 512)
        assert resized_size(688, 512, vit_resize_spec(REAL)) == (686, 518)  # 49 x 37 = 1813 ViT patches

    def test_long_side_clamp_wins_for_wide_images(self):
        assert resized_size(2000, 500, vae_resize_spec(REAL)) == (1024, 256)

    def test_conforming_size_is_kept(self):
        assert resized_size(1024, 768, vae_resize_spec(REAL)) == (1024, 768)

    def test_pil_round_trip_is_lossless_for_8bit_images(self):
        image = torch.randint(0, 256, (5, 7, 3)).float() / 255
        assert torch.equal(pil_to_unit(to_pil(image)), image)


class TestLatentTokens:
    def test_round_trip_and_scaling(self):
        raw = torch.randn(16, 6, 8)
        tokens = raw_to_tokens(raw, REAL)
        assert tokens.shape == (3 * 4, 64)
        torch.testing.assert_close(tokens_to_raw(tokens, 3, 4, REAL)[0], raw, rtol=1e-5, atol=1e-5)

    def test_token_holds_a_2x2_patch_channels_fastest(self):
        raw = torch.randn(16, 4, 4)
        tokens = raw_to_tokens(raw, REAL)
        # token (row 1, col 0) = latent pixels rows 2-3, cols 0-1; entry (p, q, c) at index (p*2 + q)*16 + c
        expected = VAE_SCALE * (raw[:, 2:4, 0:2] - VAE_SHIFT)  # [c, p, q]
        torch.testing.assert_close(tokens[2].reshape(2, 2, 16), expected.permute(1, 2, 0))
