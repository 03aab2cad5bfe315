"""The Wan 2.1 VAE's parts in isolation (float64, plain references written here), its config and its loading.

The whole model against ComfyUI's own is tests/e2e/test_wan_reference.py.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bagel_vae_pp import wan, wan22
from bagel_vae_pp.vae_kinds import detect_kind, vae_from_state_dict
from bagel_vae_pp.wan import Cache, causal_conv, downsample_time, random_wan, time_chunks, upsample_time

torch.manual_seed(0)


def conv(c_in=3, c_out=4, kernel=(3, 3, 3), stride=1) -> nn.Conv3d:
    padding = (0, kernel[1] // 2, kernel[2] // 2)
    return nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding).double()


def plain_causal(c: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """The whole sequence at once: k-1 zero frames before the first, zero rows and columns around."""
    kt, kh, kw = c.kernel_size
    return F.conv3d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)), c.weight, c.bias)


def run_chunks(fn, x, bounds):
    cache: Cache = {}
    return torch.cat([fn(x[:, :, a:b], cache) for a, b in bounds], dim=2)


class TestCausalConv:
    @pytest.mark.parametrize("bounds", [[(t, t + 1) for t in range(9)], time_chunks(9, 4), [(0, 9)]])
    def test_chunks_with_the_cache_equal_one_causal_conv(self, bounds):
        c, x = conv(), torch.randn(2, 3, 9, 5, 6, dtype=torch.float64)
        out = run_chunks(lambda xc, cache: causal_conv(c, xc, cache), x, bounds)
        torch.testing.assert_close(out, plain_causal(c, x), rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("cut", [1, 2, 4])
    def test_a_band_with_its_halo_rows_gives_the_rows_of_the_whole_conv(self, cut):
        c, x = conv(), torch.randn(1, 3, 5, 7, 4, dtype=torch.float64)
        ref = plain_causal(c, x)
        top, bottom = x[..., :cut, :], x[..., cut:, :]
        cache_top, cache_bottom = {}, {}
        for t in range(5):  # one frame per chunk, as decode runs
            f = slice(t, t + 1)
            up = causal_conv(c, top[:, :, f], cache_top, halo=(None, bottom[:, :, f, :1]))
            down = causal_conv(c, bottom[:, :, f], cache_bottom, halo=(top[:, :, f, -1:], None))
            torch.testing.assert_close(torch.cat([up, down], dim=3), ref[:, :, f], rtol=1e-12, atol=1e-12)

    def test_a_1x1x1_conv_keeps_no_cache(self):
        c, cache = conv(kernel=(1, 1, 1)), {}
        x = torch.randn(1, 3, 2, 3, 3, dtype=torch.float64)
        torch.testing.assert_close(causal_conv(c, x, cache), F.conv3d(x, c.weight, c.bias))
        assert cache == {}


class TestTimeResampling:
    def test_upsample_passes_the_first_frame_and_doubles_the_rest_from_windows_without_it(self):
        c, x = conv(3, 6, (3, 1, 1)), torch.randn(1, 3, 4, 2, 3, dtype=torch.float64)
        out = run_chunks(lambda xc, cache: upsample_time(c, xc, cache), x, [(t, t + 1) for t in range(4)])
        rest = plain_causal(c, x[:, :, 1:])  # [1, 6, 3, H, W]: windows over frames 1.. with zeros before
        pairs = torch.stack([rest[:, :3], rest[:, 3:]], dim=3).flatten(2, 3)  # frame 2i from channels :3, 2i+1 from 3:
        torch.testing.assert_close(out, torch.cat([x[:, :, :1], pairs], dim=2), rtol=1e-12, atol=1e-12)

    def test_downsample_passes_the_first_frame_then_stride_two_windows_start_at_it(self):
        c, x = conv(3, 3, (3, 1, 1), stride=(2, 1, 1)), torch.randn(1, 3, 9, 2, 3, dtype=torch.float64)
        out = run_chunks(lambda xc, cache: downsample_time(c, xc, cache), x, time_chunks(9, 4))
        windows = F.conv3d(x, c.weight, c.bias, stride=(2, 1, 1))  # starts 0, 2, 4, 6
        torch.testing.assert_close(out, torch.cat([x[:, :, :1], windows], dim=2), rtol=1e-12, atol=1e-12)

    def test_encode_chunks_are_the_first_frame_then_whole_fours(self):
        assert time_chunks(1, 4) == [(0, 1)]
        assert time_chunks(11, 4) == [(0, 1), (1, 5), (5, 9)]  # frames 9 and 10 are dropped, as core drops them


def test_rms_norm_scales_each_position_to_unit_mean_square_times_gamma():
    norm = wan.RMSNorm(6, 3).double()
    nn.init.normal_(norm.gamma)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64)
    ref = x / x.pow(2).mean(1, keepdim=True).sqrt() * norm.gamma
    torch.testing.assert_close(norm(x), ref, rtol=1e-12, atol=1e-12)


class TestConfig:
    @pytest.mark.parametrize(
        "module, model_class, name, kind",
        [(wan, wan.WanVAE, "wan2.1", "wan2.1"), (wan, wan.WanVAE, "tiny", "wan2.1"),
         (wan22, wan22.WanVAE22, "wan2.2", "wan2.2"), (wan22, wan22.WanVAE22, "tiny", "wan2.2")],
    )  # fmt: skip
    @pytest.mark.parametrize("part", ["encoder.", "decoder.", ""])
    def test_kind_and_config_are_read_off_the_weights(self, module, model_class, name, kind, part):
        with torch.device("meta"):
            sd = model_class(module.CONFIGS[name]).state_dict()
        sd = {k: v for k, v in sd.items() if not part or k.startswith(part)}
        has = {"has_encoder": part != "decoder.", "has_decoder": part != "encoder."}
        assert detect_kind(sd) == kind
        params = module.detect_params(sd)
        full = module.CONFIGS[name]
        if part == "encoder.":  # one half alone does not say how wide the other would be
            params = replace(params, decoder_dim=full.decoder_dim)
        if part == "decoder.":
            params = replace(params, dim=full.dim)
        assert params == replace(full, **has)

    def test_the_wan21_keys_select_the_wan_model_and_load_strictly(self):
        model = random_wan("tiny", seed=1)
        loaded = vae_from_state_dict({f"first_stage_model.{k}": v for k, v in model.state_dict().items()})
        assert isinstance(loaded, wan.WanVAE)
        z = torch.randn(1, 4, 2, 3, 2)
        torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)

    def test_a_missing_key_is_named(self):
        sd = random_wan("tiny").state_dict()
        del sd["decoder.middle.1.proj.bias"]
        with pytest.raises(ValueError, match=r"1 missing \(decoder.middle.1.proj.bias\)"):
            vae_from_state_dict(sd)

    def test_a_wrong_shape_is_named(self):
        sd = random_wan("tiny").state_dict()
        sd["decoder.middle.1.norm.gamma"] = torch.ones(8, 1, 1)  # the mid-block is 16 wide
        with pytest.raises(ValueError, match="decoder.middle.1.norm.gamma has shape"):
            vae_from_state_dict(sd)

    def test_ltx_video_is_told_by_comfyuis_key(self):
        sd = {"decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1)}
        sd["decoder.up_blocks.0.res_blocks.0.conv1.conv.weight"] = torch.ones(1)
        assert detect_kind(sd) == "ltx-video"

    def test_image_vaes_stay_ldm(self):
        with torch.device("meta"):
            from bagel_vae_pp.autoencoder import CONFIGS, AutoEncoder

            assert detect_kind(AutoEncoder(CONFIGS["tiny"]).state_dict()) == "ldm"
