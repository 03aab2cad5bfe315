"""FP8 weights: per-output-channel scales, e4m3 round trip, Fp8Linear against float64, loading both layouts, the
one-pass dequantization kernel under Triton's interpreter (last: the interpreter stays on to the module's end)."""

import importlib.util
import os

import pytest
import torch
from kernel_refs import interpreted_kernels, needs_triton  # noqa: F401
from safetensors import safe_open

from bagel_vae_pp.bagel import llm, quantize
from bagel_vae_pp.bagel.config import CONFIGS
from bagel_vae_pp.bagel.loader import load_bagel
from bagel_vae_pp.bagel.model import EMPTY_CONTEXT, Bagel
from bagel_vae_pp.bagel.quantize import (
    Fp8Linear,
    check_fp8_gemm,
    check_weight_dtype,
    fp8_linear,
    quantize_llm_,
    quantize_rows,
)
from bagel_vae_pp.bagel.tiny import random_bagel, write_tiny_checkpoint
from bagel_vae_pp.bagel.tokenizer import SpecialTokens

FP8 = torch.float8_e4m3fn
SPECIAL = SpecialTokens(151644, 151645, 151652, 151653)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows_of_many_magnitudes(n_out, n_in, seed=0, dtype=torch.bfloat16):
    """[n_out, n_in] with row scales spread over five decades, rounded to `dtype` (a checkpoint's weights)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(n_out, 1, generator=g) * 5 - 4)
    return (torch.randn(n_out, n_in, generator=g) * magnitude).to(dtype)


def e4m3_half_ulp(v):
    """Half the e4m3fn spacing at |v| (float64): 3 mantissa bits, exponents down to -6, subnormal step 2^-9."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0**-6)))
    return 2.0 ** (e - 4)


def dequant64(q, scale):
    return q.double() * scale.double()[:, None]


def within_round_trip_bound(w, q, scale):
    """|q * scale - w| <= half an e4m3 ulp of w / scale, times scale, per element (plus the fp32 rounding of the
    quotient w / scale before its e4m3 rounding)."""
    v = w.double() / scale.double()[:, None]
    err = (dequant64(q, scale) - w.double()).abs()
    bound = (e4m3_half_ulp(v) * (1 + 2**-20) + v.abs() * 2**-23) * scale.double()[:, None]
    return bool((err <= bound).all())


class TestScales:
    def test_one_scale_per_output_channel_mapping_its_amax_to_448(self):
        w = rows_of_many_magnitudes(5, 7)  # [out, in], not square: a scale per input channel has 7 entries
        q, scale = quantize_rows(w)
        assert q.dtype == FP8 and q.shape == (5, 7) and scale.dtype == torch.float32 and scale.shape == (5,)
        ratio = w.double().abs().amax(dim=1) / scale.double()  # [out]
        torch.testing.assert_close(ratio, torch.full_like(ratio, 448.0), rtol=2**-23, atol=0)

    def test_square_weight_scales_its_rows_not_its_columns(self):
        w = torch.diag(torch.tensor([1.0, 100.0, 1e-3, 7.0])) + 1e-4  # row i's largest entry is w[i, i]
        _, scale = quantize_rows(w)
        ratio = torch.diagonal(w).double() / scale.double()
        torch.testing.assert_close(ratio, torch.full_like(ratio, 448.0), rtol=2**-23, atol=0)

    def test_round_trip_within_half_an_e4m3_ulp_per_element(self):
        w = rows_of_many_magnitudes(64, 96)
        q, scale = quantize_rows(w)
        assert within_round_trip_bound(w, q, scale)
        err = (dequant64(q, scale) - w.double()).abs()
        worst = (err.amax(dim=1) / w.double().abs().amax(dim=1)).max().item()
        print(f"\nround trip: worst error {worst:.4f} of the row's amax (bound: half an ulp at 448, 16/448)")
        assert worst <= 16 / 448 * (1 + 2**-20)

    def test_zero_rows_stay_zero(self):
        w = rows_of_many_magnitudes(4, 16)
        w[1] = 0
        q, scale = quantize_rows(w)
        assert scale[1] == 1 and torch.isfinite(scale).all()
        assert torch.equal(dequant64(q, scale)[1], torch.zeros(16, dtype=torch.float64))
        assert within_round_trip_bound(w, q, scale)

    def test_one_huge_entry_is_kept_and_sets_its_row_scale_only(self):
        w = torch.full((2, 8), 0.01)
        w[0, 3] = 1e4
        q, scale = quantize_rows(w)
        back = dequant64(q, scale)
        assert abs(back[0, 3].item() - 1e4) <= 1e4 * 2**-22  # the row's amax, to fp32 precision
        assert (back[0, :3] == 0).all()  # 0.01 is under e4m3's smallest step at this scale (2^-9 * 1e4 / 448)
        assert within_round_trip_bound(w, q, scale)
        assert abs(back[1, 0].item() - 0.01) <= 0.01 * 2**-22  # the other row keeps its own scale


