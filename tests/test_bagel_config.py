"""Configs: json files without defaults, derived fields, named sizes."""

import json

import pytest

from bagel_vae_pp.bagel.config import CONFIGS, LLMConfig, ViTConfig
from bagel_vae_pp.bagel.tiny import config_files


class TestConfigFiles:
    def test_real_size_derives_head_dim_and_token_geometry(self):
        params = CONFIGS["7b-mot"]
        assert params.llm.head_dim == 128
        assert params.vit.layers_used == 26
        assert params.latent_downsample == 16
        assert params.patch_latent_dim == 64
        assert params.max_image_size == 1024

    def test_tiny_json_round_trips(self, tmp_path):
        files = config_files(CONFIGS["tiny"])
        for name in ("llm_config.json", "vit_config.json"):
            (tmp_path / name).write_text(json.dumps(files[name]))
        assert LLMConfig.from_json(str(tmp_path / "llm_config.json")) == CONFIGS["tiny"].llm
        assert ViTConfig.from_json(str(tmp_path / "vit_config.json")) == CONFIGS["tiny"].vit

    def test_missing_key_is_named_with_the_file(self, tmp_path):
        content = dict(config_files(CONFIGS["tiny"])["llm_config.json"])
        del content["rope_theta"]
        path = tmp_path / "llm_config.json"
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=r"llm_config.json: missing keys \['rope_theta'\]"):
            LLMConfig.from_json(str(path))

    def test_heads_must_group_evenly(self):
        with pytest.raises(ValueError, match="num_key_value_heads"):
            LLMConfig(64, 128, 2, 4, 3, 1000, 1e6, 1e-6, "silu")
