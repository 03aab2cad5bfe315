"""BAGEL nodes with the host stubbed: declarations complete, loader -> text-to-image / edit / understanding."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from host_stub import InterruptProcessingException, progress_bar_class
from pack_import import submodule_as_comfyui

from bagel_vae_pp.autoencoder import random_autoencoder
from bagel_vae_pp.bagel.tiny import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
PACK = "bagel_vae_pp_pack_bagel_nodes_test"
NODE_IDS = {
    "BagelVAEPP_LoadBagel": "BAGEL Model Loader",
    "BagelVAEPP_TextToImage": "BAGEL Text to Image",
    "BagelVAEPP_ImageEdit": "BAGEL Image Edit",
    "BagelVAEPP_Understanding": "BAGEL Image Understanding",
}


class Host:
    """Records what the nodes tell ComfyUI; `interrupt_after` makes the n-th interrupt check raise."""

    def __init__(self, root: str):
        self.root, self.progress, self.checks, self.interrupt_after = root, [], 0, None
        self.loads = []  # (patcher, force_full_load) per load_models_gpu call

    def modules(self) -> dict[str, types.ModuleType]:
        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = self.root
        folder_paths.add_model_folder_path = lambda name, path, is_default=False: None
        folder_paths.get_folder_paths = lambda name: [self.root]
        mm = types.ModuleType("comfy.model_management")
        mm.throw_exception_if_processing_interrupted = self.check_interrupt
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unload_all_models = lambda: None
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.is_device_cpu = lambda device: device.type == "cpu"

        def load_models_gpu(models, memory_required=0, force_full_load=False, **kw):
            self.loads.extend((patcher, force_full_load) for patcher in models)
            for patcher in models:
                patcher.model.to(patcher.load_device)

        mm.load_models_gpu = load_models_gpu
        model_patcher = types.ModuleType("comfy.model_patcher")

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device

        model_patcher.ModelPatcher = ModelPatcher
        utils = types.ModuleType("comfy.utils")
        utils.ProgressBar = progress_bar_class(
            self.check_interrupt, lambda value, total: self.progress.append((value, total))
        )
        sd = types.ModuleType("comfy.sd")

        class VAE:
            def __init__(self, sd):
                self.sd = sd

            def throw_exception_if_invalid(self):
                pass

        sd.VAE = VAE
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils, comfy.sd, comfy.model_patcher = mm, utils, sd, model_patcher
        return {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                "comfy.sd": sd, "comfy.model_patcher": model_patcher}  # fmt: skip

    def check_interrupt(self):
        self.checks += 1
        if self.interrupt_after is not None and self.checks > self.interrupt_after:
            raise InterruptProcessingException()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    root = tmp_path_factory.mktemp("models_bagel")
    # The released widths: the loader node refuses others, as ComfyUI's VAE class cannot build them.
    write_tiny_checkpoint(str(root / "tiny-bagel"), vae=random_autoencoder("flux"), vae_dtype=torch.bfloat16)
    return Host(str(root))


@pytest.fixture(scope="module")
def nodes(host):
    """nodes.bagel_nodes imported as ComfyUI does (a path-named package), host modules stubbed."""
    with submodule_as_comfyui(PACK, "nodes.bagel_nodes", host.modules()) as module:
        yield module


@pytest.fixture(scope="module")
def loaded(nodes):
    return nodes.BagelModelLoader().execute("tiny-bagel", "fp32", "bf16")


def edit_inputs(image, **changes):
    inputs = text_to_image_inputs(cfg_img_scale=2.0, cfg_interval_start=0.0, cfg_renorm_type="text_channel")
    del inputs["width"], inputs["height"]
    return {**inputs, "image": image, **changes}


def text_to_image_inputs(**changes):
    inputs = dict(prompt="the cat", seed=3, width=32, height=48, steps=4, cfg_text_scale=4.0, cfg_img_scale=1.5,
                  cfg_interval_start=0.4, cfg_interval_end=1.0, timestep_shift=3.0, cfg_renorm_type="global",
                  cfg_renorm_min=0.0, think=False, max_think_tokens=8)  # fmt: skip
    return {**inputs, **changes}


class TestDeclarations:
    def test_ids_and_titles(self, nodes):
        assert {k: v.TITLE for k, v in nodes.NODE_CLASSES.items()} == NODE_IDS

    @pytest.mark.parametrize("node_id", NODE_IDS)
    def test_every_input_and_output_is_declared(self, nodes, node_id):
        cls = nodes.NODE_CLASSES[node_id]
        assert cls.FUNCTION == "execute" and cls.CATEGORY == "bagel-vae-pp/BAGEL" and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        for section in cls.INPUT_TYPES().values():
            for name, (kind, opts) in section.items():
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
                if kind in ("INT", "FLOAT"):
                    assert {"default", "min", "max", "step"} <= set(opts), f"{node_id}.{name}"

    def test_loader_lists_model_folders(self, nodes):
        assert nodes.BagelModelLoader.INPUT_TYPES()["required"]["model"][0] == ["tiny-bagel"]

    def test_sizes_off_the_16_grid_are_refused_before_queueing(self, nodes):
        validate = nodes.BagelTextToImage.VALIDATE_INPUTS
        assert validate(width=72, height=64) == "width is 72; it must be a multiple of 16 from 16 to 1024."
        assert validate(width=64, height=2048).startswith("height is 2048")
        assert validate(width=1024, height=16) is True

    def test_text_to_image_defaults_are_the_official_app_defaults(self, nodes):
        """Written out from the official app (not read from the engine's shared table): a drift fails here."""
        req = nodes.BagelTextToImage.INPUT_TYPES()["required"]
        want = {"steps": 50, "timestep_shift": 3.0, "cfg_text_scale": 4.0, "cfg_img_scale": 1.5,
                "cfg_interval_start": 0.4, "cfg_renorm_type": "global", "cfg_renorm_min": 0.0,
                "width": 1024, "height": 1024}  # fmt: skip
        assert {name: req[name][1]["default"] for name in want} == want

    def test_edit_defaults_are_the_official_edit_defaults(self, nodes):
        req = nodes.BagelImageEdit.INPUT_TYPES()["required"]
        assert req["cfg_img_scale"][1]["default"] == 2.0 and req["cfg_interval_start"][1]["default"] == 0.0
        assert req["cfg_renorm_type"][1]["default"] == "text_channel"


class TestRun:
    def test_loader_gives_model_and_host_vae(self, loaded):
        model, vae = loaded
        assert model.loaded.model.params.max_latent_size == 8
        assert "decoder.conv_in.weight" in vae.sd

    def test_model_is_under_comfy_model_management(self, nodes, loaded, host):
        """ComfyUI holds BAGEL and its VAE (it may offload them for other models); each node asks for it whole
        on the GPU before computing."""
        handle = loaded[0].handle
        held = set(map(id, handle.model.parameters()))
        assert {id(p) for p in loaded[0].loaded.model.parameters()} <= held
        assert {id(p) for p in loaded[0].loaded.vae.parameters()} <= held
        before = len(host.loads)
        nodes.BagelTextToImage().execute(loaded[0], **text_to_image_inputs(steps=2))
        nodes.BagelImageUnderstanding().execute(loaded[0], image=torch.rand(1, 32, 32, 3), prompt="what?",
                                                max_new_tokens=2, temperature=0.0, seed=0, think=False)  # fmt: skip
        assert host.loads[before:] == [(handle, True), (handle, True)]

    def test_text_to_image_latent_same_seed_same_result(self, nodes, loaded, host):
        node = nodes.BagelTextToImage()
        host.progress.clear()
        (latent, thinking) = node.execute(loaded[0], **text_to_image_inputs())
        again, _ = node.execute(loaded[0], **text_to_image_inputs())
        assert latent["samples"].shape == (1, 16, 6, 4) and thinking == ""
        assert torch.equal(latent["samples"], again["samples"])
        assert host.progress[:3] == [(1, 3), (2, 3), (3, 3)]

    def test_interrupt_stops_text_to_image(self, nodes, loaded, host):
        host.checks, host.interrupt_after = 0, 1
        try:
            with pytest.raises(InterruptProcessingException):
                nodes.BagelTextToImage().execute(loaded[0], **text_to_image_inputs())
        finally:
            host.interrupt_after = None
        assert host.checks == 2

    def test_step_cache_reaches_the_sampler_and_still_reports_every_step(self, nodes, loaded, host):
        """The optional step_cache input: the engine's StepCache result with that threshold, progress every step."""
        pipeline = sys.modules[f"{PACK}.bagel_vae_pp.bagel.pipeline"]
        sampler = sys.modules[f"{PACK}.bagel_vae_pp.bagel.sampler"]
        inputs = text_to_image_inputs(steps=12)
        options = sampler.GuidanceOptions(12, 3.0, 4.0, 1.5, (0.4, 1.0), "global", 0.0, 0.2)
        b = loaded[0].loaded
        want, _ = pipeline.text_to_image(b.model, b.tokenizer, "the cat", 32, 48, 3, options)
        plain, _ = pipeline.text_to_image(b.model, b.tokenizer, "the cat", 32, 48, 3, replace(options, step_cache=0.0))
        host.progress.clear()
        (got, _) = nodes.BagelTextToImage().execute(loaded[0], **inputs, step_cache=0.2)
        assert torch.equal(got["samples"], want) and not torch.equal(want, plain)
        assert [done for done, _ in host.progress] == list(range(1, 12))

    def test_wrong_renorm_type_is_an_error_not_a_black_image(self, nodes, loaded):
        with pytest.raises(ValueError, match="cfg_renorm_type is 'local'"):
            nodes.BagelTextToImage().execute(loaded[0], **text_to_image_inputs(cfg_renorm_type="local"))

    def test_edit_returns_latent_of_the_resized_image(self, nodes, loaded):
        (latent, _) = nodes.BagelImageEdit().execute(loaded[0], **edit_inputs(torch.rand(1, 100, 70, 3)))
        assert latent["samples"].shape == (1, 16, 12, 8)

    def test_edit_rejects_batches(self, nodes, loaded):
        with pytest.raises(ValueError, match="batch of 2"):
            nodes.BagelImageEdit().execute(loaded[0], **edit_inputs(torch.rand(2, 64, 64, 3)))

    def test_understanding_returns_text(self, nodes, loaded):
        (text,) = nodes.BagelImageUnderstanding().execute(
            loaded[0], torch.rand(1, 64, 64, 3), "what?", 4, 0.0, 0, False
        )
        assert isinstance(text, str) and text


class TestWeightDtype:
    def test_fp8_storage_loads_quantized_layers_and_draws(self, nodes, loaded):
        from bagel_vae_pp.bagel.quantize import Fp8Linear

        fp8 = nodes.BagelModelLoader().execute("tiny-bagel", "fp32", "fp8_e4m3fn")
        layer = fp8[0].loaded.model.language_model.model.layers[0]
        assert type(layer.mlp.down_proj).__name__ == Fp8Linear.__name__  # the pack's own copy of the class
        got, _ = nodes.BagelTextToImage().execute(fp8[0], **text_to_image_inputs())
        want, _ = nodes.BagelTextToImage().execute(loaded[0], **text_to_image_inputs())
        rel = ((got["samples"] - want["samples"]).norm() / want["samples"].norm()).item()
        print(f"\nfp8_e4m3fn vs fp32 weights, tiny checkpoint, final latent rel L2: {rel:.3e}")
        assert 0 < rel < 0.5

    def test_fp8_storage_on_a_pool_gives_the_in_process_fp8_latent(self, nodes):
        """The loader hands weight_dtype to the pool: its 2 workers (tensor parallel) hold the FP8 shards."""
        pools = sys.modules[f"{PACK}.bagel_vae_pp.pool"]
        try:
            on_pool = nodes.BagelModelLoader().execute(
                "tiny-bagel", "fp32", "fp8_e4m3fn", pools.PoolSpec.parse("cpu:2", "fp32"), "1x2"
            )
            in_process = nodes.BagelModelLoader().execute("tiny-bagel", "fp32", "fp8_e4m3fn")
            got, _ = nodes.BagelTextToImage().execute(on_pool[0], **text_to_image_inputs())
            want, _ = nodes.BagelTextToImage().execute(in_process[0], **text_to_image_inputs())
            assert (got["samples"] - want["samples"]).abs().max() / want["samples"].abs().max() <= 1e-5
        finally:
            pools.shutdown_all()

    def test_fp8_gemms_on_cpu_workers_are_refused_in_one_line(self, nodes):
        pools = sys.modules[f"{PACK}.bagel_vae_pp.pool"]
        spec = pools.PoolSpec.parse("cpu:2", "bf16")
        with pytest.raises(ValueError, match="fp8_e4m3fn_fast needs FP8 tensor cores") as refused:
            nodes.BagelModelLoader().execute("tiny-bagel", "bf16", "fp8_e4m3fn_fast", spec)
        assert "\n" not in str(refused.value) and not pools.get_pool(spec).is_running


class TestOnAPool:
    @pytest.mark.parametrize("split, chosen", [("auto", "2x1"), ("1x2", "1x2")])
    def test_a_loader_with_a_pool_gives_the_in_process_latent_and_text(self, nodes, loaded, host, split, chosen):
        """BAGEL on 2 CPU workers, outside ComfyUI's model management: 'auto' gives each CFG pass its own worker
        (CPU workers have room for a whole copy), '1x2' splits one copy over both (tensor parallel)."""
        pools = sys.modules[f"{PACK}.bagel_vae_pp.pool"]
        try:
            on_pool = nodes.BagelModelLoader().execute(
                "tiny-bagel", "fp32", "bf16", pools.PoolSpec.parse("cpu:2", "fp32"), split
            )
            assert str(on_pool[0].loaded.model.split) == chosen
            before = len(host.loads)
            want, _ = nodes.BagelTextToImage().execute(loaded[0], **text_to_image_inputs())
            got, _ = nodes.BagelTextToImage().execute(on_pool[0], **text_to_image_inputs())
            rel = (got["samples"] - want["samples"]).abs().max() / want["samples"].abs().max()
            assert rel <= 1e-5 and len(host.loads) == before + 1  # only the in-process model was loaded to the GPU
            question = (torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)), "what?", 4, 0.0, 0, False)
            understand = nodes.BagelImageUnderstanding()
            assert understand.execute(on_pool[0], *question) == understand.execute(loaded[0], *question)
            assert "decoder.conv_in.weight" in on_pool[1].sd
        finally:
            pools.shutdown_all()


def test_loader_refuses_a_vae_comfyui_cannot_build_before_its_vae_class_sees_it(nodes, host, tmp_path, monkeypatch):
    """A 32-wide ae.safetensors gives one line naming the file and both widths, not ComfyUI's size mismatches."""
    write_tiny_checkpoint(str(tmp_path / "narrow"))
    monkeypatch.setattr(host, "root", str(tmp_path))
    monkeypatch.setattr(sys.modules["comfy.sd"], "VAE", lambda sd: pytest.fail("ComfyUI's VAE class was called"))
    with pytest.raises(ValueError, match=r"narrow/ae.safetensors: the autoencoder is 32 channels wide .* 128 wide"):
        nodes.BagelModelLoader().execute("narrow", "fp32", "bf16")
