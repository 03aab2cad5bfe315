"""Loader: the real folder layout, strict keys, shape-derived sizes, folder discovery."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel_vae_pp.autoencoder import random_autoencoder
from bagel_vae_pp.bagel.loader import is_bagel_folder, list_bagel_folders, load_bagel, resolve_folder
from bagel_vae_pp.bagel.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bagel")
    write_tiny_checkpoint(str(root / "tiny"))
    return root


def broken_copy(src, dst, edit_weights):
    """A copy of the checkpoint folder (files linked) whose ema.safetensors went through edit_weights."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name != "ema.safetensors":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    sd = load_file(os.path.join(src, "ema.safetensors"))
    edit_weights(sd)
    save_file(sd, os.path.join(dst, "ema.safetensors"))
    return str(dst)


class TestLoad:
    def test_loads_tiny_checkpoint_with_sizes_from_tensor_shapes(self, root):
        loaded = load_bagel(str(root / "tiny"), "cpu", torch.float32)
        assert json.loads((root / "tiny" / "config.json").read_text())["max_latent_size"] == 32  # stale
        assert loaded.model.params.max_latent_size == 8  # from latent_pos_embed [64, D]
        assert loaded.model.params.vit_max_patches_per_side == 10
        assert loaded.model.params.vit.layers_used == 2
        assert loaded.model.dtype == torch.float32 and loaded.vae.params.z_channels == 16
        assert loaded.tokenizer.special.bos == 151644

    def test_weights_match_the_file_exactly(self, root):
        loaded = load_bagel(str(root / "tiny"), "cpu", torch.float32)
        sd = load_file(str(root / "tiny" / "ema.safetensors"))
        assert torch.equal(loaded.model.llm2vae.weight, sd["llm2vae.weight"].float())
        assert not any(p.is_meta for p in loaded.model.parameters())

    def test_vae_in_subfolder_is_found(self, tmp_path):
        folder = write_tiny_checkpoint(str(tmp_path / "df11-like"), vae_in_subfolder=True)
        assert is_bagel_folder(folder)
        assert load_bagel(folder, "cpu", torch.float32).vae is not None

    def test_external_vae_in_bf16_loads_as_fp32(self, tmp_path):
        vae = random_autoencoder("tiny", seed=3)
        folder = write_tiny_checkpoint(str(tmp_path / "bf16-vae"), vae=vae, vae_dtype=torch.bfloat16)
        loaded = load_bagel(folder, "cpu", torch.float32)
        assert loaded.vae_state_dict["decoder.conv_out.weight"].dtype == torch.bfloat16
        expected = vae.decoder.conv_out.weight.to(torch.bfloat16).float()
        assert torch.equal(loaded.vae.decoder.conv_out.weight, expected)

    def test_external_vae_of_another_latent_space_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="vae has z_channels 4"):
            write_tiny_checkpoint(str(tmp_path / "sd-vae"), vae=random_autoencoder("tiny-sd"))

    def test_missing_key_is_named(self, root, tmp_path):
        folder = broken_copy(root / "tiny", tmp_path / "missing", lambda sd: sd.pop("llm2vae.bias"))
        with pytest.raises(ValueError, match=r"1 missing \(llm2vae.bias\), 0 unexpected"):
            load_bagel(folder, "cpu", torch.float32)

    def test_unexpected_key_is_named(self, root, tmp_path):
        folder = broken_copy(root / "tiny", tmp_path / "extra", lambda sd: sd.update(extra_head=torch.zeros(1)))
        with pytest.raises(ValueError, match=r"0 missing \(\), 1 unexpected \(extra_head\)"):
            load_bagel(folder, "cpu", torch.float32)

    def test_host_vae_of_other_widths_is_refused_in_one_line_before_any_weights_are_read(self, root, tmp_path):
        """ComfyUI's VAE class builds only the released widths; a 32-wide ae.safetensors must not reach it. The
        ema.safetensors here is not even a safetensors file: the check runs before any weights are read."""
        folder = broken_copy(root / "tiny", tmp_path / "narrow-vae", lambda sd: None)
        (tmp_path / "narrow-vae" / "ema.safetensors").write_bytes(b"not read")
        vae_path = os.path.join(folder, "ae.safetensors")
        with pytest.raises(ValueError) as error:
            load_bagel(folder, "cpu", torch.float32, released_vae_only=True)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{vae_path}: the autoencoder is 32 channels wide")
        assert "ch_mult (1, 2, 2, 2), 1 resnets per level" in message and "128 wide" in message

    def test_host_vae_of_the_released_widths_loads(self, tmp_path):
        vae = random_autoencoder("flux", seed=1)
        folder = write_tiny_checkpoint(str(tmp_path / "flux-vae"), vae=vae, vae_dtype=torch.bfloat16)
        loaded = load_bagel(folder, "cpu", torch.float32, released_vae_only=True)
        assert loaded.vae.params.ch == 128 and loaded.vae.params.ch_mult == (1, 2, 4, 4)

    def test_wrong_shape_is_named(self, root, tmp_path):
        folder = broken_copy(root / "tiny", tmp_path / "shape", lambda sd: sd.update({"llm2vae.bias": torch.zeros(3)}))
        with pytest.raises(ValueError, match=r"llm2vae.bias has shape \(3,\)"):
            load_bagel(folder, "cpu", torch.float32)


class TestFolders:
    def test_lists_complete_folders_only(self, root, tmp_path):
        (tmp_path / "empty").mkdir()
        os.symlink(root / "tiny", tmp_path / "tiny")
        assert list_bagel_folders([str(tmp_path), str(tmp_path / "nonexistent")]) == ["tiny"]

    def test_unknown_name_says_what_a_folder_needs(self, root):
        with pytest.raises(FileNotFoundError, match="ema.safetensors"):
            resolve_folder([str(root)], "nope")
