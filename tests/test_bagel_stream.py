"""Streamed decoder layers: the residency plan, streamed vs resident results, where the weights live, the node."""

import logging
from dataclasses import replace
from itertools import product

import pytest
import torch
from host_stub import GpuMemory, ModelPatcher
from pack_import import submodule_as_comfyui
from safetensors.torch import load_file
from test_bagel_nodes import Host, text_to_image_inputs

from bagel_vae_pp import cli
from bagel_vae_pp.autoencoder import random_autoencoder
from bagel_vae_pp.bagel.config import CONFIGS
from bagel_vae_pp.bagel.loader import load_bagel
from bagel_vae_pp.bagel.model import EMPTY_CONTEXT
from bagel_vae_pp.bagel.pipeline import InProcess, sequential_passes, text_to_image
from bagel_vae_pp.bagel.sampler import GuidanceOptions
from bagel_vae_pp.bagel.stream import (
    LayerStream,
    pass_work_bytes,
    plan_residency,
    stream_layers_,
    streamed_layers,
    tensor_bytes,
)
from bagel_vae_pp.bagel.tiny import write_tiny_checkpoint
from bagel_vae_pp.bagel.tokenizer import SpecialTokens

SPECIAL = SpecialTokens(151644, 151645, 151652, 151653)
# Five layers: streaming three of them reuses a slot within a pass (tiny's two layers never would).
FIVE = replace(CONFIGS["tiny"], llm=replace(CONFIGS["tiny"].llm, num_hidden_layers=5))
# storage name -> (model dtype, weight dtype)
STORAGE = {"fp32": (torch.float32, "bf16"), "bf16": (torch.bfloat16, "bf16"),
           "fp8_e4m3fn": (torch.bfloat16, "fp8_e4m3fn")}  # fmt: skip
PACK = "bagel_vae_pp_pack_stream_test"


def device_bytes(layer_bytes, resident, fixed, work):
    """What the device holds with the layers `resident` (a set of indices) on it: a plain restatement of the rule."""
    streamed = [b for i, b in enumerate(layer_bytes) if i not in resident]
    buffers = min(2, len(streamed)) * max(streamed, default=0)
    return fixed + sum(layer_bytes[i] for i in resident) + buffers + work


class TestPlan:
    def test_equal_layers_keep_as_many_resident_as_any_choice_could(self):
        """Brute force over every set of resident layers (BAGEL's layers all have one size)."""
        for n, size, fixed, work in product(range(7), (1, 3), (0, 2), (0, 1)):
            sizes = [size] * n
            for budget in range(fixed + work + (n + 2) * size + 2):
                fits = [len(r) for m in product((0, 1), repeat=n) if
                        device_bytes(sizes, r := {i for i in range(n) if m[i]}, fixed, work) <= budget]  # fmt: skip
                if not fits:
                    with pytest.raises(ValueError):
                        plan_residency(sizes, fixed, budget, work)
                else:
                    assert plan_residency(sizes, fixed, budget, work) == max(fits), (n, size, budget)

    def test_any_sizes_the_most_layers_whose_planned_set_fits(self):
        """Unequal sizes: k is the largest count whose layers (all but streamed_layers(n, n - k)) fit."""
        for n in range(6):
            for sizes in product((1, 2, 5), repeat=n):
                sizes = list(sizes)
                for budget in range(0, sum(sizes) + 14):
                    fits = [k for k in range(n + 1) if device_bytes(
                        sizes, set(range(n)) - set(streamed_layers(n, n - k)), 3, 1) <= budget]  # fmt: skip
                    if not fits:
                        with pytest.raises(ValueError):
                            plan_residency(sizes, 3, budget, 1)
                    else:
                        assert plan_residency(sizes, 3, budget, 1) == max(fits)

    def test_streamed_layers_are_spread_one_per_equal_bin(self):
        """Layer i is [i, i + 1) of the stack [0, n); bin j of `count` is [j n / count, (j + 1) n / count)."""
        for n in range(13):
            for count in range(n + 1):
                chosen = streamed_layers(n, count)
                assert len(chosen) == count and list(chosen) == sorted(set(chosen))
                assert all(count * i < (j + 1) * n and count * (i + 1) > j * n for j, i in enumerate(chosen))
                gaps = {b - a for a, b in zip(chosen, chosen[1:])}
                assert max(gaps, default=0) - min(gaps, default=0) <= 1, (n, count, chosen)

    def test_refusal_names_the_budget_and_the_least_it_takes(self):
        gib = 2**30
        with pytest.raises(ValueError, match=r"budget 3\.00 GiB is too small .* still needs 4\.50 GiB"):
            plan_residency([gib // 2] * 4, 3 * gib, 3 * gib, gib // 2)  # 3 + 2 buffers of 0.5 + 0.5


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("bagel") / "five"), params=FIVE)


