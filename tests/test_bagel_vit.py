"""SigLIP NaViT: patch order, extrapolated position ids, shapes."""

import torch

from bagel_vae_pp.bagel.config import CONFIGS
from bagel_vae_pp.bagel.tiny import random_bagel
from bagel_vae_pp.bagel.vit import flat_position_ids, patchify


class TestPatchify:
    def test_pixels_are_row_col_channel_within_a_patch(self):
        image = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
        patches = patchify(image, 2)
        assert patches.shape == (2 * 3, 12)
        # patch (row 0, col 1): pixel (0, 1) channel 2 sits at (0*2 + 1)*3 + 2
        assert patches[1, 5] == image[2, 0, 3]

    def test_position_ids_extrapolate_into_the_full_table(self):
        assert flat_position_ids(2, 3, 70).tolist() == [0, 1, 2, 70, 71, 72]


class TestVisionModel:
    def test_features_per_patch(self):
        model = random_bagel(CONFIGS["tiny"])
        patches = torch.randn(12, 14 * 14 * 3)
        out = model.vit_model(patches, flat_position_ids(3, 4, 10))
        assert out.shape == (12, 32)
        tokens = model.vit_tokens(patches, flat_position_ids(3, 4, 10))
        assert tokens.shape == (12, 64)
