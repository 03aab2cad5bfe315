"""Loading LDM-family VAEs from their real key layouts, and clear refusals of anything else."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel_vae_pp.autoencoder import CONFIGS, autoencoder_from_state_dict, detect_params, random_autoencoder


class TestDetectAndLoad:
    @pytest.mark.parametrize("name", ["flux", "sd", "tiny", "tiny-sd"])
    def test_config_is_read_off_the_weights(self, name):
        sd = random_autoencoder(name).state_dict()
        assert detect_params(sd) == CONFIGS[name]

    def test_flux_key_names_match_ae_safetensors(self):
        keys = set(random_autoencoder("flux").state_dict())
        for key in [
            "encoder.down.2.downsample.conv.weight",
            "encoder.mid.attn_1.q.weight",
            "decoder.up.3.upsample.conv.bias",
            "decoder.up.0.block.0.nin_shortcut.weight",
            "decoder.norm_out.weight",
            "encoder.conv_out.weight",
        ]:
            assert key in keys
        assert not any("quant_conv" in k for k in keys)

    @pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae_model."])
    def test_safetensors_round_trip_gives_the_same_decode(self, tmp_path, prefix):
        ae = random_autoencoder("tiny-sd", seed=3)
        path = tmp_path / "vae.safetensors"
        save_file({prefix + k: v for k, v in ae.state_dict().items()}, path)
        loaded = autoencoder_from_state_dict(load_file(path))
        z = torch.randn(1, 4, 5, 6)
        torch.testing.assert_close(loaded.decode(z), ae.decode(z), rtol=0, atol=0)

    def test_training_keys_of_sd_files_are_ignored(self):
        sd = random_autoencoder("tiny-sd").state_dict()
        sd["loss.logvar"] = torch.zeros(())
        assert autoencoder_from_state_dict(sd).params == CONFIGS["tiny-sd"]

    def test_decoder_only_weights_load_and_can_only_decode(self):
        sd = {k: v for k, v in random_autoencoder("tiny").state_dict().items() if k.startswith("decoder.")}
        ae = autoencoder_from_state_dict(sd)
        assert ae.params.has_decoder and not ae.params.has_encoder
        assert ae.decode(torch.randn(1, 16, 2, 2)).shape == (1, 3, 16, 16)


class TestRefusals:
    def test_a_file_that_is_not_a_vae_names_what_was_found(self):
        with pytest.raises(ValueError, match="not an LDM/FLUX autoencoder.*model.layers.0.weight"):
            autoencoder_from_state_dict({"model.layers.0.weight": torch.zeros(2, 2)})

    def test_missing_key_is_named(self):
        sd = random_autoencoder("tiny").state_dict()
        del sd["decoder.mid.attn_1.k.bias"]
        with pytest.raises(ValueError, match=r"1 missing \(decoder.mid.attn_1.k.bias\)"):
            autoencoder_from_state_dict(sd)

    def test_unexpected_key_is_named(self):
        sd = random_autoencoder("tiny").state_dict()
        sd["decoder.extra.weight"] = torch.zeros(1)
        with pytest.raises(ValueError, match=r"1 unexpected \(decoder.extra.weight\)"):
            autoencoder_from_state_dict(sd)

    def test_wrong_shape_is_named(self):
        sd = random_autoencoder("tiny").state_dict()
        sd["decoder.norm_out.weight"] = torch.zeros(7)
        with pytest.raises(ValueError, match="decoder.norm_out.weight has shape"):
            autoencoder_from_state_dict(sd)

    def test_attention_inside_levels_is_unsupported(self):
        sd = random_autoencoder("tiny").state_dict()
        sd["decoder.up.1.attn.0.q.weight"] = torch.zeros(1)
        with pytest.raises(ValueError, match="attention inside its resolution levels"):
            autoencoder_from_state_dict(sd)