def velocity_and_logits(model):
    """A velocity pass against a text context (generation expert, full attention), then three greedy tokens
    (causal, growing KV caches): every layer runs in each."""
    ctx = model.prefill_text(EMPTY_CONTEXT, [151644, 10, 11, 12, 13, 151645])
    latent = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    v = model.velocity(ctx, model.wrap_image(model.latent_tokens(latent, 0.7, torch.arange(16)), SPECIAL))
    token, logits = 151644, []
    for _ in range(3):
        out, ctx = model.next_token_logits(ctx, token)
        logits.append(out)
        token = int(out.argmax())
    return v, torch.stack(logits)


class TestStreamedEqualsResident:
    @pytest.mark.parametrize("storage", STORAGE)
    @pytest.mark.parametrize("resident", [0, 2, 5])
    def test_same_velocity_and_logits_bit_for_bit(self, five, storage, resident):
        dtype, weight_dtype = STORAGE[storage]
        want = velocity_and_logits(load_bagel(five, "cpu", dtype, weight_dtype=weight_dtype).model)
        model = stream_layers_(load_bagel(five, "cpu", dtype, weight_dtype=weight_dtype).model, resident, "cpu")
        for _ in range(2):  # the second round refills the slots
            got = velocity_and_logits(model)
            assert all(torch.equal(g, w) for g, w in zip(got, want))

    def test_loader_budget_keeps_the_layers_that_fit(self, five):
        whole = load_bagel(five, "cpu", torch.float32)
        layer = tensor_bytes(whole.model.language_model.model.layers[0])
        fixed = tensor_bytes(whole.model) - 5 * layer + tensor_bytes(whole.vae)
        work = pass_work_bytes(FIVE, torch.float32)
        for resident in (0, 1, 2):  # two slots and the resident layers
            budget = fixed + (resident + 2) * layer + work
            lm = load_bagel(five, "cpu", torch.float32, device_budget_bytes=budget).model.language_model.model
            assert lm.stream.streamed == streamed_layers(5, 5 - resident)
            if resident:
                lm = load_bagel(five, "cpu", torch.float32, device_budget_bytes=budget - 1).model.language_model.model
                assert len(lm.stream.streamed) > 5 - resident
        lm = load_bagel(five, "cpu", torch.float32, device_budget_bytes=fixed + 5 * layer + work).model.language_model
        assert lm.model.stream is None
        with pytest.raises(ValueError, match="too small for BAGEL"):
            load_bagel(five, "cpu", torch.float32, device_budget_bytes=fixed + 2 * layer + work - 1)


def batched_step(model):
    """The three velocity passes of an edit step at once (Bagel.velocities): contexts of different lengths."""
    text = model.prefill_text(EMPTY_CONTEXT, [151644, 10, 11, 12, 13, 151645])
    latent = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    clean = model.wrap_image(model.latent_tokens(latent[:6], 0.0, torch.arange(6)), SPECIAL)
    image = model.prefill_text(model.prefill_image_block(text, clean, is_latent=True), [151644, 20, 151645])
    block = model.wrap_image(model.latent_tokens(latent, 0.7, torch.arange(16)), SPECIAL)
    return [image, EMPTY_CONTEXT, text], block


@pytest.fixture
def copies(monkeypatch):
    """The indices of the streamed layers copied to the device, in order (LayerStream._start starts each copy)."""
    started, start = [], LayerStream._start
    monkeypatch.setattr(LayerStream, "_start", lambda stream, j: (started.append(stream.streamed[j]), start(stream, j)))
    return started


class TestBatchedPasses:
    @pytest.mark.parametrize("storage", STORAGE)
    def test_streamed_is_resident_and_copies_each_layer_once_for_all_passes(self, five, storage, copies):
        dtype, weight_dtype = STORAGE[storage]
        with torch.inference_mode():
            contexts, block = batched_step(load_bagel(five, "cpu", dtype, weight_dtype=weight_dtype).model)
            resident = load_bagel(five, "cpu", dtype, weight_dtype=weight_dtype).model
            want = resident.velocities(contexts, block)
            model = stream_layers_(load_bagel(five, "cpu", dtype, weight_dtype=weight_dtype).model, 2, "cpu")
            for _ in range(2):  # the second round refills the slots
                copies.clear()
                got = model.velocities(contexts, block)
                assert copies == [0, 2, 4] and all(torch.equal(g, w) for g, w in zip(got, want))
            copies.clear()
            sequential_passes(model)(contexts, block)
        assert copies == [0, 2, 4] * 3  # one pass at a time: a copy per pass

    def test_text_to_image_copies_each_streamed_layer_once_per_step(self, five, copies):
        """4 steps at t = 1, 0.9, 0.75, 0.5: guided (2 passes) in the first three; the prompt's prefill first."""
        loaded = load_bagel(five, "cpu", torch.float32)
        model = stream_layers_(loaded.model, 2, "cpu")  # streams layers 0, 2, 4
        options = GuidanceOptions(5, 3.0, 4.0, 1.5, (0.6, 1.0), "global", 0.0)
        at_step = []
        progress = lambda done, total: at_step.append(len(copies))
        text_to_image(model, loaded.tokenizer, "the cat", 32, 32, 0, options, progress=progress)
        assert at_step == [3 + 3, 9, 12, 15]  # in-process passes are batched by default
        at_step.clear()
        copies.clear()
        ops = InProcess(model, loaded.tokenizer.special, sequential_passes(model))
        text_to_image(ops, loaded.tokenizer, "the cat", 32, 32, 0, options, progress=progress)
        assert at_step == [3 + 6, 15, 21, 24]


