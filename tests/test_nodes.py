"""The VAE nodes inside a stubbed host: registration, complete declarations, results, interrupt, unload."""

import os
import sys
import types

import pytest
import torch
from host_stub import InterruptProcessingException, progress_bar_class
from pack_import import imported_as_comfyui, path_name

from bagel_vae_pp.wan import random_wan

PACK_NAME = path_name("bagel-vae-pp")


class Host:
    """Stand-ins for the three host modules the pack touches, recording what the pack does with them."""

    def __init__(self):
        self.interrupt_after = None  # raise on the n-th interrupt check
        self.checks = 0
        self.progress = []
        self.unloads = 0
        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = "/nonexistent/models"
        folder_paths.added = []
        folder_paths.add_model_folder_path = lambda name, path, is_default=False: folder_paths.added.append(name)
        folder_paths.get_folder_paths = lambda name: []
        mm = types.ModuleType("comfy.model_management")
        mm.throw_exception_if_processing_interrupted = self.throw
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unload_all_models = self.unload
        self.freed = []
        mm.free_memory = lambda nbytes, device, keep_loaded=(): self.freed.append((nbytes, device))
        utils = types.ModuleType("comfy.utils")
        utils.ProgressBar = progress_bar_class(self.throw, lambda value, total: self.progress.append((value, total)))
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils = mm, utils
        self.modules = {
            "folder_paths": folder_paths,
            "comfy": comfy,
            "comfy.model_management": mm,
            "comfy.utils": utils,
        }

    def throw(self):
        self.checks += 1
        if self.interrupt_after is not None and self.checks >= self.interrupt_after:
            raise InterruptProcessingException()

    def unload(self):
        self.unloads += 1


@pytest.fixture(scope="module")
def pack():
    host = Host()
    with imported_as_comfyui(PACK_NAME, host.modules) as module:
        module.host = host
        # The pack's own engine modules (path-named, as in ComfyUI), not the `bagel_vae_pp` the tests import.
        module.pool = sys.modules[PACK_NAME + ".bagel_vae_pp.pool"]
        try:
            yield module
        finally:
            module.pool.shutdown_all()


class FakeVAE:
    """What the nodes use of a ComfyUI VAE object: its torch module with LDM key names."""

    def __init__(self, module):
        self.first_stage_model = module


@pytest.fixture
def cpu2(pack):
    (spec,) = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_WorkerPool"]().execute("cpu:2", "fp32", 60)
    return spec


class TestRegistration:
    def test_three_vae_nodes_are_registered_with_display_names(self, pack):
        names = pack.NODE_DISPLAY_NAME_MAPPINGS
        assert names["BagelVAEPP_WorkerPool"] == "VAE Worker Pool"
        assert names["BagelVAEPP_DistributedDecode"] == "Distributed VAE Decode"
        assert names["BagelVAEPP_DistributedEncode"] == "Distributed VAE Encode"

    def test_bagel_model_folder_is_registered(self, pack):
        assert "bagel" in sys.modules["folder_paths"].added

    def test_every_declaration_is_complete(self, pack):
        for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
            assert cls.DESCRIPTION and cls.CATEGORY.startswith("bagel-vae-pp/") and cls.FUNCTION == "execute"
            assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), node_id
            inputs = cls.INPUT_TYPES()
            for name, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
                if spec[0] in ("INT", "FLOAT"):
                    assert {"default", "min", "max", "step"} <= set(options), f"{node_id}.{name}"


