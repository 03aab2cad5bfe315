"""The HunyuanVideo VAE's parts in isolation (float64, plain references written here), its config and its loading.

The whole model against ComfyUI's own is tests/e2e/test_hunyuan_video_reference.py.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bagel_vae_pp import hunyuan_video
from bagel_vae_pp.hunyuan_video import (
    CONFIGS,
    HunyuanVideoVAE,
    attend,
    detect_params,
    random_hunyuan_video,
    upsample_nearest,
    video_conv,
)
from bagel_vae_pp.vae_kinds import detect_kind, vae_from_state_dict

torch.manual_seed(0)


def conv(c_in=3, c_out=4, kernel=3, stride=1) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, kernel, stride=stride).double()


def plain_video_conv(c: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """Gather the padded input by clamped indices: frame t-2.. clamped at 0, rows and columns clamped at the edges."""
    T, H, W = x.shape[2:]
    t = (torch.arange(-2, T)).clamp(min=0)
    r, col = torch.arange(-1, H + 1).clamp(0, H - 1), torch.arange(-1, W + 1).clamp(0, W - 1)
    padded = x[:, :, t][:, :, :, r][:, :, :, :, col]
    return F.conv3d(padded, c.weight, c.bias, stride=c.stride)


class TestVideoConv:
    @pytest.mark.parametrize("stride", [1, (1, 2, 2), 2])
    def test_replicates_edges_and_the_first_frame_twice_before_it(self, stride):
        c, x = conv(stride=stride), torch.randn(2, 3, 7, 6, 4, dtype=torch.float64)
        torch.testing.assert_close(video_conv(c, x), plain_video_conv(c, x), rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("cut", [1, 3, 5])
    def test_a_band_with_its_halo_rows_gives_the_rows_of_the_whole_conv(self, cut):
        c, x = conv(), torch.randn(1, 3, 5, 6, 4, dtype=torch.float64)
        top, bottom = x[:, :, :, :cut], x[:, :, :, cut:]
        up = video_conv(c, top, halo=(None, bottom[:, :, :, :1]))
        down = video_conv(c, bottom, halo=(top[:, :, :, -1:], None))
        torch.testing.assert_close(torch.cat([up, down], dim=3), plain_video_conv(c, x), rtol=1e-12, atol=1e-12)

    def test_a_1x1x1_conv_is_unpadded(self):
        c, x = conv(kernel=1), torch.randn(1, 3, 2, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(video_conv(c, x), F.conv3d(x, c.weight, c.bias))


def test_upsample_repeats_pixels_and_every_frame_but_the_first():
    x = torch.randn(1, 2, 3, 2, 3, dtype=torch.float64)
    up = upsample_nearest(x, temporal=True)
    assert up.shape == (1, 2, 5, 4, 6)
    for t, source in enumerate([0, 1, 1, 2, 2]):
        for i in range(4):
            for j in range(6):
                assert torch.equal(up[:, :, t, i, j], x[:, :, source, i // 2, j // 2])
    assert torch.equal(upsample_nearest(x, temporal=False), up[:, :, [0, 1, 3]])


def test_attention_in_query_chunks_is_softmax_over_all_keys(monkeypatch):
    monkeypatch.setattr(hunyuan_video, "SCORE_BUDGET", 2 * 40 * 7)  # 7 queries per chunk: 6 chunks, the last short
    q, k, v = (torch.randn(2, n, 8, dtype=torch.float64) for n in (40, 40, 40))
    ref = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1) @ v
    torch.testing.assert_close(attend(q, k, v), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("frames, latent", [(1, 1), (5, 2), (9, 3), (7, 2), (8, 2), (10, 3), (12, 3), (13, 4)])
def test_frame_counts_are_comfyuis(frames, latent):
    p = CONFIGS["tiny"]
    assert p.latent_frames(frames) == latent == max(0, (frames + 3) // 4)  # comfy/sd.py's downscale_ratio
    assert p.frames_out(latent) == max(0, latent * 4 - 3)  # and its upscale_ratio


def test_time_levels_are_comfyuis():
    p = CONFIGS["hunyuan-video"]
    assert [p.encoder_halves_time(level) for level in range(3)] == [False, True, True]
    assert [p.decoder_doubles_time(level) for level in (3, 2, 1)] == [False, True, True]


class TestConfig:
    @pytest.mark.parametrize("name", ["hunyuan-video", "tiny"])
    @pytest.mark.parametrize("part", [("encoder.", "quant_conv."), ("decoder.", "post_quant_conv."), ("",)])
    def test_kind_and_config_are_read_off_the_weights(self, name, part):
        with torch.device("meta"):
            sd = HunyuanVideoVAE(CONFIGS[name]).state_dict()
        sd = {k: v for k, v in sd.items() if k.startswith(part)}
        assert detect_kind(sd) == "hunyuan-video"
        has = {"has_encoder": part[0] != "decoder.", "has_decoder": part[0] != "encoder."}
        assert detect_params(sd) == replace(CONFIGS[name], **has)

    def test_comfyuis_key_names(self):
        with torch.device("meta"):
            keys = set(HunyuanVideoVAE(CONFIGS["hunyuan-video"]).state_dict())
        for key in [
            "decoder.conv_in.conv.weight",
            "decoder.mid.attn_1.q.weight",
            "decoder.up.3.upsample.conv.conv.weight",
            "decoder.up.1.block.0.nin_shortcut.conv.weight",
            "encoder.down.2.downsample.conv.conv.bias",
            "encoder.conv_out.conv.weight",
            "quant_conv.weight",
            "post_quant_conv.weight",
        ]:
            assert key in keys, key

    def test_the_weights_load_strictly_under_a_prefix(self):
        model = random_hunyuan_video("tiny", seed=1)
        loaded = vae_from_state_dict({f"first_stage_model.{k}": v for k, v in model.state_dict().items()})
        assert isinstance(loaded, HunyuanVideoVAE)
        z = torch.randn(1, 4, 2, 3, 2)
        torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)

    def test_a_missing_key_is_named(self):
        sd = random_hunyuan_video("tiny").state_dict()
        del sd["decoder.mid.attn_1.proj_out.bias"]
        with pytest.raises(ValueError, match=r"1 missing \(decoder.mid.attn_1.proj_out.bias\)"):
            vae_from_state_dict(sd)

    def test_hunyuan_video_15_is_named(self):
        sd = {"decoder.conv_in.conv.weight": torch.ones(1024, 32, 3, 3, 3)}
        with pytest.raises(ValueError, match="HunyuanVideo 1.5"):
            detect_kind(sd)