class TestWhereTheWeightsLive:
    @pytest.mark.parametrize("storage", ["fp32", "fp8_e4m3fn"])
    def test_the_device_holds_the_resident_part_and_two_slots_only(self, five, storage):
        """Planned onto the meta device: whatever the model still holds there is what a GPU would; the streamed
        layers' tensors, FP8 weights and scales (buffers) included, are CPU copies of the checkpoint's."""
        dtype, weight_dtype = STORAGE[storage]
        whole = load_bagel(five, "cpu", dtype, weight_dtype=weight_dtype).model
        model = stream_layers_(load_bagel(five, "cpu", dtype, weight_dtype=weight_dtype).model, 1, "meta")
        layer = tensor_bytes(whole.language_model.model.layers[0])
        assert all(t.device.type == "meta" for t in model.state_dict().values())
        assert tensor_bytes(model) == tensor_bytes(whole) - 4 * layer + 2 * layer  # 4 streamed, 2 slots
        stream = model.language_model.model.stream
        assert stream.streamed == (0, 1, 3, 4)
        want = whole.state_dict()
        for i, host in zip(stream.streamed, stream.host):
            assert not any(k.startswith(f"language_model.model.layers.{i}.") for k in model.state_dict())
            prefix = f"language_model.model.layers.{i}."
            assert sorted(host) == sorted(k.removeprefix(prefix) for k in want if k.startswith(prefix))
            assert all(t.device.type == "cpu" and torch.equal(t, want[prefix + k]) for k, t in host.items())

    def test_tensor_parallel_shards_are_refused(self, five):
        model = load_bagel(five, "cpu", torch.float32).model
        model.language_model.model.layers[0].reduce = lambda x: x
        with pytest.raises(ValueError, match="not available on a tensor-parallel shard"):
            stream_layers_(model, 1, "cpu")


class SmallGpuHost(Host):
    """The BAGEL nodes' stub host with a GPU of `gpu.total` bytes (host_stub.GpuMemory)."""

    def __init__(self, root: str):
        super().__init__(root)
        self.gpu = GpuMemory(total_bytes=2**50)

    def modules(self):
        modules = super().modules()
        self.gpu.install(modules["comfy.model_management"])
        modules["comfy.model_patcher"].ModelPatcher = ModelPatcher
        return modules


@pytest.fixture(scope="module")
def gpu_nodes(tmp_path_factory):
    """nodes.bagel_nodes imported as ComfyUI does, over a host whose GPU size the test sets."""
    root = tmp_path_factory.mktemp("models_bagel")
    write_tiny_checkpoint(str(root / "five"), vae=random_autoencoder("flux"), vae_dtype=torch.bfloat16, params=FIVE)
    host = SmallGpuHost(str(root))
    with submodule_as_comfyui(PACK, "nodes.bagel_nodes", host.modules()) as module:
        yield module, host


class TestNode:
    def test_too_little_room_on_comfyuis_gpu_streams_and_draws_the_same(self, gpu_nodes, caplog):
        nodes, host = gpu_nodes
        host.gpu.total = 2**50
        whole = nodes.BagelModelLoader().execute("five", "fp32", "bf16")[0]
        want, _ = nodes.BagelTextToImage().execute(whole, **text_to_image_inputs())
        assert whole.loaded.model.language_model.model.stream is None
        b = whole.loaded
        layer = tensor_bytes(b.model.language_model.model.layers[0])
        fixed = tensor_bytes(b.model) - 5 * layer + tensor_bytes(b.vae)
        host.gpu.total = fixed + (2 + 2) * layer + pass_work_bytes(FIVE, torch.float32)  # room for 2 + 2 slots
        streamed = nodes.BagelModelLoader().execute("five", "fp32", "bf16")[0]
        with caplog.at_level(logging.INFO):
            got, _ = nodes.BagelTextToImage().execute(streamed, **text_to_image_inputs())
        assert streamed.loaded.model.language_model.model.stream.streamed == (0, 2, 4)
        assert "2 of 5 decoder layers resident, 3 streamed" in caplog.text
        assert streamed.handle.model_size() == fixed + 4 * layer  # ComfyUI holds the resident part and the slots
        assert host.gpu.held[0] is streamed.handle and whole.handle not in host.gpu.held  # evicted for room
        assert torch.equal(got["samples"], want["samples"])

    def test_a_model_that_fits_is_loaded_whole_and_stays_so(self, gpu_nodes):
        """The room counts what of the model ComfyUI holds already: a second node does not stream it."""
        nodes, host = gpu_nodes
        host.gpu.total = 2**50
        managed = nodes.BagelModelLoader().execute("five", "fp32", "bf16")[0]
        handle = managed.handle
        host.gpu.held.clear()
        host.gpu.total = handle.model_size() + pass_work_bytes(FIVE, torch.float32) + 1  # just fits, with a pass
        for _ in range(2):
            managed.on_device()
            assert managed.handle is handle and host.gpu.held == [handle]
        assert managed.loaded.model.language_model.model.stream is None