class TestFp8Linear:
    def test_fp32_layer_equals_float64_reference_on_the_dequantized_weight(self):
        lin = torch.nn.Linear(96, 40)
        lin.weight.data = rows_of_many_magnitudes(40, 96, seed=1, dtype=torch.float32)
        layer = Fp8Linear.from_linear(lin, fast=False)
        x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
        w64 = dequant64(layer.weight_fp8, layer.weight_scale)
        ref = x.double() @ w64.T + lin.bias.double()
        # fp32 rounding: of each dequantized weight (1 unit) and of the sums of 96 products (96 units)
        bound = 97 * 2.0**-24 * (x.double().abs() @ w64.abs().T + lin.bias.double().abs())
        assert ((layer(x).double() - ref).abs() <= bound).all()

    def test_bf16_dequantized_weight_is_rounded_once(self):
        lin = torch.nn.Linear(96, 40, bias=False).to(torch.bfloat16)
        lin.weight.data = rows_of_many_magnitudes(40, 96, seed=3)
        layer = Fp8Linear.from_linear(lin, fast=False)
        w, w64 = layer.weight, dequant64(layer.weight_fp8, layer.weight_scale)
        assert w.dtype == torch.bfloat16
        assert ((w.double() - w64).abs() <= w64.abs() * 2**-8).all()  # half a bf16 ulp (8 significant bits)

    def test_stores_only_fp8_weights_scales_and_bias(self):
        layer = Fp8Linear.from_linear(torch.nn.Linear(32, 16).to(torch.bfloat16), fast=False)
        sd = layer.state_dict()
        assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
            "weight_fp8": (FP8, (16, 32)),
            "weight_scale": (torch.float32, (16,)),
            "bias": (torch.bfloat16, (16,)),
        }


def layer_counts(model):
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    fp8 = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    return linears, fp8


class TestQuantizeModel:
    def test_swaps_every_decoder_linear_of_both_experts_and_nothing_else(self):
        with torch.device("meta"):
            model = Bagel(CONFIGS["tiny"]).to(torch.bfloat16)
        before, _ = layer_counts(model)
        quantize_llm_(model, "fp8_e4m3fn")
        after, fp8 = layer_counts(model)
        projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert len(fp8) == 2 * len(projections) * CONFIGS["tiny"].llm.num_hidden_layers
        assert sorted(fp8 + after) == sorted(before)
        assert all(n.startswith("language_model.model.layers.") for n in fp8)
        assert {n.split(".")[-1].removesuffix("_moe_gen") for n in fp8} == set(projections)
        assert "language_model.lm_head" in after and "connector.fc1" in after and "vae2llm" in after

    def test_full_size_parameter_bytes(self):
        params = CONFIGS["7b-mot"]
        with torch.device("meta"):
            model = Bagel(params).to(torch.bfloat16)
        bf16 = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        quantize_llm_(model, "fp8_e4m3fn")
        fp8 = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        D, M, L = params.llm.hidden_size, params.llm.intermediate_size, params.llm.num_hidden_layers
        KV = params.llm.num_key_value_heads * params.llm.head_dim
        outs = [D, KV, KV, D, M, M, D]  # q k v o gate up down
        ins = [D, D, D, D, D, D, M]
        weights = 2 * L * sum(o * i for o, i in zip(outs, ins))  # both experts
        scales = 2 * L * sum(outs)
        assert fp8 == bf16 - 2 * weights + weights + 4 * scales
        kept = bf16 / 2 - weights
        print(f"\n7b-mot parameter bytes: bf16 {bf16 / 2**30:.2f} GiB, fp8_e4m3fn {fp8 / 2**30:.2f} GiB "
              f"({weights / 1e9:.2f} B weights in FP8, {kept / 1e9:.2f} B parameters stay bf16)")  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("bagel") / "tiny"))


def velocity(model, latent):
    ctx = model.prefill_text(EMPTY_CONTEXT, [151644, 10, 11, 12, 13, 151645])
    return model.velocity(ctx, model.wrap_image(model.latent_tokens(latent, 0.7, torch.arange(16)), SPECIAL))


def greedy_ids(model, n):
    ctx, token, ids = model.prefill_text(EMPTY_CONTEXT, [151644, 20, 21, 22, 151645]), 151644, []
    for _ in range(n):
        logits, ctx = model.next_token_logits(ctx, token)
        token = int(logits.argmax())
        ids.append(token)
    return ids