class TestVAENodes:
    def test_decode_then_encode_match_the_single_process_vae(self, pack, cpu2, tiny_vae):
        latent = torch.randn(2, 16, 5, 7) + torch.linspace(-2, 2, 5)[:, None]
        (image,) = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedDecode"]().execute(
            {"samples": latent}, FakeVAE(tiny_vae), "exact", 1024, 128, cpu2
        )
        with torch.inference_mode():
            ref = ((tiny_vae.decode(latent) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        torch.testing.assert_close(image, ref, rtol=0, atol=1e-4)
        (out,) = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedEncode"]().execute(
            image, FakeVAE(tiny_vae), "exact", 1024, 128, cpu2
        )
        with torch.inference_mode():
            ref_latent = tiny_vae.encode(image.permute(0, 3, 1, 2) * 2 - 1)
        assert set(out) == {"samples"}
        torch.testing.assert_close(out["samples"], ref_latent, rtol=0, atol=1e-4 * ref_latent.abs().max().item())
        assert pack.host.progress and pack.host.progress[-1][0] == pack.host.progress[-1][1]

    def test_a_video_latent_decodes_to_frames_as_core_does_and_encodes_back_to_a_video_latent(self, pack, cpu2):
        """Wan 2.1: [B, z, T, h, w] -> [B*(1 + 4(T-1)), H, W, 3]; the frames encode to [1, z, T, h, w]."""
        wan = random_wan("tiny", seed=6)
        latent = torch.randn(2, 4, 2, 3, 2)
        (frames,) = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedDecode"]().execute(
            {"samples": latent}, FakeVAE(wan), "exact", 1024, 128, cpu2
        )
        with torch.inference_mode():
            ref = ((wan.decode(latent) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).reshape(10, 24, 16, 3)
        torch.testing.assert_close(frames, ref, rtol=0, atol=1e-4)
        (out,) = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedEncode"]().execute(
            frames[:5], FakeVAE(wan), "exact", 1024, 128, cpu2
        )
        with torch.inference_mode():
            ref_latent = wan.encode(frames[:5].permute(3, 0, 1, 2)[None] * 2 - 1)
        assert out["samples"].shape == (1, 4, 2, 3, 2)
        torch.testing.assert_close(out["samples"], ref_latent, rtol=0, atol=1e-4 * ref_latent.abs().max().item())

    def test_tiled_video_decode_hands_the_temporal_tiles_to_the_pool(self, pack, cpu2):
        """The optional temporal inputs reach the pool; left out, they are core VAE Decode (Tiled)'s 64 / 8 frames."""
        wan, latent = random_wan("tiny", seed=6), torch.randn(1, 4, 3, 5, 6)
        node = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedDecode"]()
        (short,) = node.execute({"samples": latent}, FakeVAE(wan), "tiled", 32, 8, cpu2, 8, 4)
        (default,) = node.execute({"samples": latent}, FakeVAE(wan), "tiled", 32, 8, cpu2)
        pool = pack.pool.get_pool(cpu2)
        assert torch.equal(short, pool.decode(wan, latent, "tiled", 32, 8, temporal_size=8, temporal_overlap=4))
        assert torch.equal(default, pool.decode(wan, latent, "tiled", 32, 8, temporal_size=64, temporal_overlap=8))
        assert not torch.equal(short, default)  # 2 temporal tiles against 1

    def test_the_seed_input_picks_the_ltx_decode_noise(self, pack, cpu2):
        """The optional seed reaches the pool (LTX-Video's decode noise); left out, it is 0."""
        # Built from the pack's own engine modules: the pool reads the block config off a module of its own kind.
        ltx_config = sys.modules[PACK_NAME + ".bagel_vae_pp.ltx_config"]
        ltx_video = sys.modules[PACK_NAME + ".bagel_vae_pp.ltx_video"]
        blocks = ltx_config._blocks([("compress_all", {}), ("res_x", 1)] * 3)
        vae = ltx_video.random_ltx_video(ltx_config.config_params(1, 16, decoder_blocks=blocks))
        latent = torch.randn(1, 128, 2, 2, 2)
        node = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedDecode"]()
        (seeded,) = node.execute({"samples": latent}, FakeVAE(vae), "exact", 1024, 128, cpu2, seed=5)
        (default,) = node.execute({"samples": latent}, FakeVAE(vae), "exact", 1024, 128, cpu2)
        pool = pack.pool.get_pool(cpu2)
        assert torch.equal(seeded, pool.decode(vae, latent, seed=5))
        assert torch.equal(default, pool.decode(vae, latent, seed=0))
        assert not torch.equal(seeded, default)

    def test_make_room_asks_comfyui_to_free_each_pool_gpu(self, pack):
        pack.host.freed.clear()
        sys.modules[PACK_NAME + ".nodes.host"].make_room(("cuda:1", "cuda:3"), 5 << 30)
        assert pack.host.freed == [(5 << 30, torch.device("cuda:1")), (5 << 30, torch.device("cuda:3"))]
        sys.modules[PACK_NAME + ".nodes.host"].make_room(("cpu", "cpu"), 5 << 30)
        assert len(pack.host.freed) == 2  # CPU workers take nothing from ComfyUI's GPU

    def test_bad_devices_fail_validation_with_a_readable_message(self, pack):
        cls = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_WorkerPool"]
        assert cls.VALIDATE_INPUTS(devices="7,7") == "devices: '7,7' names a GPU twice; list each GPU once."
        assert "does not exist" in cls.VALIDATE_INPUTS(devices="3")
        assert cls.VALIDATE_INPUTS(devices="cpu:2") is True

    def test_interrupt_raises_the_hosts_exception_on_the_nodes_thread(self, pack, cpu2, tiny_vae):
        pack.host.checks, pack.host.interrupt_after = 0, 3
        try:
            with pytest.raises(InterruptProcessingException):
                pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedDecode"]().execute(
                    {"samples": torch.randn(1, 16, 64, 64)}, FakeVAE(tiny_vae), "exact", 1024, 128, cpu2
                )
        finally:
            pack.host.interrupt_after = None
        (image,) = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedDecode"]().execute(
            {"samples": torch.randn(1, 16, 2, 2)}, FakeVAE(tiny_vae), "exact", 1024, 128, cpu2
        )
        assert image.shape == (1, 16, 16, 3)

    def test_unload_all_models_stops_the_pools(self, pack, cpu2, tiny_vae):
        pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedDecode"]().execute(
            {"samples": torch.randn(1, 16, 2, 2)}, FakeVAE(tiny_vae), "exact", 1024, 128, cpu2
        )
        assert any(state["running"] for state in pack.pool.pool_states())
        pids = [proc.pid for proc in pack.pool.get_pool(cpu2).procs]
        sys.modules["comfy.model_management"].unload_all_models()
        assert pack.host.unloads == 1  # ComfyUI's own unload still runs
        assert not any(state["running"] for state in pack.pool.pool_states())
        assert pids and not any(os.path.exists(f"/proc/{pid}") for pid in pids)  # exited and reaped: memory freed
        (image,) = pack.NODE_CLASS_MAPPINGS["BagelVAEPP_DistributedDecode"]().execute(
            {"samples": torch.randn(1, 16, 2, 2)}, FakeVAE(tiny_vae), "exact", 1024, 128, cpu2
        )  # the next prompt starts the pool again
        assert image.shape == (1, 16, 16, 3) and any(state["running"] for state in pack.pool.pool_states())