class TestCLI:
    def test_vram_budget_streams_and_draws_the_in_process_latent(self, five, tmp_path, monkeypatch, caplog):
        whole = load_bagel(five, "cpu", torch.float32)
        layer = tensor_bytes(whole.model.language_model.model.layers[0])
        budget = tensor_bytes(whole.model) - layer + tensor_bytes(whole.vae) + pass_work_bytes(FIVE, torch.float32)
        monkeypatch.chdir(tmp_path)
        for name, extra in (("whole", []), ("streamed", ["--vram-budget", repr(budget / 2**30)])):
            with caplog.at_level(logging.INFO):
                assert cli.main(["bagel", "text-to-image", five, "--prompt", "the cat", "--steps", "4", "--width",
                                 "32", "--height", "32", "--dtype", "fp32", "--latent", f"{name}.safetensors",
                                 *extra]) == 0  # fmt: skip
        assert "2 of 5 decoder layers resident, 3 streamed" in caplog.text  # and 2 slots: room for 4 layers
        assert torch.equal(load_file("streamed.safetensors")["samples"], load_file("whole.safetensors")["samples"])

    @pytest.mark.parametrize(
        "extra, message",
        [(["--vram-budget", "0.5"], "device budget 0.50 GiB is too small for BAGEL"),
         (["--vram-budget", "4", "--devices", "cpu:2"], "--vram-budget applies to --devices in-process"),
         (["--vram-budget", "0"], "argument --vram-budget: 0 is not a positive number of GiB")],
    )  # fmt: skip
    def test_refusals_are_one_line(self, five, tmp_path, monkeypatch, capsys, extra, message):
        monkeypatch.chdir(tmp_path)
        try:
            code = cli.main(["bagel", "text-to-image", five, "--prompt", "x", *extra])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestOnAGpu:
    """The CUDA copy protocol (stream.py's docstring): full-width layers, 1024² tokens, so that a missing wait
    (compute reading a slot before its copy landed, a copy overwriting a slot that a layer still reads) shows."""

    @pytest.mark.parametrize("weight_dtype", ["bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast"])
    def test_streamed_velocity_is_the_resident_one_bit_for_bit(self, weight_dtype):
        from bagel_vae_pp.bagel.quantize import FP8_GEMM_CAPABILITY, quantize_llm_
        from bagel_vae_pp.bagel.tiny import random_bagel

        if weight_dtype.endswith("_fast") and torch.cuda.get_device_capability() < FP8_GEMM_CAPABILITY:
            pytest.skip("no FP8 tensor cores")
        six = replace(CONFIGS["7b-mot"], llm=replace(CONFIGS["7b-mot"].llm, num_hidden_layers=6))
        model = quantize_llm_(random_bagel(six, 0, "cuda", torch.bfloat16), weight_dtype)
        ctx = model.prefill_text(EMPTY_CONTEXT, [151644, *range(10, 40), 151645])
        latent = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
        block = model.wrap_image(model.latent_tokens(latent, 0.7, torch.arange(4096)), SPECIAL)
        want = model.velocity(ctx, block)
        before = torch.cuda.memory_allocated()
        layer = tensor_bytes(model.language_model.model.layers[0])
        stream_layers_(model, 2, "cuda")  # layers 0, 2, 3, 5 streamed: slot 0 takes 0 then 3, slot 1 2 then 5
        freed = before - torch.cuda.memory_allocated()  # the two layers not kept as slots; the allocator's block
        assert 0 <= freed - 2 * layer <= 8 << 20, (freed, layer)  # rounding of their ~30 tensors, measured 6 MiB
        assert all(t.is_pinned() for host in model.language_model.model.stream.host for t in host.values())
        for _ in range(3):
            assert torch.equal(model.velocity(ctx, block), want)