class TestFidelity:
    @pytest.mark.parametrize(
        "dtype, weight_dtype",
        [(torch.float32, "fp8_e4m3fn"), (torch.bfloat16, "fp8_e4m3fn"), (torch.bfloat16, "fp8_e4m3fn_fast"),
         (torch.bfloat16, "bf16")],
    )  # fmt: skip
    def test_tiny_model_against_fp32(self, tiny, dtype, weight_dtype):
        ref = load_bagel(tiny, "cpu", torch.float32).model
        # the loader refuses fp8_e4m3fn_fast on the CPU (no FP8 tensor cores); torch's CPU _scaled_mm runs it
        model = quantize_llm_(load_bagel(tiny, "cpu", dtype).model, weight_dtype)
        latent = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
        v_ref, v = velocity(ref, latent).double(), velocity(model, latent).double()
        err = ((v - v_ref).norm() / v_ref.norm()).item()
        ids_ref, ids = greedy_ids(ref, 16), greedy_ids(model, 16)
        agree = next((i for i, (a, b) in enumerate(zip(ids, ids_ref)) if a != b), len(ids))
        print(f"\n{weight_dtype} computed in {dtype}: velocity rel. L2 error {err:.4f} against fp32; "
              f"greedy tokens agree for {agree} of {len(ids)}")  # fmt: skip
        assert err < 0.15  # sanity only: the figure is the measurement


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "quantize_bagel_fp8", os.path.join(ROOT, "tools/quantize_bagel_fp8.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def same_tensors(a: dict, b: dict) -> bool:
    bits = lambda t: t.view(torch.uint8) if t.dtype == FP8 else t  # noqa: E731
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)


class TestLoad:
    def test_quantized_at_load_from_the_bf16_file(self, tiny):
        model = load_bagel(tiny, "cpu", torch.bfloat16, weight_dtype="fp8_e4m3fn").model
        with safe_open(os.path.join(tiny, "ema.safetensors"), framework="pt") as f:
            w = f.get_tensor("language_model.model.layers.1.mlp_moe_gen.down_proj.weight")
        layer = model.language_model.model.layers[1].mlp_moe_gen.down_proj
        assert isinstance(layer, Fp8Linear) and layer.weight_fp8.dtype == FP8
        scale = w.double().abs().amax(dim=1) / 448  # float64 reference
        torch.testing.assert_close(layer.weight_scale.double(), scale, rtol=2**-24, atol=0)
        assert within_round_trip_bound(w, layer.weight_fp8, layer.weight_scale)
        assert model.language_model.lm_head.weight.dtype == torch.bfloat16

    def test_fp8_checkpoint_from_the_tool_loads_to_the_same_weights(self, tiny, tmp_path):
        dst = str(tmp_path / "tiny-fp8")
        load_tool().main([tiny, dst])
        assert sorted(os.listdir(dst)) == sorted(os.listdir(tiny))
        with safe_open(os.path.join(dst, "ema.safetensors"), framework="pt") as f:
            key = "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight"
            assert f.get_slice(key).get_dtype() == "F8_E4M3" and f.get_slice(key + "_scale").get_dtype() == "F32"
            assert f.get_slice("language_model.lm_head.weight").get_dtype() == "BF16"
        for dtype in (torch.bfloat16, torch.float32):
            direct = load_bagel(dst, "cpu", dtype, weight_dtype="fp8_e4m3fn").model.state_dict()
            at_load = load_bagel(tiny, "cpu", dtype, weight_dtype="fp8_e4m3fn").model.state_dict()
            assert same_tensors(direct, at_load)

    def test_fp8_checkpoint_loads_dequantized_with_bf16_weights(self, tiny, tmp_path):
        dst = str(tmp_path / "tiny-fp8")
        load_tool().main([tiny, dst])
        dense = load_bagel(dst, "cpu", torch.float32).model.language_model.model.layers[0].mlp.up_proj
        fp8 = load_bagel(tiny, "cpu", torch.float32, weight_dtype="fp8_e4m3fn").model
        layer = fp8.language_model.model.layers[0].mlp.up_proj
        assert isinstance(dense, torch.nn.Linear)
        w64 = dequant64(layer.weight_fp8, layer.weight_scale)
        assert ((dense.weight.double() - w64).abs() <= w64.abs() * 2**-24).all()  # rounded once to fp32

    def test_unknown_weight_dtype_is_refused_naming_the_choices(self, tiny):
        with pytest.raises(ValueError, match="'fp8'; allowed values are bf16, fp8_e4m3fn, fp8_e4m3fn_fast"):
            load_bagel(tiny, "cpu", torch.bfloat16, weight_dtype="fp8")


