"""The LTX-Video VAE's configuration: read off the weights as comfy/sd.py tells the versions apart, or from a config
(sent along with the weights by the pool); blocks it does not run refused in one line. (Its numbers are checked
against ComfyUI's own in tests/e2e/test_ltx_reference.py and across ranks in test_ltx_sharded.py.)"""

import pytest
import torch

from bagel_vae_pp import ltx_config, ltx_video
from bagel_vae_pp.vae_kinds import detect_kind, vae_from_state_dict


def meta_state_dict(params):
    with torch.device("meta"):
        return ltx_video.LTXVideoVAE(params).state_dict()


@pytest.mark.parametrize("version", [0, 1, 2])
def test_the_version_is_read_off_the_weights(version):
    sd = meta_state_dict(ltx_config.config_params(version))
    assert detect_kind(sd) == "ltx-video"
    assert ltx_config.detect_params(sd) == ltx_config.config_params(version)


def test_a_config_sent_with_the_weights_builds_its_blocks():
    params = ltx_config.config_params(
        1, 16, decoder_blocks=ltx_config._blocks([("compress_all", {}), ("res_x", 1)] * 3)
    )
    vae = ltx_video.random_ltx_video(params, seed=1)
    sd = {**vae.state_dict(), ltx_config.CONFIG_KEY: ltx_config.config_tensor(ltx_config.module_config(vae))}
    assert vae_from_state_dict(sd).params == params
    with pytest.raises(ValueError, match="missing"):  # the guessed version 0 does not fit these weights
        vae_from_state_dict(vae.state_dict())


def test_blocks_not_run_are_named_in_one_line():
    with pytest.raises(ValueError, match=r"does not run: \['attn_res_x'\]"):
        ltx_config.config_params(1, decoder_blocks=(("attn_res_x", {"num_layers": 1}),))