class TestFastRefusal:
    def test_refused_on_cpu_before_reading_weights(self):
        with pytest.raises(ValueError) as info:
            load_bagel("/nonexistent/bagel", "cpu", torch.bfloat16, weight_dtype="fp8_e4m3fn_fast")
        message = str(info.value)
        assert "\n" not in message
        assert message == (
            "weight dtype fp8_e4m3fn_fast needs FP8 tensor cores (a CUDA GPU of compute capability 8.9 or newer: "
            "Ada, Hopper, Blackwell); cpu has no compute capability (not a CUDA GPU). Use fp8_e4m3fn (FP8 "
            "storage, bf16 compute), which runs on any device."
        )

    def test_refused_below_compute_capability_8_9_naming_the_gpu(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA GeForce RTX 3090")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (8, 6))
        with pytest.raises(ValueError, match=r"cuda:0 \(NVIDIA GeForce RTX 3090\) has compute capability 8\.6\."):
            check_fp8_gemm("cuda:0")
        for capability in ((8, 9), (9, 0), (12, 0)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
            check_fp8_gemm("cuda:0")

    def test_refused_in_another_compute_dtype_than_bf16(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0))
        check_weight_dtype("fp8_e4m3fn_fast", "cuda:0", torch.bfloat16)
        with pytest.raises(ValueError, match="fp8_e4m3fn_fast computes in bf16; the model dtype is torch.float32"):
            check_weight_dtype("fp8_e4m3fn_fast", "cuda:0", torch.float32)


class TestFastGemm:
    def test_activation_scales_per_token_and_the_scaled_gemm(self):
        x = torch.randn(6, 96, generator=torch.Generator().manual_seed(4))
        x[1] *= 1e-3  # tokens of very different sizes each get their own scale
        x[4] *= 300
        x = x.to(torch.bfloat16)
        x_fp8, x_scale = quantize_rows(x)
        assert x_scale.shape == (6,)
        ratio = x.double().abs().amax(dim=1) / x_scale.double()
        torch.testing.assert_close(ratio, torch.full_like(ratio, 448.0), rtol=2**-23, atol=0)
        w_fp8, w_scale = quantize_rows(rows_of_many_magnitudes(40, 96, seed=5))
        bias = torch.randn(40).to(torch.bfloat16)
        # float32 emulation of the FP8 GEMM: fp8 operands upcast exactly, products summed, both scales after
        emulated = (x_fp8.float() @ w_fp8.float().T) * x_scale[:, None] * w_scale[None, :] + bias.float()
        out = fp8_linear(x, w_fp8, w_scale, bias)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), emulated, rtol=2**-8, atol=1e-6 * emulated.abs().max().item())
        ref = x.double() @ dequant64(w_fp8, w_scale).T + bias.double()
        err = ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
        print(f"\nfp8 GEMM with per-token activation scales: worst token rel. L2 error {err:.4f} against float64")
        assert err < 2**-4

    @pytest.mark.parametrize("passes", [1, 2])
    def test_inputs_read_by_several_fp8_gemms_are_quantized_once_to_the_same_output(self, monkeypatch, passes):
        lm = quantize_llm_(random_bagel(CONFIGS["tiny"], seed=2).to(torch.bfloat16), "fp8_e4m3fn_fast")
        lm = lm.language_model.model
        x = torch.randn(6, 64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
        positions = [torch.arange(6) + 5 * p for p in range(passes)]
        calls = []
        real = quantize.quantize_rows
        monkeypatch.setattr(quantize, "quantize_rows", lambda t: calls.append(t.shape) or real(t))
        shared, n_shared = lm.passes(x, positions, [None] * passes, gen=slice(1, 5)), len(calls)
        monkeypatch.setattr(llm, "quantize_once", lambda x, *linears: x)  # each Fp8Linear quantizes its rows
        calls.clear()
        own = lm.passes(x, positions, [None] * passes, gen=slice(1, 5))
        for a, b in zip(shared, own, strict=True):
            assert torch.equal(a, b)
        # a layer, both experts: q/k/v once (not 6 times), o_proj twice, gate/up once (not 4 times), down_proj twice
        layers = CONFIGS["tiny"].llm.num_hidden_layers
        assert (n_shared, len(calls)) == (6 * layers, 14 * layers)


@needs_triton
class TestDequantKernel:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_every_e4m3_code_times_its_row_scale(self, interp, dtype):
        dequant = importlib.import_module("bagel_vae_pp.kernels.dequant")  # the interpreted copy
        codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # all but the NaNs
        q = torch.cat([codes, codes.flip(0), codes[:192]]).repeat(3, 1).view(FP8)  # [3, 700]: rows straddle blocks
        scale = torch.tensor([1.0, 0.0123, 3e-5])
        assert dequant.is_available(q.device) and q.numel() > dequant.BLOCK
        out = dequant.dequantize_rows(q, scale, dtype)
        ref = q.double() * scale.double()[:, None]  # torch's own e4m3 decoding, exact products
        assert out.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(out, ref.float())  # rounded once
        else:  # the interpreter rounds fp32 -> bf16 toward zero: within one bf16 ulp
            assert ((out.double() - ref).abs() <= ref.abs() * 2**-7).all()
